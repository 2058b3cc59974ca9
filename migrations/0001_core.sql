-- Each service owns one schema. Consumers record handled event ids in their schema's inbox
-- (in the same transaction as the write), and producers that write to Postgres queue their
-- events in their schema's outbox for the relay to publish.

CREATE FUNCTION public.tokenmill_notify_outbox() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify(TG_TABLE_SCHEMA || '_outbox', '');
    RETURN NULL;
END $$;

CREATE FUNCTION public.tokenmill_create_inbox_and_outbox(schema_name text) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    EXECUTE format($f$
        CREATE TABLE %1$I.inbox (
            event_id    text PRIMARY KEY,
            event_type  text NOT NULL,
            stream      text NOT NULL,
            received_at timestamptz NOT NULL DEFAULT now())$f$, schema_name);
    EXECUTE format($f$
        CREATE TABLE %1$I.outbox (
            seq          bigserial PRIMARY KEY,
            event_id     text NOT NULL UNIQUE,
            event_type   text NOT NULL,
            stream       text NOT NULL,
            body         text NOT NULL,
            headers      jsonb NOT NULL DEFAULT '{}',
            created_at   timestamptz NOT NULL DEFAULT now(),
            published_at timestamptz)$f$, schema_name);
    EXECUTE format(
        'CREATE INDEX outbox_unpublished ON %1$I.outbox (seq) WHERE published_at IS NULL',
        schema_name);
    -- Wakes the schema's relay when rows are queued. NOTIFY is delivered at commit, so the
    -- relay only ever wakes for rows it can see.
    EXECUTE format(
        'CREATE TRIGGER outbox_notify AFTER INSERT ON %1$I.outbox FOR EACH STATEMENT '
        'EXECUTE FUNCTION public.tokenmill_notify_outbox()', schema_name);
END $$;

-- intake: customers, their API keys, and every request with its current state.
CREATE SCHEMA intake;
SELECT public.tokenmill_create_inbox_and_outbox('intake');

CREATE TABLE intake.customers (
    customer_id text PRIMARY KEY,
    name        text NOT NULL,
    tier        text NOT NULL CHECK (tier IN ('free', 'standard', 'premium')),
    region      text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE intake.api_keys (
    key_id      text PRIMARY KEY,
    key_sha256  bytea NOT NULL UNIQUE,
    key_prefix  text NOT NULL,
    customer_id text NOT NULL REFERENCES intake.customers,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);

CREATE TABLE intake.requests (
    request_id        text PRIMARY KEY,
    customer_id       text NOT NULL REFERENCES intake.customers,
    tier              text NOT NULL,
    region            text NOT NULL,
    model             text NOT NULL,
    api               text NOT NULL CHECK (api IN ('jobs', 'chat', 'completions')),
    idempotency_key   text,
    request_sha256    text NOT NULL,
    prompt            text,
    messages          jsonb,
    max_tokens        integer NOT NULL CHECK (max_tokens > 0),
    status            text NOT NULL DEFAULT 'queued'
                      CHECK (status IN ('queued', 'running', 'completed', 'failed')),
    submitted_at      timestamptz NOT NULL DEFAULT now(),
    started_at        timestamptz,
    completed_at      timestamptz,
    booked_at         timestamptz,
    output_text       text,
    finish_reason     text,
    error             text,
    prompt_tokens     integer,
    completion_tokens integer,
    queue_ms          double precision,
    ttft_ms           double precision,
    e2e_ms            double precision,
    energy_j          numeric,
    meter             text,
    energy_estimated  boolean,
    cost              numeric,
    revenue           numeric,
    currency          text,
    UNIQUE (customer_id, idempotency_key)
);
CREATE INDEX requests_by_customer ON intake.requests (customer_id, submitted_at);

-- inspector: one verdict per request.
CREATE SCHEMA inspector;
SELECT public.tokenmill_create_inbox_and_outbox('inspector');

CREATE TABLE inspector.verdicts (
    request_id          text PRIMARY KEY,
    completion_event_id text NOT NULL,
    verdict             text NOT NULL CHECK (verdict IN ('pass', 'warn', 'defective')),
    signals             jsonb NOT NULL,
    event_id            text NOT NULL UNIQUE,
    created_at          timestamptz NOT NULL DEFAULT now()
);

-- ledger: the append-only event log, the price book and the per-request books.
CREATE SCHEMA ledger;
SELECT public.tokenmill_create_inbox_and_outbox('ledger');

CREATE TABLE ledger.events (
    seq          bigserial PRIMARY KEY,
    event_id     text NOT NULL UNIQUE,
    event_type   text NOT NULL,
    stream       text NOT NULL,
    customer_id  text NOT NULL,
    request_id   text NOT NULL,
    occurred_at  timestamptz NOT NULL,
    body         text NOT NULL,
    recorded_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX events_by_request ON ledger.events (request_id) WHERE request_id <> '';

CREATE FUNCTION ledger.refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger.% is append-only', TG_TABLE_NAME;
END $$;
CREATE TRIGGER events_append_only BEFORE UPDATE OR DELETE ON ledger.events
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();

-- Prices per million tokens, by tier and token class. A new price is a new row with a later
-- effective_from: past usage keeps the price that was in force when it was submitted.
CREATE TABLE ledger.price_book (
    version        text NOT NULL,
    tier           text NOT NULL CHECK (tier IN ('free', 'standard', 'premium')),
    token_class    text NOT NULL CHECK (token_class IN ('input', 'output')),
    price_per_mtok numeric NOT NULL CHECK (price_per_mtok >= 0),
    currency       text NOT NULL,
    effective_from timestamptz NOT NULL,
    PRIMARY KEY (tier, token_class, effective_from)
);

-- What a request costs to make: energy at the tariff times the facility's PUE, plus the
-- device's amortised cost per hour of compute.
CREATE TABLE ledger.cost_rates (
    version               text NOT NULL,
    device_class          text NOT NULL CHECK (device_class IN ('cpu', 'cuda')),
    energy_price_per_kwh  numeric NOT NULL CHECK (energy_price_per_kwh >= 0),
    pue                   numeric NOT NULL CHECK (pue >= 1),
    compute_price_per_hour numeric NOT NULL CHECK (compute_price_per_hour >= 0),
    currency              text NOT NULL,
    effective_from        timestamptz NOT NULL,
    PRIMARY KEY (device_class, effective_from)
);

CREATE TABLE ledger.request_usage (
    request_id          text PRIMARY KEY,
    completion_event_id text NOT NULL UNIQUE,
    customer_id         text NOT NULL,
    tier                text NOT NULL,
    region              text NOT NULL,
    model               text NOT NULL,
    device              text NOT NULL,
    prompt_tokens       integer NOT NULL CHECK (prompt_tokens >= 0),
    completion_tokens   integer NOT NULL CHECK (completion_tokens >= 0),
    energy_j            numeric NOT NULL CHECK (energy_j >= 0),
    meter               text NOT NULL,
    energy_estimated    boolean NOT NULL,
    compute_s           numeric NOT NULL CHECK (compute_s >= 0),
    energy_cost         numeric NOT NULL,
    compute_cost        numeric NOT NULL,
    cost                numeric NOT NULL,
    revenue             numeric NOT NULL,
    margin              numeric NOT NULL,
    currency            text NOT NULL,
    price_version       text NOT NULL,
    submitted_at        timestamptz NOT NULL,
    completed_at        timestamptz NOT NULL,
    booked_at           timestamptz NOT NULL DEFAULT now(),
    CHECK (cost = energy_cost + compute_cost),
    CHECK (margin = revenue - cost)
);
CREATE INDEX request_usage_by_customer ON ledger.request_usage (customer_id, submitted_at);

CREATE TABLE ledger.quality (
    request_id  text PRIMARY KEY,
    verdict     text NOT NULL,
    signals     jsonb NOT NULL,
    event_id    text NOT NULL UNIQUE,
    recorded_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE ledger.power_samples (
    event_id     text PRIMARY KEY,
    meter        text NOT NULL,
    device       text NOT NULL,
    estimated    boolean NOT NULL,
    window_start timestamptz NOT NULL,
    window_end   timestamptz NOT NULL CHECK (window_end >= window_start),
    energy_j     numeric NOT NULL CHECK (energy_j >= 0),
    power_w      numeric NOT NULL
);
