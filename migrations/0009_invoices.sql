-- Invoices and credit notes: per customer, billing period (a calendar month, UTC) and currency.
--
-- A draft exists from the period's first booked usage (or credit) on: the triggers below create
-- its row, and its lines are computed from ledger.request_usage and ledger.credits whenever it
-- is read, so a draft always shows the current books. Finalizing (tokenmill.ledger.invoices)
-- writes the lines and totals, takes the next number of a gapless series in the same
-- transaction, and from then on the database refuses any change to the invoice or its lines.
--
-- A credit is applied exactly once: ledger.credit_applications holds one row per credit,
-- naming the invoice or the credit note it went on. Credits of a period whose invoice is still
-- a draft show on the draft and are applied when it is finalized; credits that arrive after
-- that go on a credit note (its own gapless series) that references the invoice, which stays
-- as it was.
--
-- A request is billed exactly once: ledger.invoice_usage holds one row per billed request,
-- naming the invoice it went on, written by the finalization that put it there. Usage booked
-- after its period's invoice was finalized (or committed after the finalizer read the books)
-- is on no invoice yet: a new draft, a SUPPLEMENTARY invoice of the same customer and period,
-- collects it and is finalized like any other draft, with the next number of the same series
-- and a reference to the period's original invoice.

-- The billing period of a timestamp: the first day of its calendar month, UTC.
CREATE FUNCTION ledger.billing_period(at timestamptz) RETURNS date
LANGUAGE sql IMMUTABLE AS $$ SELECT date_trunc('month', at AT TIME ZONE 'UTC')::date $$;

CREATE TABLE ledger.invoices (
    invoice_id           text PRIMARY KEY DEFAULT 'inv_' || replace(gen_random_uuid()::text, '-', ''),
    customer_id          text NOT NULL,
    period               date NOT NULL CHECK (extract(day FROM period) = 1),
    currency             text NOT NULL,
    status               text NOT NULL DEFAULT 'draft' CHECK (status IN ('draft', 'finalized')),
    number               text UNIQUE,
    -- Set when finalized: the included quota (tokens of all classes) and the tokens used in
    -- the period, and the totals of the rounded lines.
    included_tokens      bigint,
    used_tokens          bigint,
    subtotal             numeric,
    credits_total        numeric,
    total                numeric,
    created_at           timestamptz NOT NULL DEFAULT now(),
    finalized_at         timestamptz,
    -- A supplementary invoice names the period's original invoice (set when it is finalized:
    -- a draft is a supplement exactly when its period already has a finalized invoice).
    supplement_of        text REFERENCES ledger.invoices,
    CHECK ((status = 'finalized') = (number IS NOT NULL)),
    CHECK (status = 'draft' OR (finalized_at IS NOT NULL AND total = subtotal + credits_total
                                AND included_tokens IS NOT NULL AND used_tokens IS NOT NULL))
);
CREATE INDEX invoices_by_period ON ledger.invoices (period, status);
-- At most one draft per customer, period and currency (the one new usage goes on), and one
-- original invoice; any number of finalized supplements.
CREATE UNIQUE INDEX invoices_one_draft ON ledger.invoices (customer_id, period, currency)
    WHERE status = 'draft';
CREATE UNIQUE INDEX invoices_one_original ON ledger.invoices (customer_id, period, currency)
    WHERE status = 'finalized' AND supplement_of IS NULL;

-- Which invoice each request's usage went on. Marking the rows, rather than a watermark on
-- booked_at or seq, is what makes this exact: a booking transaction may commit after the
-- finalizer read the books with an earlier timestamp or sequence number, and a watermark would
-- then skip it for good; here a row the finalizer did not see is simply not marked, and the
-- next draft of its period collects it. The primary key makes a second billing fail.
-- No foreign keys: a month's finalization writes a row per request (a million), and checking
-- two references per row took most of its time; the rows are written only by finalization,
-- from usage rows and a draft it has just read and locked, and all three tables are
-- append-only once finalized, so the references cannot break.
CREATE TABLE ledger.invoice_usage (
    request_id text PRIMARY KEY,
    invoice_id text NOT NULL
);

-- The lines of a finalized invoice, each amount rounded to the cent (ROUND_HALF_EVEN) from
-- the exact amount beside it. A usage line is one model, tier, plan version and token class;
-- a credit line is one reason, negative.
CREATE TABLE ledger.invoice_lines (
    invoice_id     text NOT NULL REFERENCES ledger.invoices,
    line_no        integer NOT NULL CHECK (line_no >= 1),
    kind           text NOT NULL CHECK (kind IN ('usage', 'credit')),
    model          text,
    tier           text,
    plan_id        text,
    plan_version   text,
    token_class    text CHECK (token_class IN ('input', 'cached_input', 'output')),
    reason         text,
    requests       bigint NOT NULL CHECK (requests >= 0),
    tokens         bigint NOT NULL CHECK (tokens >= 0),
    charged_tokens bigint NOT NULL CHECK (charged_tokens >= 0),
    amount_exact   numeric NOT NULL,
    amount         numeric NOT NULL CHECK (amount = round(amount, 2)),
    PRIMARY KEY (invoice_id, line_no),
    CHECK ((kind = 'usage') = (token_class IS NOT NULL AND reason IS NULL))
);

CREATE TABLE ledger.credit_notes (
    credit_note_id text PRIMARY KEY DEFAULT 'cn_' || replace(gen_random_uuid()::text, '-', ''),
    number         text NOT NULL UNIQUE,
    invoice_id     text NOT NULL REFERENCES ledger.invoices,
    customer_id    text NOT NULL,
    currency       text NOT NULL,
    -- A credit of less than half a cent rounds to a 0.00 line, and its note to 0.00: issued
    -- all the same, so that the credit is on a document (and never swept again).
    total          numeric NOT NULL CHECK (total <= 0),
    issued_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX credit_notes_by_invoice ON ledger.credit_notes (invoice_id);

CREATE TABLE ledger.credit_note_lines (
    credit_note_id text NOT NULL REFERENCES ledger.credit_notes,
    line_no        integer NOT NULL CHECK (line_no >= 1),
    reason         text NOT NULL,
    requests       bigint NOT NULL CHECK (requests >= 0),
    amount_exact   numeric NOT NULL CHECK (amount_exact < 0),
    amount         numeric NOT NULL CHECK (amount = round(amount, 2)),
    PRIMARY KEY (credit_note_id, line_no)
);

-- Each credit goes on exactly one document: the primary key makes a second application fail.
CREATE TABLE ledger.credit_applications (
    credit_id      text PRIMARY KEY REFERENCES ledger.credits,
    invoice_id     text REFERENCES ledger.invoices,
    credit_note_id text REFERENCES ledger.credit_notes,
    CHECK (num_nonnulls(invoice_id, credit_note_id) = 1)
);

-- The last number of each series ("TM-2026", "CN-2026"). Finalizing locks its series' row
-- until commit, so numbers are taken in commit order and a rolled-back finalization gives its
-- numbers back: no gaps, which a sequence could not promise.
CREATE TABLE ledger.document_counters (
    series  text PRIMARY KEY,
    last_no bigint NOT NULL CHECK (last_no >= 0)
);

-- A credit belongs to the period of the request it credits (of its own arrival when the
-- request is not booked, e.g. goodwill), fixed when it is written so that it never moves.
ALTER TABLE ledger.credits ADD COLUMN period date;

CREATE FUNCTION ledger.credit_period() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.period := coalesce(
        (SELECT ledger.billing_period(u.submitted_at) FROM ledger.request_usage u
         WHERE u.request_id = NEW.request_id),
        ledger.billing_period(NEW.created_at));
    RETURN NEW;
END $$;
CREATE TRIGGER credits_period BEFORE INSERT ON ledger.credits
    FOR EACH ROW EXECUTE FUNCTION ledger.credit_period();
-- Credits written before this release get theirs once, past the append-only trigger.
ALTER TABLE ledger.credits DISABLE TRIGGER credits_append_only;
UPDATE ledger.credits c SET period = ledger.billing_period(coalesce(
    (SELECT u.submitted_at FROM ledger.request_usage u WHERE u.request_id = c.request_id),
    c.created_at));
ALTER TABLE ledger.credits ENABLE TRIGGER credits_append_only;
ALTER TABLE ledger.credits ALTER COLUMN period SET NOT NULL;
CREATE INDEX credits_by_period ON ledger.credits (period, customer_id);

-- Drafts appear with the period's first usage or credit, and a supplementary draft with
-- usage booked after the period's invoice was finalized. Statement-level, over the inserted
-- rows: a booking batch of thousands of rows costs one INSERT here, not one per row. (A
-- booking that commits after a finalizer read the books, while the draft it found was being
-- finalized, gets its supplementary draft from the next `invoices issue`, which opens drafts
-- for every unbilled request of the period first.)
CREATE FUNCTION ledger.open_drafts_for_usage() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger.invoices (customer_id, period, currency)
    SELECT DISTINCT customer_id, ledger.billing_period(submitted_at), currency FROM booked
    ON CONFLICT (customer_id, period, currency) WHERE status = 'draft' DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER request_usage_opens_draft AFTER INSERT ON ledger.request_usage
    REFERENCING NEW TABLE AS booked
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.open_drafts_for_usage();

-- A credit opens a draft only for a period with no invoice yet: one arriving later goes on a
-- credit note for the original invoice, never on a supplement.
CREATE FUNCTION ledger.open_drafts_for_credits() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO ledger.invoices (customer_id, period, currency)
    SELECT DISTINCT b.customer_id, b.period, b.currency FROM booked b
    WHERE NOT EXISTS (SELECT 1 FROM ledger.invoices i WHERE i.customer_id = b.customer_id
                      AND i.period = b.period AND i.currency = b.currency)
    ON CONFLICT (customer_id, period, currency) WHERE status = 'draft' DO NOTHING;
    RETURN NULL;
END $$;
CREATE TRIGGER credits_open_draft AFTER INSERT ON ledger.credits
    REFERENCING NEW TABLE AS booked
    FOR EACH STATEMENT EXECUTE FUNCTION ledger.open_drafts_for_credits();

-- A finalized invoice is the record of what was billed: never changed, never deleted. A draft
-- may only become finalized (and carries nothing else that could change).
CREATE FUNCTION ledger.refuse_finalized_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF OLD.status = 'finalized' THEN
        RAISE EXCEPTION 'invoice % (%) is finalized and cannot be changed', OLD.number,
            OLD.invoice_id USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN CASE TG_OP WHEN 'DELETE' THEN OLD ELSE NEW END;
END $$;
CREATE TRIGGER invoices_immutable_when_finalized BEFORE UPDATE OR DELETE ON ledger.invoices
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_finalized_change();

-- Lines are written once, while their invoice is a draft being finalized in the same
-- transaction; after that none can be added, changed or removed.
CREATE FUNCTION ledger.refuse_line_on_finalized() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF (SELECT status FROM ledger.invoices WHERE invoice_id = NEW.invoice_id) = 'finalized' THEN
        RAISE EXCEPTION 'invoice % is finalized: no lines can be added', NEW.invoice_id
            USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER invoice_lines_only_on_drafts BEFORE INSERT ON ledger.invoice_lines
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_line_on_finalized();
CREATE TRIGGER invoice_lines_append_only BEFORE UPDATE OR DELETE ON ledger.invoice_lines
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER credit_notes_append_only BEFORE UPDATE OR DELETE ON ledger.credit_notes
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER credit_note_lines_append_only BEFORE UPDATE OR DELETE ON ledger.credit_note_lines
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER credit_applications_append_only BEFORE UPDATE OR DELETE
    ON ledger.credit_applications FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();
CREATE TRIGGER invoice_usage_append_only BEFORE UPDATE OR DELETE
    ON ledger.invoice_usage FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();

-- The rounding rule, checked at commit: a finalized invoice's total is the sum of its rounded
-- lines (the total itself is never rounded), and so is a credit note's.
CREATE FUNCTION ledger.check_document_total() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    lines_sum numeric;
BEGIN
    IF TG_TABLE_NAME = 'invoices' THEN
        IF NEW.status <> 'finalized' THEN
            RETURN NULL;
        END IF;
        SELECT coalesce(sum(amount), 0) INTO lines_sum FROM ledger.invoice_lines
        WHERE invoice_id = NEW.invoice_id;
    ELSE
        SELECT coalesce(sum(amount), 0) INTO lines_sum FROM ledger.credit_note_lines
        WHERE credit_note_id = NEW.credit_note_id;
    END IF;
    IF lines_sum <> NEW.total THEN
        RAISE EXCEPTION '% % total % is not the sum of its lines %', TG_TABLE_NAME, NEW.number,
            NEW.total, lines_sum USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NULL;
END $$;
CREATE CONSTRAINT TRIGGER invoices_total_is_sum_of_lines AFTER UPDATE ON ledger.invoices
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger.check_document_total();
CREATE CONSTRAINT TRIGGER credit_notes_total_is_sum_of_lines AFTER INSERT ON ledger.credit_notes
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION ledger.check_document_total();

-- Reports read a period's usage; the customer index serves invoices, this one the factory.
CREATE INDEX request_usage_by_submitted ON ledger.request_usage (submitted_at);
