"""One settings object for every service, read from the environment once and passed down."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field, fields
from pathlib import Path

ENV_PREFIX = "TOKENMILL_"


def _default_data_dir() -> str:
    return str(Path.home() / ".tokenmill")


def _default_consumer() -> str:
    # Unique per process, so two services or two workers on one host never share a pending
    # list. A dead consumer's entries are reclaimed by idle time, whatever its name was.
    return f"{os.environ.get('HOSTNAME') or socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Settings:
    """Every knob of the platform. Field `x` is read from `TOKENMILL_X`."""

    # Empty URLs mean: start the embedded PostgreSQL and Redis under `data_dir`.
    database_url: str = ""
    redis_url: str = ""
    data_dir: str = field(default_factory=_default_data_dir)
    # Every stream, group and key name starts with this, so two deployments (or two test
    # runs) can share one Redis without seeing each other's traffic.
    stream_prefix: str = "tm"
    region: str = "eu-west"
    consumer: str = field(default_factory=_default_consumer)

    http_host: str = "127.0.0.1"
    http_port: int = 8000

    model: str = "smollm2"
    model_cache_dir: str = ""
    device: str = "auto"
    max_prompt_chars: int = 32_000
    max_tokens_limit: int = 2048
    chat_wait_s: float = 120.0

    # Delivery limits: an entry idle this long is reclaimed from a dead consumer, and one
    # delivered this many times goes to the dead-letter stream instead of being retried.
    claim_idle_ms: int = 30_000
    max_deliveries: int = 5
    read_batch_max: int = 16
    # Consumers with nothing pending and idle this long are removed from their groups.
    consumer_idle_prune_ms: int = 3_600_000
    outbox_batch_max: int = 100
    outbox_poll_s: float = 1.0

    # How long a stopping service waits for the messages in hand: a worker finishes its job.
    graceful_timeout_s: float = 60.0

    meter: str = "auto"
    cpu_tdp_w: float = 65.0
    cpu_idle_w: float = 10.0
    rapl_root: str = "/sys/class/powercap"
    # Telemetry reads its meter this often and publishes one PowerSample per device per
    # interval (the window's energy, mean and peak power): 1 s aggregates in the event log.
    power_read_hz: float = 10.0
    power_sample_interval_s: float = 1.0
    # A worker publishes its energy account (metered, attributed, idle J) once per interval.
    energy_interval_s: float = 10.0

    db_pool_min: int = 1
    db_pool_max: int = 10

    # The reconciler, which republishes outbox events whose stream entries Redis
    # lost (its AOF is fsynced once a second, so a machine crash loses the last second). Every
    # interval it checks up to a batch of rows published more than `reconcile_after_s` ago;
    # inspector and ledger rows only within the last `reconcile_window_s`, intake job events
    # for as long as their request is queued.
    reconcile_interval_s: float = 10.0
    reconcile_after_s: float = 30.0
    reconcile_window_s: float = 3600.0
    reconcile_batch_max: int = 100

    # Event signing keys, "kid:secret[,kid:secret...]": the first
    # signs every published event, all of them verify (so keys rotate without a gap). `up`
    # creates one in the data dir when none is configured; `serve` refuses to run without.
    signing_keys: str = ""
    # A delivery that failed because our storage was unreachable is not counted against
    # max_deliveries; its consumer pauses between such failures, doubling from the least to the
    # most, and logs the outage at most once per interval while it lasts.
    outage_backoff_s_min: float = 0.2
    outage_backoff_s_max: float = 10.0
    outage_log_interval_s: float = 60.0
    # An HTTP request the intake cannot serve because its storage is unreachable is answered
    # 503 with this Retry-After (seconds), as long as the outage lasts.
    outage_retry_after_s: int = 2

    # Supervision by `tokenmill up`. A service or embedded server that keeps exiting is not
    # restarted for ever: past this many restarts of one of them in a minute `up` stops
    # everything and says which one failed.
    restarts_per_minute_max: int = 5
    # `up` stops in order, each step bounded so that a stuck process cannot hold the others:
    # intake first (it answers 503 while it drains its requests), then the worker (it finishes
    # or hands back its job within graceful_timeout_s, so this is longer), then the other
    # consumers, and the embedded Redis and Postgres last, once nothing uses them.
    stop_intake_s_max: float = 60.0
    stop_worker_s_max: float = 75.0
    stop_consumers_s_max: float = 15.0
    stop_servers_s_max: float = 30.0
    # How long an embedded server may take to start (Postgres replays its WAL after a crash),
    # and how long a command waits for a data dir that another command is using or whose
    # `up` is still starting its servers.
    embedded_start_s_max: float = 120.0
    data_dir_wait_s_max: float = 120.0

    # What one request may carry, so that no client can make the intake parse, store or queue
    # without bound: stop strings and messages are kept for ever in the append-only event log.
    # A body over `request_body_bytes_max` is refused with 413 as it is read, whatever its
    # Content-Length claims; the counts and lengths below are refused with 400. A prompt must
    # also leave room for max_tokens in the model's context, counted in the model's own tokens.
    request_body_bytes_max: int = 1_048_576
    request_messages_max: int = 256
    request_stop_sequences_max: int = 4
    request_stop_chars_max: int = 256
    # The intake exports a GGUF model's tokenizer once into the model cache, in a child process
    # that imports transformers (about a minute on two busy cores); past this it gives up.
    tokenizer_export_timeout_s: float = 600.0

    # API keys. A revoked key is refused within `key_revocation_s_max` on every intake process:
    # each listens for key changes and confirms its listener twice per that time, and trusts a
    # cached key no longer than that while the listener is down. A key not found is remembered
    # as unknown for `key_unknown_ttl_s` (a new key works within it, at once while listening),
    # so a flood of bad keys does not cost a lookup each; each cache holds at most
    # `key_cache_size_max` keys.
    key_revocation_s_max: float = 1.0
    key_unknown_ttl_s: float = 0.5
    key_cache_size_max: int = 10_000

    # Probes. `/readyz` gives Postgres and Redis `probe_timeout_s` each to answer (a `/metrics`
    # scrape gets it too), and needs
    # `ready_workers_min` live workers of its region (0 where workers scale from zero, as with
    # KEDA: an intake out of rotation would never queue the job that wakes one). A worker with
    # its model loaded refreshes its heartbeat every interval; it expires after the TTL.
    probe_timeout_s: float = 0.5
    ready_workers_min: int = 1
    worker_heartbeat_interval_s: float = 5.0
    worker_heartbeat_ttl_s: float = 15.0
    # On SIGTERM the intake drains: new requests get 503 with Retry-After (seconds), requests in
    # flight get up to `drain_timeout_s` to be answered (past it, a 504), then it exits.
    drain_timeout_s: float = 30.0
    drain_retry_after_s: int = 2

    # The operator's credential for the admin API (/admin/v1: customers, keys, prices, budgets,
    # credits, invoices, reports), never a customer key. `up` creates one in the data dir
    # (admin.token) when none is configured; an intake without one answers 403 on admin routes.
    admin_token: str = ""

    # The journal (issue 5). The ledger books completions in batches of up to
    # `ledger_batch_max` stream entries per transaction: one event per transaction cannot keep
    # up with a factory's completions. A batch that fails is retried one entry at a time, so
    # one bad entry never holds back its neighbours.
    ledger_batch_max: int = 1000
    # Latency objectives per tier: a booked completion whose time to first token exceeded its
    # tier's objective is credited that share of its charge, once (reason slo_ttft). 0 ms means
    # the tier has no objective. Shares are exact decimals, written as strings.
    slo_ttft_ms_premium: float = 2000.0
    slo_ttft_credit_share_premium: str = "0.10"
    slo_ttft_ms_standard: float = 10000.0
    slo_ttft_credit_share_standard: str = "0.05"
    # The worker's batching engine. Its KV cache is preallocated once, `engine_kv_cache_mib` in
    # all, in blocks of `engine_block_size` positions (SmolLM2-135M in float32 needs 45 KiB a
    # position, so 256 MiB holds about 5,800 positions). Each step runs at most
    # `engine_step_tokens_max` tokens (decodes first, the rest prompt chunks) for at most
    # `engine_running_max` requests; `engine_waiting_max` more wait in the engine, and beyond
    # that the worker stops reading its stream, so further jobs wait in Redis. Prefix caching
    # (1 on, 0 off) reuses the KV of prompt prefixes seen before.
    engine_kv_cache_mib: int = 256
    engine_block_size: int = 16
    # A premium request that arrives waits out the step in progress and then shares a step with
    # every running decode, so the step's length bounds its time to first token. On a CPU a
    # step costs about its tokens: 64 (32 decodes and a prompt chunk) kept premium TTFT p99
    # under a free-tier flood within 1.3x of an idle worker's, where 256 gave 5.6x, at the same
    # throughput (bench/engine.py). On a GPU, where a step's cost hardly grows with its tokens,
    # raise it (vLLM uses 2048 and more).
    engine_step_tokens_max: int = 64
    engine_running_max: int = 32
    engine_waiting_max: int = 32
    engine_prefix_caching: int = 1
    # Intra-op threads of the worker's torch; 0 keeps torch's default (every core). Several
    # workers on one host (`up --workers N`) each take every core by default and then wait on
    # each other; give each about cores / N.
    engine_torch_threads: int = 0
    # The audit trail (services/tokenmill/ledger/chain.py). The ledger seals logged events into
    # the hash chain every `audit_seal_interval_s`, at most `audit_seal_batch_max` per
    # transaction (a bounded lock hold and memory), and signs a checkpoint of the chain's head
    # every `audit_checkpoint_interval_s` when it has moved, with the Ed25519 key in
    # `audit_key_file` (hex seed; `up` creates data_dir/audit.key). Without a readable key the
    # ledger still seals, and checkpoints are signed by whoever holds the key
    # (`tokenmill audit checkpoint`). `audit_verify_fetch_rows` is how many rows verify reads
    # per round trip.
    audit_seal_interval_s: float = 1.0
    audit_seal_batch_max: int = 5000
    audit_checkpoint_interval_s: float = 3600.0
    audit_key_file: str = ""
    audit_verify_fetch_rows: int = 50_000
    # Retention of the Redis streams and of the outbox and inbox tables (libs/tokenmill/
    # retention.py), applied by the ledger every `retention_interval_s` and by
    # `tokenmill streams trim`. A stream keeps at least `stream_keep_entries_min` entries and
    # everything younger than `stream_keep_s`, and never loses an entry some group has not
    # acknowledged or the ledger has not archived; `stream_keep` overrides both per stream
    # ("name=entries:seconds,..." with the name after the prefix, e.g. "booked=1000:86400").
    # Published outbox rows are kept `outbox_keep_s`, inbox event ids `inbox_keep_s` (longer
    # than any redelivery: the reconciler republishes within reconcile_window_s).
    retention_interval_s: float = 300.0
    stream_keep_entries_min: int = 10_000
    stream_keep_s: float = 86_400.0
    stream_keep: str = ""
    outbox_keep_s: float = 7 * 86_400.0
    inbox_keep_s: float = 7 * 86_400.0
    retention_batch_max: int = 10_000
    # Invoices and reports (tokenmill.ledger.invoices, .reports). A period is invoiced only once
    # it is over and its last requests have had `invoice_grace_s` to be booked: a request
    # submitted at 23:59 on the last day belongs to that period, and usage booked after its
    # invoice is final would not be on it. Drafts are finalized `invoice_batch_size` per
    # transaction (a run of customers, read in one pass over their usage): the numbering
    # counter stays locked for one batch (about a second per 1,000 customers) and a crash
    # redoes at most one batch. Listings, reports and /v1/usage groups return at most so many
    # rows (more groups is a 400 asking for a narrower range, never a silently cut answer).
    invoice_grace_s: float = 3600.0
    invoice_batch_size: int = 1000
    invoices_list_max: int = 1000
    report_groups_max: int = 1000
    usage_groups_max: int = 1000
    # The facility power cap (libs/tokenmill/powercap.py, telemetry/control.py). A cap is
    # refused above `power_cap_w_max` watts (a typo, not a facility). Every
    # `power_control_interval_s` the controller compares the facility's power (each meter's mean
    # over the samples that arrived in the last `power_cap_window_s`, summed) with the cap and
    # moves the curtailment level one step: up while over the cap, no sooner than
    # `power_cap_dwell_s` after the last step (the smoothing window has to see its effect),
    # down once under `power_cap_release_share` of it, no sooner than
    # `power_cap_release_dwell_s` after the last step (a tier given back can push the power
    # over again; returning slowly makes that cycle rare). Intakes and workers re-read
    # the level every `power_level_poll_s`; a level the controller has not refreshed for
    # `power_level_ttl_s` lapses (fail open, see docs/architecture.md). A worker runs at most
    # `power_shed_running_max` requests of a shed tier at once (at least 1, so work already
    # accepted still completes); intake answers a shed tier's new requests 429 with
    # Retry-After `power_retry_after_s`.
    power_cap_w_max: float = 100_000_000.0
    power_control_interval_s: float = 1.0
    power_cap_window_s: float = 15.0
    power_cap_release_share: float = 0.9
    power_cap_dwell_s: float = 15.0
    power_cap_release_dwell_s: float = 60.0
    power_cap_samples_max: int = 10_000
    power_level_poll_s: float = 0.5
    power_level_ttl_s: float = 10.0
    power_shed_running_max: int = 1
    power_retry_after_s: int = 15
    # Streaming (libs/tokenmill/tokenstream.py). Each request's token deltas go through a Redis
    # stream of at most `token_stream_entries_max` entries (one per engine step that made text,
    # so more than max_tokens_limit keeps every one) that expires `token_stream_ttl_s` after its
    # last write. A cancelled job's key, which the worker that picks it up checks, lives
    # `cancel_keep_s`; the cancel stream every worker follows keeps at most
    # `cancel_stream_entries_max` cancel signals. An intake streams at most
    # `streams_open_max` answers at once (more get 503 too_many_streams), and ends a stream
    # with an error when nothing came for `chat_wait_s`.
    token_stream_entries_max: int = 4096
    token_stream_ttl_s: float = 3600.0
    cancel_keep_s: float = 86_400.0
    cancel_stream_entries_max: int = 10_000
    streams_open_max: int = 1000
    # The worker's Prometheus metrics (tokenmill/worker/metrics.py) on http_host at this port;
    # 0 serves none. `up --workers N` gives worker i (from 1) this port + i - 1.
    worker_metrics_port: int = 0
    # The inference engine a worker runs: "tokenmill" (the built-in batching engine, any host)
    # or "vllm" (tokenmill/worker/vllm_engine.py: vLLM, when it is installed on a GPU host).
    engine: str = "tokenmill"

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None, **overrides: object) -> Settings:
        env = os.environ if environ is None else environ
        values: dict[str, object] = {}
        for f in fields(cls):
            raw = env.get(ENV_PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _parse(raw, f.type)
        values.update(overrides)
        return cls(**values)

    @property
    def model_cache_path(self) -> Path:
        return Path(self.model_cache_dir or Path(self.data_dir) / "models")

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        return {ENV_PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in fields(self)}


def _parse(raw: str, type_name: object) -> object:
    if type_name in (int, "int"):
        return int(raw)
    if type_name in (float, "float"):
        return float(raw)
    return raw
