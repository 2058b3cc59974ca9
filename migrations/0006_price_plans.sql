-- Price plans: what a customer pays, by token class, with versions, effective dates, a monthly
-- included quota and graduated or volume bands over a billing period (a calendar month, UTC).
--
-- A plan is a name: "tier:free", "tier:standard" and "tier:premium" are the tiers' public
-- plans; any other name is a negotiated plan that ledger.customer_plans assigns to customers,
-- overriding their tier's. Each version of a plan is a row of ledger.price_plans with its own
-- effective_from; a new price is a new version, so usage keeps the version that was in force
-- when it was submitted and a price change never reprices the past.
--
-- Bands (Stripe's tiers_mode): each token class has one or more bands, ordered by band_no, each
-- up to `up_to_tokens` tokens of that class in the period (NULL: no limit, the last band).
-- "graduated" prices each band's tokens at that band's rate; "volume" prices all of the
-- period's tokens at the rate of the band the period's total reaches.
--
-- The included quota is a number of tokens (all classes together) per period that are not
-- charged; a request's tokens use up what is left of it in the order input, cached input,
-- output, and only the rest are rated by the bands. quota_policy "refuse" (the free tier's)
-- means requests past the quota are refused at admission with 402; "charge" means the bands
-- price them.
CREATE TABLE ledger.price_plans (
    plan_id                 text NOT NULL CHECK (plan_id ~ '^[a-z0-9][a-z0-9:._-]{0,63}$'),
    version                 text NOT NULL CHECK (length(version) BETWEEN 1 AND 64),
    effective_from          timestamptz NOT NULL,
    currency                text NOT NULL CHECK (currency ~ '^[A-Z]{3}$'),
    tiers_mode              text NOT NULL CHECK (tiers_mode IN ('graduated', 'volume')),
    included_tokens_monthly bigint NOT NULL DEFAULT 0 CHECK (included_tokens_monthly >= 0),
    quota_policy            text NOT NULL DEFAULT 'charge'
                            CHECK (quota_policy IN ('charge', 'refuse')),
    created_at              timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (plan_id, effective_from),
    UNIQUE (plan_id, version)
);

CREATE TABLE ledger.price_bands (
    plan_id        text NOT NULL,
    effective_from timestamptz NOT NULL,
    token_class    text NOT NULL CHECK (token_class IN ('input', 'cached_input', 'output')),
    band_no        smallint NOT NULL CHECK (band_no BETWEEN 1 AND 16),
    up_to_tokens   bigint CHECK (up_to_tokens > 0),
    price_per_mtok numeric NOT NULL CHECK (price_per_mtok >= 0),
    PRIMARY KEY (plan_id, effective_from, token_class, band_no),
    FOREIGN KEY (plan_id, effective_from) REFERENCES ledger.price_plans
);

-- At commit, a plan version prices every token class: a version without bands for one of them
-- could neither rate a request nor be listed.
CREATE FUNCTION ledger.check_plan_priced() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT count(DISTINCT token_class) FROM ledger.price_bands
        WHERE plan_id = NEW.plan_id AND effective_from = NEW.effective_from) < 3 THEN
        RAISE EXCEPTION 'ledger.price_plans: % from % has no bands for every token class',
            NEW.plan_id, NEW.effective_from USING ERRCODE = 'check_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER price_plans_priced AFTER INSERT ON ledger.price_plans
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION ledger.check_plan_priced();

-- A plan version and its bands are the record of what was charged: never changed afterwards.
CREATE TRIGGER price_plans_append_only BEFORE UPDATE OR DELETE ON ledger.price_plans
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER price_bands_append_only BEFORE UPDATE OR DELETE ON ledger.price_bands
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();

-- Negotiated plans: from effective_from on, the customer pays `plan_id` instead of its tier's
-- plan (plan_id NULL goes back to the tier's). History is kept, like prices.
CREATE TABLE ledger.customer_plans (
    customer_id    text NOT NULL,
    effective_from timestamptz NOT NULL,
    plan_id        text,
    created_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (customer_id, effective_from)
);

-- The plan a customer of `tier` pays at `at`: its negotiated plan if one is in force, else its
-- tier's. The ledger rates bookings with it and the intake prices admission holds with it.
CREATE FUNCTION ledger.plan_for(customer text, tier text, at timestamptz) RETURNS text
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        (SELECT cp.plan_id FROM ledger.customer_plans cp
         WHERE cp.customer_id = customer AND cp.effective_from <= at
         ORDER BY cp.effective_from DESC LIMIT 1),
        'tier:' || tier)
$$;

-- The version of `plan` in force at `at`, and per token class the highest band price: the
-- worst case an admission hold must cover, whatever the period's usage so far.
CREATE FUNCTION ledger.plan_at(plan text, at timestamptz) RETURNS TABLE (
    plan_id text, version text, effective_from timestamptz, currency text, tiers_mode text,
    included_tokens_monthly bigint, quota_policy text, input_per_mtok_max numeric,
    cached_input_per_mtok_max numeric, output_per_mtok_max numeric)
LANGUAGE sql STABLE AS $$
    SELECT p.plan_id, p.version, p.effective_from, p.currency, p.tiers_mode,
           p.included_tokens_monthly, p.quota_policy,
           (SELECT max(b.price_per_mtok) FROM ledger.price_bands b WHERE b.plan_id = p.plan_id
              AND b.effective_from = p.effective_from AND b.token_class = 'input'),
           (SELECT max(b.price_per_mtok) FROM ledger.price_bands b WHERE b.plan_id = p.plan_id
              AND b.effective_from = p.effective_from AND b.token_class = 'cached_input'),
           (SELECT max(b.price_per_mtok) FROM ledger.price_bands b WHERE b.plan_id = p.plan_id
              AND b.effective_from = p.effective_from AND b.token_class = 'output')
    FROM ledger.price_plans p
    WHERE p.plan_id = plan AND p.effective_from <= at
    ORDER BY p.effective_from DESC LIMIT 1
$$;

-- The launch plans, at the prices of the 2026-01 price book (0002), with cached input at half
-- the input price. The free tier includes 100,000 tokens a month and refuses past them.
INSERT INTO ledger.price_plans (plan_id, version, effective_from, currency, tiers_mode,
                                included_tokens_monthly, quota_policy) VALUES
    ('tier:free',     '2026-01', '2026-01-01T00:00:00Z', 'USD', 'graduated', 100000, 'refuse'),
    ('tier:standard', '2026-01', '2026-01-01T00:00:00Z', 'USD', 'graduated', 0, 'charge'),
    ('tier:premium',  '2026-01', '2026-01-01T00:00:00Z', 'USD', 'graduated', 0, 'charge');
INSERT INTO ledger.price_bands (plan_id, effective_from, token_class, band_no, up_to_tokens,
                                price_per_mtok) VALUES
    ('tier:free',     '2026-01-01T00:00:00Z', 'input',        1, NULL,    0),
    ('tier:free',     '2026-01-01T00:00:00Z', 'cached_input', 1, NULL,    0),
    ('tier:free',     '2026-01-01T00:00:00Z', 'output',       1, NULL,    0),
    ('tier:standard', '2026-01-01T00:00:00Z', 'input',        1, NULL,    0.50),
    ('tier:standard', '2026-01-01T00:00:00Z', 'cached_input', 1, NULL,    0.25),
    ('tier:standard', '2026-01-01T00:00:00Z', 'output',       1, NULL,    1.50),
    ('tier:premium',  '2026-01-01T00:00:00Z', 'input',        1, NULL,  250.00),
    ('tier:premium',  '2026-01-01T00:00:00Z', 'cached_input', 1, NULL,  125.00),
    ('tier:premium',  '2026-01-01T00:00:00Z', 'output',       1, NULL, 1000.00);

-- Credits given back to a customer, each for one reason: a defective output ("defective"), a
-- missed latency objective ("slo_ttft", "slo_e2e"), or an operator's goodwill credit. At most
-- one credit per request and reason, whatever order or how often the events arrive.
CREATE TABLE ledger.credits (
    credit_id   text PRIMARY KEY,
    customer_id text NOT NULL,
    request_id  text,
    reason      text NOT NULL CHECK (reason IN ('defective', 'slo_ttft', 'slo_e2e', 'goodwill')),
    amount      numeric NOT NULL CHECK (amount > 0),
    currency    text NOT NULL,
    event_id    text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    UNIQUE (request_id, reason)
);
CREATE INDEX credits_by_customer ON ledger.credits (customer_id, created_at);
CREATE TRIGGER credits_append_only BEFORE UPDATE OR DELETE ON ledger.credits
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();

-- The cached part of each request's prompt, billed at the cached-input price.
ALTER TABLE ledger.request_usage
    ADD COLUMN cached_prompt_tokens integer NOT NULL DEFAULT 0 CHECK (cached_prompt_tokens >= 0);

-- Each request's rating, by token class: the plan version it was rated under, the tokens past
-- the included quota, and what each class earned (revenue is their sum). Invoices build their
-- lines from these. Rows booked before this release are split at the 2026-01 price book's
-- input price, the only one they could have been rated at.
ALTER TABLE ledger.request_usage
    ADD COLUMN plan_id text,
    ADD COLUMN plan_version text,
    ADD COLUMN charged_input_tokens integer NOT NULL DEFAULT 0 CHECK (charged_input_tokens >= 0),
    ADD COLUMN charged_cached_input_tokens integer NOT NULL DEFAULT 0
        CHECK (charged_cached_input_tokens >= 0),
    ADD COLUMN charged_output_tokens integer NOT NULL DEFAULT 0 CHECK (charged_output_tokens >= 0),
    ADD COLUMN revenue_input numeric NOT NULL DEFAULT 0,
    ADD COLUMN revenue_cached_input numeric NOT NULL DEFAULT 0,
    ADD COLUMN revenue_output numeric NOT NULL DEFAULT 0;
UPDATE ledger.request_usage u SET
    plan_id = 'tier:' || u.tier,
    plan_version = '2026-01',
    charged_input_tokens = u.prompt_tokens,
    charged_output_tokens = u.completion_tokens,
    revenue_input = round(u.prompt_tokens * p.price_per_mtok / 1000000, 12),
    revenue_output = u.revenue - round(u.prompt_tokens * p.price_per_mtok / 1000000, 12)
FROM ledger.price_book p
WHERE p.tier = u.tier AND p.token_class = 'input' AND p.version = '2026-01';
ALTER TABLE ledger.request_usage ADD CONSTRAINT revenue_is_its_classes
    CHECK (revenue = revenue_input + revenue_cached_input + revenue_output);
