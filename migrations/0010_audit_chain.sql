-- The audit trail: a hash chain over the ledger's event log, signed checkpoints of its head,
-- and the view through which the intake shows a customer its request's events.
--
-- The chain is kept beside ledger.events, not in it, so that the ledger's insert path (one
-- event or a batch per transaction, ON CONFLICT (event_id) DO NOTHING) stays what it is.
-- Sealing rule (services/tokenmill/ledger/chain.py):
--
-- * Every committed event is queued for sealing in the transaction that inserts it: a
--   statement trigger copies the new rows' seq into ledger.unsealed, whatever inserted them
--   (one INSERT, a batch, COPY). An event and its queue row commit together or not at all.
-- * One sealer at a time (pg_advisory_xact_lock) takes up to a batch of queued seqs in seq
--   order, deletes them from the queue and appends one ledger.event_chain row per event at the
--   next positions: position is gapless from 1, event_seq is UNIQUE, and
--   hash = sha256(previous row's hash || the event's body as stored, UTF-8), the previous hash
--   of position 1 being 32 zero bytes.
-- * bigserial order is not commit order: an event whose transaction commits late (a lower seq
--   than one already sealed) is simply queued late and sealed at a later position. The chain's
--   order is therefore seal order (position), not seq order; nothing waits for seq gaps
--   (a rolled-back insert or an ON CONFLICT DO NOTHING consumes a seq for ever), and nothing is
--   skipped, because the queue row commits with its event.
CREATE TABLE ledger.unsealed (
    seq bigint PRIMARY KEY
);

CREATE FUNCTION ledger.queue_for_sealing() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger.unsealed (seq) SELECT seq FROM new_events;
    RETURN NULL;
END $$;
CREATE TRIGGER events_queue_for_sealing AFTER INSERT ON ledger.events
    REFERENCING NEW TABLE AS new_events
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.queue_for_sealing();
-- The events logged before the chain existed are sealed first, in seq order.
INSERT INTO ledger.unsealed (seq) SELECT seq FROM ledger.events;

CREATE TABLE ledger.event_chain (
    position  bigint PRIMARY KEY CHECK (position > 0),
    event_seq bigint NOT NULL UNIQUE,
    hash      bytea NOT NULL CHECK (length(hash) = 32),
    sealed_at timestamptz NOT NULL DEFAULT now()
);
CREATE TRIGGER event_chain_append_only BEFORE UPDATE OR DELETE ON ledger.event_chain
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER event_chain_no_truncate BEFORE TRUNCATE ON ledger.event_chain
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_change();

-- Signed statements "the chain's row at `position` has hash `head_hash`", made with the
-- operator's Ed25519 key (Settings.audit_key_file). The signed message is the canonical JSON
-- of {"head_hash": hex, "position": n, "signed_at": ISO 8601} (chain.checkpoint_message).
-- They are meant to be published elsewhere too (`tokenmill audit checkpoint` prints one as
-- JSON): a chain rewritten from some position on no longer matches them.
CREATE TABLE ledger.checkpoints (
    checkpoint_id bigserial PRIMARY KEY,
    position      bigint NOT NULL CHECK (position > 0),
    head_hash     bytea NOT NULL CHECK (length(head_hash) = 32),
    signed_at     timestamptz NOT NULL,
    public_key    bytea NOT NULL CHECK (length(public_key) = 32),
    signature     bytea NOT NULL CHECK (length(signature) = 64)
);
CREATE INDEX checkpoints_by_position ON ledger.checkpoints (position);
CREATE TRIGGER checkpoints_append_only BEFORE UPDATE OR DELETE ON ledger.checkpoints
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER checkpoints_no_truncate BEFORE TRUNCATE ON ledger.checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.refuse_change();

-- The ledger's published interface for other services: a request's logged events with their
-- place in the chain (position and hash NULL until sealed). The intake reads this view for
-- GET /v1/jobs/{id}/events, never ledger.events or ledger.event_chain themselves, so the
-- ledger may change those tables as long as this view keeps its columns. Bodies are left out:
-- they carry what a request cost us to make (energy, cost), which customers never see.
CREATE VIEW ledger.request_events AS
    SELECT e.request_id, e.customer_id, e.seq, e.event_id, e.event_type, e.occurred_at,
           c.position, c.hash
    FROM ledger.events e LEFT JOIN ledger.event_chain c ON c.event_seq = e.seq
    WHERE e.request_id <> '';

-- Retention (libs/tokenmill/retention.py) prunes each consumer's inbox by age: an event id is
-- kept for as long as a redelivery could still bring its event back.
CREATE INDEX inbox_received ON intake.inbox (received_at);
CREATE INDEX inbox_received ON inspector.inbox (received_at);
CREATE INDEX inbox_received ON ledger.inbox (received_at);
