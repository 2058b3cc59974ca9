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

-- The ledger decides which completion of a request is canonical: the one it booked. A re-run
-- job can complete twice with different outputs, so verdicts are kept per completion and the
-- request's verdict is the booked completion's; the intake keeps every completion it saw and
-- shows the booked one once the booking names it.
ALTER TABLE inspector.verdicts DROP CONSTRAINT verdicts_pkey;
ALTER TABLE inspector.verdicts ADD PRIMARY KEY (completion_event_id);
CREATE INDEX verdicts_by_request ON inspector.verdicts (request_id);

ALTER TABLE ledger.quality ADD COLUMN completion_event_id text;
UPDATE ledger.quality q SET completion_event_id = e.body::jsonb ->> 'completion_event_id'
    FROM ledger.events e WHERE e.event_id = q.event_id;
ALTER TABLE ledger.quality ALTER COLUMN completion_event_id SET NOT NULL;
ALTER TABLE ledger.quality DROP CONSTRAINT quality_pkey;
ALTER TABLE ledger.quality ADD PRIMARY KEY (completion_event_id);
CREATE INDEX quality_by_request ON ledger.quality (request_id);

-- Each booked request with the verdict on the completion it was billed for: what quality
-- reports and credits read.
CREATE VIEW ledger.request_quality AS
    SELECT u.request_id, u.customer_id, u.completion_event_id, q.verdict, q.signals,
           q.event_id AS verdict_event_id
    FROM ledger.request_usage u JOIN ledger.quality q USING (completion_event_id);

CREATE TABLE intake.completions (
    completion_event_id text PRIMARY KEY,
    request_id          text NOT NULL REFERENCES intake.requests,
    completed_at        timestamptz NOT NULL,
    output_text         text NOT NULL,
    finish_reason       text NOT NULL,
    prompt_tokens       integer NOT NULL,
    completion_tokens   integer NOT NULL,
    queue_ms            double precision NOT NULL,
    ttft_ms             double precision NOT NULL,
    e2e_ms              double precision NOT NULL,
    energy_j            numeric NOT NULL,
    meter               text NOT NULL,
    energy_estimated    boolean NOT NULL
);
CREATE INDEX completions_by_request ON intake.completions (request_id);
-- The completion the request shows, and the one the ledger booked (NULL until booked).
ALTER TABLE intake.requests ADD COLUMN completion_event_id text;
ALTER TABLE intake.requests ADD COLUMN booked_completion_event_id text;
