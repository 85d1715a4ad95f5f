"""Configuration Structs: the defaults of a run live here and nowhere else."""

from __future__ import annotations

import msgspec


class BusSettings(msgspec.Struct, kw_only=True, frozen=True):
    url: str = "nats://127.0.0.1:4222"  # several servers of one cluster: comma-separated
    run: str = "default"
    # Streams and KV buckets are stored on this many servers (a NATS cluster of at least that many nodes).
    replicas: int = 1
    connect_timeout_s: float = 10.0
    reconnect_wait_s: float = 0.5
    ping_interval_s: float = 10.0
    drain_timeout_s: float = 5.0
    publish_timeout_s: float = 5.0
    # A JetStream publish is retried (same Nats-Msg-Id, so stored once) until this deadline:
    # long enough to ride out a NATS server restart.
    publish_deadline_s: float = 60.0
    duplicate_window_s: float = 120.0
    # Work queues: ack_wait must exceed the longest job; bounded redelivery.
    eval_ack_wait_s: float = 600.0
    eval_max_deliver: int = 3
    rollout_ack_wait_s: float = 1800.0
    rollout_max_deliver: int = 5
    batch_ack_wait_s: float = 1800.0
    # The event stream is the run's log: kept (limits retention) until these limits, 0 = unlimited.
    event_max_age_s: float = 0.0
    event_max_bytes: int = -1
    max_msg_size: int = 8 * 1024 * 1024
    # Eval results wait this long in their stream for a requester that was away (reconnecting, restarting).
    results_max_age_s: float = 3600.0
    heartbeat_ttl_s: float = 15.0
    storage_in_memory: bool = False


class ActorSettings(msgspec.Struct, kw_only=True, frozen=True):
    heartbeat_interval_s: float = 2.0


class LoggerSettings(msgspec.Struct, kw_only=True, frozen=True):
    log_dir: str = "runs/default/logs"
    verbose: bool = False
    console: bool = True
    fetch_batch: int = 1000
    # How long an idle fetch waits: bounds the publish-to-disk latency at low rates.
    fetch_timeout_s: float = 0.02
    # Under load, fsync (and then ack) at least this often; when caught up, at once.
    fsync_interval_s: float = 0.25
    max_ack_pending: int = 50_000
    # A killed logger's fetched-but-unwritten events come back to its successor after this.
    ack_wait_s: float = 10.0
    # On start, event ids are read back from at most this much of each file's tail; it is far
    # more than max_ack_pending records, the most that can be redelivered after a crash.
    dedup_scan_bytes: int = 512 * 1024 * 1024
    dedup_capacity: int = 2_000_000
    retry_backoff_s: float = 1.0
