-- Admission: what the intake lets a customer spend before anything is queued.
--
-- Each customer has one admission balance. A request is admitted by one UPDATE of that row
-- that checks the worst case fits and holds it (see intake/admission.py), in the statement
-- that records the request; the booking later settles the actual charge and releases the
-- hold, a failed job releases it. The ledger's journal is the book of record; `tokenmill
-- budgets reconcile` compares the two.
--
-- Customers with neither a monthly budget nor prepaid credit, on a plan that charges past its
-- included quota, are postpaid: never held, never refused for money.

ALTER TABLE intake.customers ADD COLUMN suspended_at timestamptz;

CREATE TABLE intake.admission_balances (
    customer_id        text PRIMARY KEY REFERENCES intake.customers,
    currency           text NOT NULL DEFAULT 'USD' CHECK (currency ~ '^[A-Z]{3}$'),
    -- NULL: no monthly budget. Spent this period = period_held + period_settled.
    monthly_budget     numeric CHECK (monthly_budget >= 0),
    -- NULL: no prepaid credit. What is left of the top-ups after every settled charge (any
    -- period); it may go below zero only if a booking ever charged more than its hold.
    prepaid_balance    numeric,
    -- Outstanding holds of every period (they count against prepaid credit).
    held               numeric NOT NULL DEFAULT 0 CHECK (held >= 0),
    -- The billing period (first day of the calendar month, UTC) the period_ columns count;
    -- the first admission or settlement of a later period starts them again from zero.
    period             date NOT NULL DEFAULT date_trunc('month', now() AT TIME ZONE 'UTC'),
    period_held        numeric NOT NULL DEFAULT 0 CHECK (period_held >= 0),
    period_settled     numeric NOT NULL DEFAULT 0,
    -- Tokens against the plan's included quota (plans whose quota_policy is "refuse").
    period_tokens_held bigint NOT NULL DEFAULT 0 CHECK (period_tokens_held >= 0),
    period_tokens_used bigint NOT NULL DEFAULT 0 CHECK (period_tokens_used >= 0),
    updated_at         timestamptz NOT NULL DEFAULT now()
);
INSERT INTO intake.admission_balances (customer_id)
SELECT customer_id FROM intake.customers;

-- What each request holds: NULL for a postpaid customer's request. hold_state goes from
-- 'held' to 'settled' (booked) or 'released' (failed), once.
ALTER TABLE intake.requests
    ADD COLUMN hold_amount numeric CHECK (hold_amount >= 0),
    ADD COLUMN hold_tokens bigint CHECK (hold_tokens >= 0),
    ADD COLUMN hold_state  text CHECK (hold_state IN ('held', 'settled', 'released')),
    ADD CONSTRAINT hold_is_whole CHECK ((hold_amount IS NULL) = (hold_state IS NULL));

-- Prepaid top-ups as the intake recorded them; event_id is the PrepaidCreditAdded it queued
-- in the same transaction, so the ledger's log can be compared with this.
CREATE TABLE intake.prepaid_topups (
    event_id    text PRIMARY KEY,
    customer_id text NOT NULL REFERENCES intake.customers,
    amount      numeric NOT NULL CHECK (amount > 0 AND amount = round(amount, 2)),
    currency    text NOT NULL,
    reference   text NOT NULL DEFAULT '',
    created_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX prepaid_topups_by_customer ON intake.prepaid_topups (customer_id, created_at);

-- Raised by the admission statement when the request's hold does not fit: the whole
-- statement (request row, outbox row, hold) is undone. SQLSTATE TM402: refused for money.
CREATE FUNCTION intake.refuse_admission(customer text) RETURNS boolean
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'admission refused for %', customer USING ERRCODE = 'TM402';
END $$;
