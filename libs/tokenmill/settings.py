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
    power_sample_interval_s: float = 5.0

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
