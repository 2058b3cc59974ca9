-- Customers see what they are charged, never what it cost us to make their tokens (which
-- would give away our margin). The cost of every request stays in the ledger's books
-- (ledger.request_usage), where the operator's reports read it; the intake's copy, which fed
-- the customer's job and usage views, goes.
--
-- Roll out the new intake right after this: an intake of the previous release still writes
-- the column when it records a booking, which now fails, and the booking is redelivered
-- (after claim_idle_ms) until a new intake records it.
ALTER TABLE intake.requests DROP COLUMN cost;
