-- The ledger's log refused UPDATE and DELETE row by row, but TRUNCATE fires no row triggers
-- and would have emptied it in one statement. A statement-level trigger refuses that too.
CREATE TRIGGER events_no_truncate BEFORE TRUNCATE ON ledger.events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_change();

-- Each outbox row remembers the Redis entry it was published as. Redis fsyncs its AOF once a
-- second, so a machine crash can lose entries whose rows are already marked published; the
-- reconciler (libs/tokenmill/reconciler.py) looks the entry up and republishes a lost one.
-- Rows published before this column existed have none and are never republished.
ALTER TABLE intake.outbox ADD COLUMN entry_id text;
ALTER TABLE inspector.outbox ADD COLUMN entry_id text;
ALTER TABLE ledger.outbox ADD COLUMN entry_id text;

-- What the reconciler scans: recently published rows, and the requests still waiting to start
-- with the job event that queued each one.
CREATE INDEX outbox_published ON intake.outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX outbox_published ON inspector.outbox (published_at)
    WHERE published_at IS NOT NULL;
CREATE INDEX outbox_published ON ledger.outbox (published_at) WHERE published_at IS NOT NULL;
CREATE INDEX requests_queued ON intake.requests (submitted_at) WHERE status = 'queued';
CREATE INDEX outbox_by_request ON intake.outbox ((body::jsonb ->> 'request_id'))
    WHERE event_type = 'job.submitted';
