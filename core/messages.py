"""Every message that crosses NATS, as msgspec Structs: the single definition of the wire format.

Invariants: every message carries ``v`` (schema version) and its own id; every field added after
version 1 has a default, so an older reader ignores it and a newer reader fills it in. Log-record
field names follow the seed formats (``instance_id``, ``turn_idx``, ``turn_data``, ``eval_result``,
``final_reward``, ``execution_details`` ...); RL fields sit beside them.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, Generic, TypeVar

import msgspec

from kernelrl.core.config import CheckSettings

__all__ = ["CheckSettings"]  # part of EvalRequest; its defaults live with the rest of the configuration

SCHEMA_VERSION = 1


def new_id() -> str:
    return uuid.uuid4().hex


def log_timestamp(now: dt.datetime | None = None) -> str:
    """The seed logs' timestamp format, e.g. ``20250807_084801_411804``."""
    return (now or dt.datetime.now()).strftime("%Y%m%d_%H%M%S_%f")


class Message(msgspec.Struct, kw_only=True, frozen=True):
    v: int = SCHEMA_VERSION


# ---------------------------------------------------------------- work items


class RolloutRequest(Message, frozen=True):
    """One dialogue to run: a problem, which sample of its GRPO group, and the turn budget."""

    request_id: str
    run_id: str
    problem_id: str
    group_id: str
    sample_idx: int
    n_samples: int
    max_turns: int = 3
    gamma: float = 0.4
    task_type: str = "kernelbench_multiturn"
    step: int = 0
    created_at: float = 0.0


class EvalRequest(Message, frozen=True):
    eval_id: str
    run_id: str
    problem_id: str
    candidate_source: str
    reply_to: str
    problem_source: str = ""
    generator_id: str = ""
    trajectory_id: str = ""
    turn_idx: int = 0
    settings: CheckSettings = msgspec.field(default_factory=CheckSettings)
    created_at: float = 0.0


class EvalResult(Message, frozen=True):
    """A verdict on one candidate; the first five fields are the seed logs' ``eval_result``."""

    compiled: bool = False
    correctness: bool = False
    runtime: float = -1.0
    speedup: float = 0.0
    error_message: str = ""
    eval_id: str = ""
    problem_id: str = ""
    baseline_runtime: float = -1.0
    error_kind: str = ""
    max_abs_error: float | None = None
    rel_error: float | None = None
    runtime_stats: dict[str, float] = {}
    timings: dict[str, float] = {}
    interpreter: bool = False
    speedup_flagged: bool = False
    device: str = ""
    evaluator_id: str = ""
    skipped_trials: list[str] = []
    atol: float | None = None
    rtol: float | None = None


# ---------------------------------------------------------------- events (the run's log)


class ChatMessage(msgspec.Struct, frozen=True):
    role: str
    content: str


class TurnData(msgspec.Struct, kw_only=True, frozen=True):
    """The seed turn log's ``turn_data`` block, plus what RL needs to train on the turn."""

    prompt: list[ChatMessage] = []
    response: str = ""
    kernel_code: str = ""
    eval_result: EvalResult = msgspec.field(default_factory=EvalResult)
    reward: float = 0.0
    extra_info: dict[str, Any] = {}
    turn_return: float = 0.0
    advantage: float | None = None
    prompt_token_ids: list[int] = []
    response_token_ids: list[int] = []
    response_logprobs: list[float] = []
    timings: dict[str, float] = {}


class TurnEvent(Message, frozen=True):
    event_id: str
    timestamp: str
    instance_id: str
    turn_idx: int
    turn_data: TurnData
    run_id: str = ""
    trajectory_id: str = ""
    group_id: str = ""
    sample_idx: int = 0
    policy_version: int = 0
    generator_id: str = ""


class HistoryEntry(msgspec.Struct, kw_only=True, frozen=True):
    turn_idx: int
    kernel_code: str
    eval_result: EvalResult
    reward: float


class ExecutionDetails(msgspec.Struct, kw_only=True, frozen=True):
    final_compiled: bool = False
    final_correctness: bool = False
    final_runtime: float = -1.0
    final_speedup: float = 0.0


class TrajectoryEvent(Message, frozen=True):
    event_id: str
    timestamp: str
    instance_id: str
    final_reward: float
    num_turns: int
    turn_rewards: list[float]
    aggregated_return: float
    history: list[HistoryEntry] = []
    messages: list[ChatMessage] = []
    execution_details: ExecutionDetails = msgspec.field(default_factory=ExecutionDetails)
    extra_info: dict[str, Any] = {}
    run_id: str = ""
    trajectory_id: str = ""
    group_id: str = ""
    request_id: str = ""
    sample_idx: int = 0
    n_samples: int = 1
    policy_version: int = 0
    turn_returns: list[float] = []
    turn_advantages: list[float] = []
    termination_reason: str = ""
    prompt_token_ids: list[list[int]] = []
    response_token_ids: list[list[int]] = []
    response_logprobs: list[list[float]] = []
    rollout_time_s: float = 0.0
    generator_id: str = ""


class GroupSummary(msgspec.Struct, kw_only=True, frozen=True):
    """The buffer's account of the groups behind one train batch (the seed's "Group Summary")."""

    total_groups: int = 0
    groups_kept: int = 0
    groups_filtered: int = 0  # no reward spread
    num_early_exit: int = 0  # rollouts that ended before max_turns
    num_rollouts: int = 0
    rollout_time_s: float = 0.0
    training_time_s: float = 0.0
    total_tokens: int = 0
    trainable_tokens: int = 0
    # one row per kept rollout, one advantage per turn
    turn_advantages: list[list[float]] = []
    reward_mean: float = 0.0  # mean aggregated return over every rollout of these groups
    reward_change: float | None = None  # against the previous batch's reward_mean
    stale_dropped: int = 0  # trajectories too many policy versions behind
    short_groups: int = 0  # closed by the group time-out with members missing
    lost_rollouts: int = 0  # members that never arrived
    groups_dropped: int = 0  # short groups below min_group_size
    policy_lag_mean: float = 0.0  # versions between sampling and the policy being trained


class StepSummary(Message, frozen=True):
    event_id: str
    step: int
    timestamp: str = ""
    run_id: str = ""
    total_steps: int = 0
    policy_version: int = 0
    loss: float = 0.0
    grad_norm: float = 0.0
    learning_rate: float = 0.0
    tokens_trained: int = 0
    trainable_token_share: float = 0.0
    groups: GroupSummary = msgspec.field(default_factory=GroupSummary)
    batch_id: str = ""
    samples: int = 0  # trajectories trained on
    missing_samples: int = 0  # named by the batch but gone from the event stream (retention)
    clip_fraction: float = 0.0
    ratio_mean: float = 1.0
    ratio_max: float = 1.0
    masked_by_band: int = 0
    kl: float = 0.0
    trainable_params: int = 0
    train_time_s: float = 0.0
    weights_path: str = ""
    weights_sha256: str = ""


class EvalSummary(Message, frozen=True):
    """One evaluation pass over a problem set; the logger writes it to ``eval_logs/eval_step_XXXX.json``."""

    event_id: str
    step: int
    accuracy: float
    correct_answers: int
    total_samples: int
    timestamp: str = ""
    run_id: str = ""
    policy_version: int = 0
    compiled: int = 0  # final kernels that compiled (EvalResult.compiled is one verdict's bool, unrelated)
    avg_reward: float = 0.0
    median_reward: float = 0.0
    std_reward: float = 0.0
    min_reward: float = 0.0
    max_reward: float = 0.0
    fast_p: dict[str, float] = {}
    pass_at_k: dict[str, float] = {}
    avg_turns_correct: float = 0.0
    avg_speedup_correct: float = 0.0
    beat_rate: float = 0.0  # share of samples whose final kernel is correct and faster than the baseline
    eval_time: float = 0.0
    extra: dict[str, Any] = {}
    attempted_answer: int = 0  # = compiled, under the seed's name (0 in a summary from before it)

    @property
    def attempted(self) -> int:
        """Final kernels that compiled, from a summary of any version."""
        return self.attempted_answer or self.compiled


# ---------------------------------------------------------------- training and control


class BatchSample(msgspec.Struct, kw_only=True, frozen=True):
    """A trajectory named by its event-stream sequence, with the advantages the buffer gave its turns."""

    stream_seq: int
    trajectory_id: str
    turn_advantages: list[float]
    policy_version: int = 0


class TrainBatch(Message, frozen=True):
    """One optimiser step's data: the learner trains it into policy version ``step`` (steps count from 1)."""

    batch_id: str
    run_id: str
    step: int
    samples: list[BatchSample]
    min_policy_version: int = 0
    groups: GroupSummary = msgspec.field(default_factory=GroupSummary)
    total_steps: int = 0  # the buffer's plan: num_rollout rounds


class PolicyUpdate(Message, frozen=True):
    version: int
    path: str
    sha256: str
    run_id: str = ""
    step: int = 0
    is_lora: bool = False
    created_at: float = 0.0


class Heartbeat(Message, frozen=True):
    role: str
    actor_id: str
    host: str
    pid: int
    state: str
    updated_at: float
    device: str = ""
    run_id: str = ""
    started_at: float = 0.0
    counters: dict[str, int] = {}
    gauges: dict[str, float] = {}  # current values: seconds into the current job, the last fsync's duration ...


class WorkParked(Message, frozen=True):
    """A work item that exhausted its deliveries (a batch that crashed the learner every time, a job no
    evaluator finished): copied to ``parked_subject`` in the run's parked stream and removed from its queue."""

    event_id: str
    timestamp: str
    run_id: str
    role: str
    consumer: str
    stream: str
    stream_seq: int
    deliveries: int
    message_type: str
    message_id: str
    parked_subject: str
    created_at: float = 0.0


# ---------------------------------------------------------------- codecs

T = TypeVar("T", bound=Message)


class DecodeError(ValueError):
    """A payload that is not valid JSON for its declared type; names the type and the reason."""


class Codec(Generic[T]):
    """The encoder/decoder pair for one message type, built once."""

    __slots__ = ("_decoder", "_encoder", "type", "type_name")

    def __init__(self, type_: type[T]) -> None:
        self.type = type_
        self.type_name = type_.__name__
        self._encoder = msgspec.json.Encoder()
        self._decoder = msgspec.json.Decoder(type_)

    def encode(self, msg: T) -> bytes:
        if not isinstance(msg, self.type):
            raise TypeError(f"{self.type_name} codec cannot encode {type(msg).__name__}")
        return self._encoder.encode(msg)

    def decode(self, data: bytes) -> T:
        try:
            return self._decoder.decode(data)
        except msgspec.DecodeError as exc:
            raise DecodeError(f"{self.type_name}: {exc}") from exc
        except UnicodeDecodeError as exc:  # msgspec raises this, not DecodeError, for invalid UTF-8 in a string
            raise DecodeError(f"{self.type_name}: a string is not valid UTF-8 ({exc.reason} at byte {exc.start})") from exc


MESSAGE_TYPES: tuple[type[Message], ...] = (
    RolloutRequest,
    EvalRequest,
    EvalResult,
    TurnEvent,
    TrajectoryEvent,
    StepSummary,
    EvalSummary,
    TrainBatch,
    PolicyUpdate,
    Heartbeat,
    WorkParked,
)

CODECS: Mapping[str, Codec[Any]] = MappingProxyType({t.__name__: Codec(t) for t in MESSAGE_TYPES})


def codec_for(type_: type[T]) -> Codec[T]:
    return CODECS[type_.__name__]


def message_id(msg: Message) -> str:
    """The id JetStream deduplicates on (``Nats-Msg-Id``) and the logger deduplicates on."""
    for field in ("event_id", "eval_id", "request_id", "batch_id"):
        value = getattr(msg, field, None)
        if value:
            return value
    if isinstance(msg, PolicyUpdate):
        return f"policy-{msg.version}"
    raise ValueError(f"{type(msg).__name__} has no id field")
