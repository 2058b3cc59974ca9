-- The ledger logs its latency-objective policy (event type ledger.slo_policy) when it starts
-- with one other than the last logged, and a replay reads the one in force before each stage:
-- both look for the last such event, which this index finds without scanning the log.
CREATE INDEX events_slo_policies ON ledger.events (seq) WHERE event_type = 'ledger.slo_policy';
