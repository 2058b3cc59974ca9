-- The launch price book and cost rates. Change prices by inserting rows with a later
-- effective_from in a new migration (or by an operator), never by editing these.
INSERT INTO ledger.price_book (version, tier, token_class, price_per_mtok, currency, effective_from) VALUES
    ('2026-01', 'free',     'input',     0,    'USD', '2026-01-01T00:00:00Z'),
    ('2026-01', 'free',     'output',    0,    'USD', '2026-01-01T00:00:00Z'),
    ('2026-01', 'standard', 'input',     0.50, 'USD', '2026-01-01T00:00:00Z'),
    ('2026-01', 'standard', 'output',    1.50, 'USD', '2026-01-01T00:00:00Z'),
    ('2026-01', 'premium',  'input',   250.00, 'USD', '2026-01-01T00:00:00Z'),
    ('2026-01', 'premium',  'output', 1000.00, 'USD', '2026-01-01T00:00:00Z');

-- Energy at $0.12/kWh; PUE 1.2 for a CPU host, 1.3 for a GPU hall; compute amortised at
-- $0.04/h for two CPU cores and $2.50/h for one data-centre GPU.
INSERT INTO ledger.cost_rates (version, device_class, energy_price_per_kwh, pue, compute_price_per_hour, currency, effective_from) VALUES
    ('2026-01', 'cpu',  0.12, 1.2, 0.04, 'USD', '2026-01-01T00:00:00Z'),
    ('2026-01', 'cuda', 0.12, 1.3, 2.50, 'USD', '2026-01-01T00:00:00Z');
