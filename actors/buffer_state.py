"""The buffer's state and logic, pure (no I/O; the time comes in as an argument): the data-set sampler, GRPO
groups, advantages, filtering and train batches. ``actors/buffer.py`` feeds it trajectories and the policy
version and publishes what it puts in its outbox.

Sampler. The problem set is narrowed to ``buffer.problems`` (ids, or prefixes such as ``level1/``); a fraction
``heldout_fraction`` of it, chosen by ``split_seed``, is held out and never sampled for training. The training
problems are drawn epoch after epoch, each epoch in an order shuffled by ``seed`` and the epoch number, so the
problem at position ``p`` of the sequence is a function of the seed and ``p`` alone: a restarted buffer goes on
with the same sequence. A round draws ``rollout_batch_size`` prompts; one GRPO group of ``n_samples_per_prompt``
rollout requests per prompt; ``num_rollout`` rounds in all (0: unbounded).

Issuing. A round is issued only while (a) the groups in flight stay within ``max_inflight_groups`` (a round is
issued whole; a bound below ``rollout_batch_size`` admits one round at a time) and (b) the policy-lag rule holds:
``projected − current policy version ≤ max_off_policy_steps``, where ``projected`` is the batches published plus the
whole batches the samples already pending or in flight will make. Nothing in flight, that is the plain rule
"batches published − policy version ≤ max_off_policy_steps"; counting what is in flight makes
``max_off_policy_steps = 0`` synchronous (the next round waits until the learner has trained the previous batch).

Group rule (a group is the ``n_samples`` rollouts of one prompt; each trajectory counts once, by its id):

- a group closes when all ``n_samples`` members have arrived, or ``group_timeout_s`` after it was issued with
  members missing (a *short* group; the missing members are counted as ``lost_rollouts``);
- on closing, members sampled more than ``max_off_policy_steps`` versions before the policy being trained (the
  next batch's step − 1) are dropped as stale;
- fewer than ``min_group_size`` members left: the group is *dropped*; otherwise advantages are computed among the
  members present (``advantage_estimator``, per turn index or pooled); a group whose members' aggregated returns do
  not spread (``min_group_std``) is *filtered*; else it is *kept*;
- a trajectory of a closed group (a member arriving after the time-out, or a duplicate) and one of a group this
  buffer never issued are ignored and counted (``late``, ``duplicates``, ``unknown``);
- a trajectory whose ``run_id`` names another run (``kernelrl replay --to buffer``) joins the *adopted* group
  ``<run>:<group>``, opened by its first member with the ``n_samples`` it names; adopted groups close and are judged
  like issued ones, except that their members (another run's policy versions) are never dropped as stale.

Batches. Kept groups accumulate; once they hold at least ``global_batch_size`` samples (0: ``rollout_batch_size ×
n_samples_per_prompt``) every kept group not yet batched forms the next train batch (whole groups, so a batch may
exceed the size). When the last round's groups have all closed, what is left is flushed as a final, possibly
smaller, batch — with no samples at all when the groups closed since the previous batch were all filtered or
dropped, so that their summary is still reported (the learner then takes no optimiser step) — and the state is
``finished``. A batch's ``GroupSummary`` accounts for every group closed since the
previous batch (kept, filtered and dropped); ``rollout_time_s`` is the sum of the rollouts' own
``rollout_time_s``; ``reward_mean`` is over every rollout that arrived for those groups (stale ones included).

Invariant: the state (``BufferState``) holds everything a restarted buffer needs — sampler position, open groups
and their members, kept samples, counts, the last stream sequence consumed, and an outbox of what is about to be
published — and every id it hands out (group, request, batch) is a function of the state, so saving the state
before publishing and replaying the event stream after the saved sequence neither loses nor double-counts a
trajectory, nor publishes a different batch.
"""

from __future__ import annotations

import math
import random
import re
import statistics
from collections.abc import Sequence

import msgspec

from kernelrl.core import messages as m
from kernelrl.core.advantages import group_turn_advantages, has_spread, is_stale
from kernelrl.core.config import BufferSettings, RewardConfig

STATE_VERSION = 1
CLOSED_MEMORY = 1024  # closed groups remembered by their members' ids (duplicates vs late arrivals)
_GROUP_ID = re.compile(r"^r(\d+)-p(\d+)$")
UNSTAMPED = -1.0  # an adopted group's issued_at until the next advance() stamps it


def group_id_for(round_idx: int, prompt_idx: int) -> str:
    return f"r{round_idx:05d}-p{prompt_idx}"


def request_id_for(group_id: str, sample_idx: int) -> str:
    return f"{group_id}-s{sample_idx}"


def adopted_group_id(run_id: str, group_id: str) -> str:
    """An adopted group's id: the source run and its group there (no id this buffer issues holds a ':')."""
    return f"{run_id}:{group_id}"


def batch_id_for(step: int) -> str:
    return f"batch-{step:06d}"


def task_type_for(max_turns: int) -> str:
    return "kernelbench" if max_turns == 1 else "kernelbench_multiturn"


# ---------------------------------------------------------------- sampler


def select_problems(problem_ids: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The ids ``patterns`` name (an id, or a prefix such as ``level1/`` or ``level1``), in the set's order;
    ValueError naming a pattern that matches nothing."""
    if not patterns:
        return list(problem_ids)
    chosen: set[str] = set()
    for pattern in patterns:
        prefix = pattern.rstrip("/") + "/"
        hits = {p for p in problem_ids if p == pattern or p.startswith(prefix)}
        if not hits:
            raise ValueError(f"buffer.problems: {pattern!r} matches no problem of the problem set")
        chosen |= hits
    return [p for p in problem_ids if p in chosen]


class Sampler:
    """Which problems train and which are held out, and the training problem at each position of the sequence."""

    def __init__(self, problem_ids: Sequence[str], settings: BufferSettings) -> None:
        selected = select_problems(problem_ids, settings.problems)
        if not selected:
            raise ValueError("the problem set is empty")
        order = sorted(selected)
        random.Random(settings.split_seed).shuffle(order)
        n_heldout = min(round(settings.heldout_fraction * len(order)), len(order) - 1)  # at least one trains
        heldout = set(order[:n_heldout])
        self.heldout = [p for p in selected if p in heldout]
        self.train = [p for p in selected if p not in heldout]
        self.shuffle = settings.shuffle
        self.seed = settings.seed
        self._epoch: tuple[int, list[str]] = (-1, [])

    def epoch_order(self, epoch: int) -> list[str]:
        if self._epoch[0] != epoch:
            order = list(self.train)
            if self.shuffle:
                random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
            self._epoch = (epoch, order)
        return self._epoch[1]

    def at(self, position: int) -> str:
        epoch, idx = divmod(position, len(self.train))
        return self.epoch_order(epoch)[idx]

    def draw(self, position: int, count: int) -> list[str]:
        return [self.at(p) for p in range(position, position + count)]


# ---------------------------------------------------------------- state


class Member(msgspec.Struct, kw_only=True):
    """What the buffer keeps of one trajectory (the learner reads the rest from the stream by ``stream_seq``)."""

    trajectory_id: str
    stream_seq: int
    policy_version: int
    turn_returns: list[float]
    aggregated_return: float
    num_turns: int
    prompt_tokens: int
    response_tokens: int
    rollout_time_s: float


class Group(msgspec.Struct, kw_only=True):
    group_id: str
    problem_id: str
    round: int
    issued_at: float  # wall clock (time.time()), so a restarted buffer keeps the time-out
    n_samples: int
    max_turns: int
    members: list[Member] = []
    adopted: bool = False  # another run's group, replayed into this one (``kernelrl replay --to buffer``)


class KeptSample(msgspec.Struct, kw_only=True):
    sample: m.BatchSample
    group_id: str
    response_tokens: int


class Tally(msgspec.Struct, kw_only=True):
    """Counts over the groups closed since the previous batch."""

    total_groups: int = 0
    groups_kept: int = 0
    groups_filtered: int = 0
    groups_dropped: int = 0
    short_groups: int = 0
    lost_rollouts: int = 0
    stale_dropped: int = 0
    num_early_exit: int = 0
    num_rollouts: int = 0
    rollout_time_s: float = 0.0
    total_tokens: int = 0
    reward_sum: float = 0.0


class ClosedGroup(msgspec.Struct, kw_only=True):
    group_id: str
    trajectory_ids: list[str]


class BufferState(msgspec.Struct, kw_only=True):
    """Everything a restarted buffer resumes from (saved in the run's buffer KV bucket)."""

    v: int = STATE_VERSION
    sampler_position: int = 0  # training prompts drawn so far
    rounds_issued: int = 0
    open_groups: list[Group] = []
    kept: list[KeptSample] = []  # kept groups' samples, not yet in a batch, whole groups in close order
    tally: Tally = msgspec.field(default_factory=Tally)
    batches_published: int = 0  # batches formed (each is saved in the outbox before it is published)
    last_seq: int = 0  # the last event-stream sequence consumed
    finished: bool = False
    prev_reward_mean: float | None = None
    recent_closed: list[ClosedGroup] = []
    outbox_requests: list[m.RolloutRequest] = []  # about to be published (republished after a restart)
    outbox_batches: list[m.TrainBatch] = []
    totals: dict[str, int] = {}  # cumulative counts for heartbeats


STATE_CODEC_ENCODER = msgspec.json.Encoder()
_STATE_DECODER = msgspec.json.Decoder(BufferState)


def encode_state(state: BufferState) -> bytes:
    return STATE_CODEC_ENCODER.encode(state)


def decode_state(data: bytes) -> BufferState:
    return _STATE_DECODER.decode(data)


# ---------------------------------------------------------------- logic


class BufferCore:
    """The buffer's transitions over a ``BufferState``. Every method is deterministic given the state and its
    arguments; what is to be published goes to the state's outbox."""

    def __init__(self, settings: BufferSettings, reward: RewardConfig, problem_ids: Sequence[str], run_id: str,
                 state: BufferState | None = None) -> None:  # fmt: skip
        self.settings = settings
        self.reward = reward
        self.run_id = run_id
        self.sampler = Sampler(problem_ids, settings)
        self.state = state if state is not None else BufferState()

    # -------------------------------------------------------- derived values

    @property
    def planned_steps(self) -> int:
        """Batches the run makes if no group is filtered (0: unbounded rounds)."""
        s = self.settings
        return math.ceil(s.num_rollout * s.rollout_batch_size * s.n_samples_per_prompt / self.global_batch_size)

    @property
    def global_batch_size(self) -> int:
        """``global_batch_size`` (0: a round's samples). A synchronous run (``max_off_policy_steps = 0``) trains a round
        as one batch at least: a second batch from the same round would be trained by a newer policy than sampled it."""
        s = self.settings
        round_size = s.rollout_batch_size * s.n_samples_per_prompt
        if s.max_off_policy_steps == 0:
            return max(s.global_batch_size, round_size)
        return s.global_batch_size or round_size

    @property
    def pending_samples(self) -> int:
        return len(self.state.kept)

    @property
    def all_rounds_issued(self) -> bool:
        return self.settings.num_rollout > 0 and self.state.rounds_issued >= self.settings.num_rollout

    def count(self, key: str, n: int = 1) -> None:
        self.state.totals[key] = self.state.totals.get(key, 0) + n

    def projected_batches(self) -> int:
        """Batches published plus the whole batches the pending and in-flight samples will make."""
        in_flight = sum(g.n_samples for g in self.state.open_groups)
        return self.state.batches_published + (self.pending_samples + in_flight) // self.global_batch_size

    def may_issue(self, policy_version: int) -> bool:
        s = self.settings
        if self.state.finished or self.all_rounds_issued:
            return False
        if len(self.state.open_groups) + s.rollout_batch_size > max(s.max_inflight_groups, s.rollout_batch_size):
            return False
        return self.projected_batches() - policy_version <= s.max_off_policy_steps

    # -------------------------------------------------------- issuing

    def issue_round(self, now: float) -> list[m.RolloutRequest]:
        """The next round's rollout requests (also put in the outbox); its groups are open from ``now``."""
        s, st = self.settings, self.state
        round_idx = st.rounds_issued + 1
        problems = self.sampler.draw(st.sampler_position, s.rollout_batch_size)
        requests = []
        for k, problem_id in enumerate(problems):
            group_id = group_id_for(round_idx, k)
            st.open_groups.append(Group(group_id=group_id, problem_id=problem_id, round=round_idx, issued_at=now,
                                        n_samples=s.n_samples_per_prompt, max_turns=self.reward.max_turns))  # fmt: skip
            for i in range(s.n_samples_per_prompt):
                requests.append(
                    m.RolloutRequest(
                        request_id=request_id_for(group_id, i),
                        run_id=self.run_id,
                        problem_id=problem_id,
                        group_id=group_id,
                        sample_idx=i,
                        n_samples=s.n_samples_per_prompt,
                        max_turns=self.reward.max_turns,
                        gamma=self.reward.gamma,
                        task_type=task_type_for(self.reward.max_turns),
                        step=round_idx,
                        created_at=now,
                    )
                )
        st.sampler_position += len(problems)
        st.rounds_issued = round_idx
        st.outbox_requests.extend(requests)
        self.count("rounds")
        self.count("requests", len(requests))
        return requests

    # -------------------------------------------------------- trajectories

    def add_trajectory(self, event: m.TrajectoryEvent, stream_seq: int) -> str:
        """Take one trajectory from the event stream; returns what became of it: ``member``, ``duplicate``, ``late``
        (its group closed already), ``unknown`` (a group this buffer did not issue), ``malformed`` or ``replayed``
        (a sequence at or before the last one consumed)."""
        st = self.state
        if stream_seq <= st.last_seq:
            return "replayed"
        st.last_seq = stream_seq
        outcome = self._place(event, stream_seq)
        self.count("trajectories" if outcome == "member" else outcome)
        return outcome

    def skip(self, stream_seq: int) -> None:
        """A stream message that is not a trajectory this buffer can read: consumed, counted."""
        if stream_seq > self.state.last_seq:
            self.state.last_seq = stream_seq
            self.count("undecodable")

    def _place(self, event: m.TrajectoryEvent, stream_seq: int) -> str:
        tid = event.trajectory_id or event.request_id
        if event.run_id and event.run_id != self.run_id:
            return self._adopt(event, tid, stream_seq)
        group = next((g for g in self.state.open_groups if g.group_id == event.group_id), None)
        if group is None:
            closed = next((c for c in self.state.recent_closed if c.group_id == event.group_id), None)
            if closed is not None:
                return "duplicate" if tid in closed.trajectory_ids else "late"
            match = _GROUP_ID.match(event.group_id)
            return "late" if match and int(match.group(1)) <= self.state.rounds_issued else "unknown"
        if tid not in {request_id_for(group.group_id, i) for i in range(group.n_samples)}:
            return "unknown"
        if any(mem.trajectory_id == tid for mem in group.members):
            return "duplicate"
        if not event.turn_returns:
            return "malformed"
        return self._join(group, event, tid, stream_seq)

    def _adopt(self, event: m.TrajectoryEvent, tid: str, stream_seq: int) -> str:
        """Another run's trajectory (replayed from its log): a member of the adopted group ``<run>:<group>``, opened by
        its first member with the ``n_samples`` the trajectory names, closed like any group (complete, or
        ``group_timeout_s`` after its first member was placed) but never dropped as stale."""
        key = adopted_group_id(event.run_id, event.group_id or tid)
        group = next((g for g in self.state.open_groups if g.group_id == key), None)
        if group is None:
            closed = next((c for c in self.state.recent_closed if c.group_id == key), None)
            if closed is not None:
                return "duplicate" if tid in closed.trajectory_ids else "late"
            if not event.turn_returns:
                return "malformed"
            group = Group(group_id=key, problem_id=event.instance_id, round=0, issued_at=UNSTAMPED,
                          n_samples=max(1, event.n_samples), max_turns=self.reward.max_turns, adopted=True)  # fmt: skip
            self.state.open_groups.append(group)
            self.count("adopted_groups")
        if any(mem.trajectory_id == tid for mem in group.members):
            return "duplicate"
        if not event.turn_returns:
            return "malformed"
        return self._join(group, event, tid, stream_seq)

    def _join(self, group: Group, event: m.TrajectoryEvent, tid: str, stream_seq: int) -> str:
        group.members.append(
            Member(
                trajectory_id=tid,
                stream_seq=stream_seq,
                policy_version=event.policy_version,
                turn_returns=list(event.turn_returns),
                aggregated_return=event.aggregated_return,
                num_turns=event.num_turns,
                prompt_tokens=sum(len(ids) for ids in event.prompt_token_ids),
                response_tokens=sum(len(ids) for ids in event.response_token_ids),
                rollout_time_s=event.rollout_time_s,
            )
        )
        if len(group.members) >= group.n_samples:
            self._close(group)
        return "member"

    # -------------------------------------------------------- closing groups and batching

    def advance(self, now: float, policy_version: int) -> None:
        """Close timed-out groups, flush the last batch once everything is closed, issue rounds while allowed."""
        timeout = self.settings.group_timeout_s
        for group in self.state.open_groups:
            if group.issued_at == UNSTAMPED:  # an adopted group's time-out runs from the first advance after it opened
                group.issued_at = now
        for group in [g for g in self.state.open_groups if now - g.issued_at >= timeout]:
            self._close(group)
        st = self.state
        if self.all_rounds_issued and not st.open_groups and not st.finished:
            if st.kept or st.tally.total_groups:  # the last groups are reported even when none was kept
                self._form_batch()
            st.finished = True
        while self.may_issue(policy_version):
            self.issue_round(now)

    def _close(self, group: Group) -> None:
        s, st, t = self.settings, self.state, self.state.tally
        st.open_groups.remove(group)
        st.recent_closed.append(ClosedGroup(group_id=group.group_id, trajectory_ids=[mem.trajectory_id for mem in group.members]))
        del st.recent_closed[:-CLOSED_MEMORY]
        received = group.members
        t.total_groups += 1
        missing = group.n_samples - len(received)
        if missing > 0:
            t.short_groups += 1
            t.lost_rollouts += missing
            self.count("short_groups")
            self.count("lost_rollouts", missing)
        t.num_rollouts += len(received)
        t.num_early_exit += sum(1 for mem in received if mem.num_turns < group.max_turns)
        t.rollout_time_s += sum(mem.rollout_time_s for mem in received)
        t.total_tokens += sum(mem.prompt_tokens + mem.response_tokens for mem in received)
        t.reward_sum += sum(mem.aggregated_return for mem in received)
        trained_version = st.batches_published  # the policy the next batch is trained from (its step − 1)
        fresh = [mem for mem in received
                 if group.adopted or not is_stale(mem.policy_version, trained_version, s.max_off_policy_steps)]  # fmt: skip
        t.stale_dropped += len(received) - len(fresh)
        self.count("stale_dropped", len(received) - len(fresh))
        if len(fresh) < s.min_group_size:
            t.groups_dropped += 1
            self.count("groups_dropped")
            return
        if not has_spread([mem.aggregated_return for mem in fresh], s.min_group_std):
            t.groups_filtered += 1
            self.count("groups_filtered")
            return
        t.groups_kept += 1
        self.count("groups_kept")
        advantages = group_turn_advantages([mem.turn_returns for mem in fresh], s.advantage_estimator, s.per_turn_advantages)
        for mem, adv in zip(fresh, advantages, strict=True):
            sample = m.BatchSample(stream_seq=mem.stream_seq, trajectory_id=mem.trajectory_id, turn_advantages=adv,
                                   policy_version=mem.policy_version)  # fmt: skip
            st.kept.append(KeptSample(sample=sample, group_id=group.group_id, response_tokens=mem.response_tokens))
        if self.pending_samples >= self.global_batch_size:
            self._form_batch()

    def _form_batch(self) -> m.TrainBatch:
        st, t = self.state, self.state.tally
        step = st.batches_published + 1
        samples = [k.sample for k in st.kept]
        reward_mean = t.reward_sum / t.num_rollouts if t.num_rollouts else 0.0
        summary = m.GroupSummary(
            total_groups=t.total_groups,
            groups_kept=t.groups_kept,
            groups_filtered=t.groups_filtered,
            num_early_exit=t.num_early_exit,
            num_rollouts=t.num_rollouts,
            rollout_time_s=round(t.rollout_time_s, 3),
            total_tokens=t.total_tokens,
            trainable_tokens=sum(k.response_tokens for k in st.kept),
            turn_advantages=[list(s.turn_advantages) for s in samples],
            reward_mean=reward_mean,
            reward_change=None if st.prev_reward_mean is None else reward_mean - st.prev_reward_mean,
            stale_dropped=t.stale_dropped,
            short_groups=t.short_groups,
            lost_rollouts=t.lost_rollouts,
            groups_dropped=t.groups_dropped,
            policy_lag_mean=statistics.fmean(step - 1 - s.policy_version for s in samples) if samples else 0.0,
        )
        batch = m.TrainBatch(
            batch_id=batch_id_for(step),
            run_id=self.run_id,
            step=step,
            samples=samples,
            min_policy_version=min((s.policy_version for s in samples), default=step - 1),
            groups=summary,
            total_steps=self.planned_steps,
        )
        st.outbox_batches.append(batch)
        st.batches_published = step
        st.kept = []
        st.tally = Tally()
        st.prev_reward_mean = reward_mean
        self.count("batches")
        return batch

    # -------------------------------------------------------- outbox

    def clear_outbox(self) -> None:
        self.state.outbox_requests = []
        self.state.outbox_batches = []
