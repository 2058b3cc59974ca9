-- The ledger's log refused UPDATE and DELETE row by row, but TRUNCATE fires no row triggers
-- and would have emptied it in one statement. A statement-level trigger refuses that too.
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON ledger.events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_change();
