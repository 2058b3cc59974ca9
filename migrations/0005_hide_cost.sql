-- Customers see what they are charged, never what it cost us to make their tokens (which
-- would give away our margin). The cost of every request stays in the ledger's books
-- (ledger.request_usage), where the operator's reports read it; the intake's copy, which fed
-- the customer's job and usage views, is erased and no longer written or read.
--
-- The column itself stays for one release (expand, then contract): an intake of the previous
-- release, still running during a rolling upgrade, writes it when it records a booking, and
-- dropping it now would make those bookings fail until they were dead-lettered. The release
-- after next drops it.
UPDATE intake.requests SET cost = NULL WHERE cost IS NOT NULL;
COMMENT ON COLUMN intake.requests.cost IS
    'Unused since 0005 (customers never see our cost); kept for rolling upgrades, dropped later.';
