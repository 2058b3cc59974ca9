-- Energy in the books: tariffs with carbon intensity and time-of-use prices, each request's
-- energy price, PUE and carbon on its row, and the workers' energy intervals, whose idle and
-- unbilled joules are booked to the factory-overhead accounts of the journal.

-- Carbon intensity of the electricity a cost-rate version buys (g CO2e per kWh at the wall);
-- NULL where the operator does not know it.
ALTER TABLE ledger.cost_rates
    ADD COLUMN carbon_g_per_kwh numeric CHECK (carbon_g_per_kwh >= 0);

-- Time-of-use prices: within [hour_from, hour_to) UTC, a cost-rate version's energy price is
-- this one instead of its flat price. A version's hours do not overlap; hours none covers
-- keep the flat price. Append-only, like the version it refines.
CREATE TABLE ledger.tariff_hours (
    device_class         text NOT NULL,
    effective_from       timestamptz NOT NULL,
    hour_from            smallint NOT NULL CHECK (hour_from BETWEEN 0 AND 23),
    hour_to              smallint NOT NULL CHECK (hour_to BETWEEN 1 AND 24),
    energy_price_per_kwh numeric NOT NULL CHECK (energy_price_per_kwh >= 0),
    PRIMARY KEY (device_class, effective_from, hour_from),
    FOREIGN KEY (device_class, effective_from)
        REFERENCES ledger.cost_rates (device_class, effective_from),
    CHECK (hour_to > hour_from)
);
CREATE TRIGGER tariff_hours_append_only BEFORE UPDATE OR DELETE ON ledger.tariff_hours
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();

CREATE FUNCTION ledger.refuse_overlapping_hours() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM ledger.tariff_hours t
               WHERE t.device_class = NEW.device_class AND t.effective_from = NEW.effective_from
                 AND t.hour_from < NEW.hour_to AND NEW.hour_from < t.hour_to) THEN
        RAISE EXCEPTION 'tariff hours %-% overlap another window of % from %',
            NEW.hour_from, NEW.hour_to, NEW.device_class, NEW.effective_from;
    END IF;
    RETURN NEW;
END $$;
CREATE TRIGGER tariff_hours_do_not_overlap BEFORE INSERT ON ledger.tariff_hours
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_overlapping_hours();

-- What the request's energy was priced at (the time-of-use price of its submission hour), the
-- PUE applied, and its carbon (g CO2e at the wall). NULL on rows booked before this migration
-- and, for carbon, where the rates carry no intensity.
ALTER TABLE ledger.request_usage
    ADD COLUMN energy_price_per_kwh numeric CHECK (energy_price_per_kwh >= 0),
    ADD COLUMN pue numeric CHECK (pue >= 1),
    ADD COLUMN carbon_g numeric CHECK (carbon_g >= 0);

-- One row per worker energy interval (event id: a redelivery books nothing twice). Overhead
-- is the idle and unbilled joules, costed at the rates in force when the interval began, and
-- booked by the posting it names.
CREATE TABLE ledger.energy_intervals (
    event_id             text PRIMARY KEY,
    worker               text NOT NULL,
    region               text NOT NULL,
    meter                text NOT NULL,
    device               text NOT NULL,
    estimated            boolean NOT NULL,
    interval_start       timestamptz NOT NULL,
    interval_end         timestamptz NOT NULL CHECK (interval_end >= interval_start),
    metered_j            numeric NOT NULL CHECK (metered_j >= 0),
    attributed_j         numeric NOT NULL CHECK (attributed_j >= 0),
    idle_j               numeric NOT NULL CHECK (idle_j >= 0),
    -- Not bounded by attributed_j: a request cancelled now may have had its joules attributed
    -- in earlier intervals.
    unbilled_j           numeric NOT NULL CHECK (unbilled_j >= 0),
    tokens               bigint NOT NULL CHECK (tokens >= 0),
    steps                bigint NOT NULL CHECK (steps >= 0),
    rates_version        text NOT NULL,
    energy_price_per_kwh numeric NOT NULL,
    pue                  numeric NOT NULL,
    overhead_cost        numeric NOT NULL CHECK (overhead_cost >= 0),
    carbon_g             numeric CHECK (carbon_g >= 0),
    currency             text NOT NULL,
    posting_id           bigint,
    CHECK (metered_j = attributed_j + idle_j)
);
CREATE INDEX energy_intervals_by_start ON ledger.energy_intervals (interval_start);
CREATE TRIGGER energy_intervals_append_only BEFORE UPDATE OR DELETE ON ledger.energy_intervals
    FOR EACH ROW EXECUTE FUNCTION ledger.refuse_change();

-- The peak power between two of a telemetry window's readings (NULL from older telemetry).
ALTER TABLE ledger.power_samples ADD COLUMN power_w_max numeric;
