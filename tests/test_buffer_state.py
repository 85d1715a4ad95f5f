"""The buffer's pure logic: sampler, groups, staleness, filtering, batches, summaries and the issuing rule."""

from __future__ import annotations

import statistics

import msgspec
import pytest

from kernelrl.actors.buffer_state import BufferCore, Sampler, decode_state, encode_state, select_problems
from kernelrl.core import messages as m
from kernelrl.core.config import BufferSettings, RewardConfig

IDS = [f"level1/{i}_P{i}" for i in range(1, 11)] + [f"level2/{i}_Q{i}" for i in range(1, 6)]
REWARD = RewardConfig(max_turns=3, gamma=0.4)


def settings(**kw: object) -> BufferSettings:
    base: dict[str, object] = dict(problems=(), global_batch_size=0, num_rollout=4, rollout_batch_size=2,
                                   n_samples_per_prompt=2, max_inflight_groups=8, group_timeout_s=100.0, min_group_size=2,
                                   max_off_policy_steps=1)  # fmt: skip
    return BufferSettings(**(base | kw))  # type: ignore[arg-type]


def core(**kw: object) -> BufferCore:
    return BufferCore(settings(**kw), REWARD, IDS, "run1")


def trajectory(request_id: str, returns: list[float], version: int = 0, prompt: int = 5, response: int = 3,
               time_s: float = 1.0) -> m.TrajectoryEvent:  # fmt: skip
    group_id = request_id.rsplit("-s", 1)[0]
    return m.TrajectoryEvent(
        event_id=f"traj-{request_id}", timestamp="t", instance_id="p", final_reward=0.0, num_turns=len(returns),
        turn_rewards=[0.0] * len(returns), aggregated_return=returns[0], trajectory_id=request_id, request_id=request_id,
        group_id=group_id, policy_version=version, turn_returns=returns, prompt_token_ids=[[1] * prompt] * len(returns),
        response_token_ids=[[2] * response] * len(returns), rollout_time_s=time_s,
    )  # fmt: skip


class Feed:
    """Stream sequences for a test's trajectories, as the event stream would number them."""

    def __init__(self, c: BufferCore) -> None:
        self.c = c
        self.seq = 0

    def add(self, request_id: str, returns: list[float], **kw: object) -> str:
        self.seq += 1
        return self.c.add_trajectory(trajectory(request_id, returns, **kw), self.seq)  # type: ignore[arg-type]


def grpo(values: list[float]) -> list[float]:
    mu, sd = statistics.fmean(values), statistics.pstdev(values)
    return [(v - mu) / (sd + 1e-6) for v in values]


# ---------------------------------------------------------------- sampler


def test_problems_are_chosen_by_id_or_prefix_and_a_pattern_matching_nothing_is_an_error() -> None:
    assert select_problems(IDS, ["level2/", "level1/3_P3"]) == ["level1/3_P3"] + [f"level2/{i}_Q{i}" for i in range(1, 6)]
    assert select_problems(IDS, ["level2"]) == [f"level2/{i}_Q{i}" for i in range(1, 6)]
    assert select_problems(IDS, []) == IDS
    with pytest.raises(ValueError, match="level9/"):
        select_problems(IDS, ["level9/"])


def test_the_heldout_split_is_fixed_by_its_seed_and_never_sampled() -> None:
    a = Sampler(IDS, settings(heldout_fraction=0.2, split_seed=7))
    b = Sampler(IDS, settings(heldout_fraction=0.2, split_seed=7, seed=99))
    c = Sampler(IDS, settings(heldout_fraction=0.2, split_seed=8))
    assert len(a.heldout) == 3 and a.heldout == b.heldout  # the split depends on split_seed only
    assert sorted(a.heldout + a.train) == sorted(IDS)
    assert a.heldout != c.heldout
    drawn = a.draw(0, 5 * len(a.train))
    assert not set(drawn) & set(a.heldout)


def test_each_epoch_visits_every_training_problem_once_in_a_seeded_shuffled_order() -> None:
    sampler = Sampler(IDS, settings(seed=3))
    n = len(IDS)
    epochs = [sampler.draw(e * n, n) for e in range(3)]
    assert all(sorted(e) == sorted(IDS) for e in epochs)
    assert epochs[0] != epochs[1] and epochs[0] != IDS  # shuffled, differently each epoch
    again = Sampler(IDS, settings(seed=3))
    assert again.draw(n + 4, 9) == (epochs[1] + epochs[2])[4:13]  # any position, any time: the same sequence
    assert Sampler(IDS, settings(seed=4)).draw(0, n) != epochs[0]
    assert Sampler(IDS, settings(shuffle=False)).draw(0, n) == IDS


def test_a_restarted_buffer_goes_on_with_the_same_prompts_and_ids() -> None:
    first = core(num_rollout=0, rollout_batch_size=3)
    first.issue_round(0.0)
    restored = BufferCore(settings(num_rollout=0, rollout_batch_size=3), REWARD, IDS, "run1",
                          decode_state(encode_state(first.state)))  # fmt: skip
    straight = core(num_rollout=0, rollout_batch_size=3)
    straight.issue_round(0.0)
    assert restored.issue_round(5.0) == [
        msgspec.structs.replace(r, created_at=5.0) for r in straight.issue_round(5.0)
    ]  # the second round, as if never restarted


def test_a_round_is_one_group_per_prompt_with_deterministic_ids() -> None:
    c = core(rollout_batch_size=2, n_samples_per_prompt=3)
    requests = c.issue_round(10.0)
    assert [r.request_id for r in requests] == [f"r00001-p{k}-s{i}" for k in range(2) for i in range(3)]
    assert {r.group_id for r in requests} == {"r00001-p0", "r00001-p1"}
    assert all(r.step == 1 and r.n_samples == 3 and r.max_turns == 3 and r.gamma == 0.4 for r in requests)
    assert all(r.task_type == "kernelbench_multiturn" and r.run_id == "run1" for r in requests)
    assert [r.problem_id for r in requests[::3]] == c.sampler.draw(0, 2)
    assert c.state.outbox_requests == requests


# ---------------------------------------------------------------- groups


def test_a_complete_group_closes_and_its_members_get_group_relative_advantages() -> None:
    c = core(global_batch_size=100)
    c.issue_round(0.0)
    feed = Feed(c)
    assert feed.add("r00001-p0-s0", [1.0, 0.5]) == "member"
    assert len(c.state.open_groups) == 2
    assert feed.add("r00001-p0-s1", [0.2]) == "member"
    assert [g.group_id for g in c.state.open_groups] == ["r00001-p1"]
    first, second = c.state.kept
    turn0 = grpo([1.0, 0.2])
    assert first.sample.turn_advantages == pytest.approx([turn0[0], 0.0])  # turn 1: alone at its index
    assert second.sample.turn_advantages == pytest.approx([turn0[1]])
    assert (first.sample.stream_seq, second.sample.stream_seq) == (1, 2)


def test_a_timed_out_group_is_trained_on_the_members_present_if_enough_else_dropped() -> None:
    c = core(n_samples_per_prompt=4, min_group_size=2, group_timeout_s=60.0, global_batch_size=100, max_inflight_groups=2)
    c.issue_round(0.0)
    feed = Feed(c)
    for i, r in enumerate([1.0, 0.0, 0.5]):
        feed.add(f"r00001-p0-s{i}", [r])
    feed.add("r00001-p1-s0", [1.0])
    c.advance(59.0, 0)
    assert len(c.state.open_groups) == 2  # not yet
    c.advance(60.0, 0)
    assert [g.round for g in c.state.open_groups] == [2, 2]  # both closed, the next round went out
    t = c.state.tally
    assert (t.total_groups, t.short_groups, t.groups_kept, t.groups_dropped, t.lost_rollouts) == (2, 2, 1, 1, 1 + 3)
    assert [k.sample.trajectory_id for k in c.state.kept] == [f"r00001-p0-s{i}" for i in range(3)]
    assert [k.sample.turn_advantages[0] for k in c.state.kept] == pytest.approx(grpo([1.0, 0.0, 0.5]))
    assert feed.add("r00001-p0-s3", [0.7]) == "late"  # its group is closed
    assert feed.add("r00001-p1-s0", [1.0]) == "duplicate"


def test_each_trajectory_counts_once_and_strangers_are_counted_not_taken() -> None:
    c = core(global_batch_size=100)
    c.issue_round(0.0)
    feed = Feed(c)
    assert feed.add("r00001-p0-s0", [1.0]) == "member"
    assert feed.add("r00001-p0-s0", [1.0]) == "duplicate"  # a request finished twice
    assert feed.add("r00007-p0-s0", [1.0]) == "unknown"  # a round this buffer never issued
    assert feed.add("other-group-s0", [1.0]) == "unknown"
    assert feed.add("r00001-p0-s9", [1.0]) == "unknown"  # not a member of the group
    assert c.add_trajectory(trajectory("r00001-p0-s1", [0.0]), 2) == "replayed"  # at or before the last sequence
    assert len(c.state.open_groups[0].members) == 1
    assert c.state.totals == {"rounds": 1, "requests": 4, "trajectories": 1, "duplicate": 1, "unknown": 3}


def test_a_stale_member_is_dropped_before_advantages() -> None:
    c = core(n_samples_per_prompt=3, max_off_policy_steps=1, global_batch_size=2)
    c.state.batches_published = 3  # the next batch trains policy 3 into 4
    c.issue_round(0.0)
    feed = Feed(c)
    feed.add("r00001-p0-s0", [1.0], version=2)
    feed.add("r00001-p0-s1", [0.0], version=1)  # 3 - 1 > 1: stale
    feed.add("r00001-p0-s2", [0.4], version=3)
    (batch,) = c.state.outbox_batches
    assert [s.trajectory_id for s in batch.samples] == ["r00001-p0-s0", "r00001-p0-s2"]
    assert [s.turn_advantages[0] for s in batch.samples] == pytest.approx(grpo([1.0, 0.4]))
    assert batch.groups.stale_dropped == 1 and batch.min_policy_version == 2
    assert batch.groups.policy_lag_mean == pytest.approx((1 + 0) / 2)
    assert batch.step == 4


def test_a_group_without_reward_spread_is_filtered() -> None:
    c = core(global_batch_size=100)
    c.issue_round(0.0)
    feed = Feed(c)
    feed.add("r00001-p0-s0", [0.3, 0.5])
    feed.add("r00001-p0-s1", [0.3])  # same R_0
    assert c.state.kept == [] and c.state.tally.groups_filtered == 1 and c.state.tally.total_groups == 1


# ---------------------------------------------------------------- batches


def test_a_batch_takes_whole_groups_once_it_holds_global_batch_size() -> None:
    c = core(rollout_batch_size=3, n_samples_per_prompt=2, global_batch_size=3, num_rollout=1)
    c.issue_round(0.0)
    feed = Feed(c)
    feed.add("r00001-p0-s0", [1.0])
    feed.add("r00001-p0-s1", [0.0])
    assert c.state.outbox_batches == [] and c.pending_samples == 2
    feed.add("r00001-p1-s0", [1.0])
    feed.add("r00001-p1-s1", [0.0])  # 4 >= 3: both groups whole, not 3 samples
    (batch,) = c.state.outbox_batches
    assert batch.batch_id == "batch-000001" and batch.step == 1 and batch.total_steps == 2  # 6 samples / 3
    assert [s.trajectory_id for s in batch.samples] == ["r00001-p0-s0", "r00001-p0-s1", "r00001-p1-s0", "r00001-p1-s1"]
    assert [s.stream_seq for s in batch.samples] == [1, 2, 3, 4]
    c.clear_outbox()
    feed.add("r00001-p2-s0", [0.5])
    feed.add("r00001-p2-s1", [0.0])
    assert c.state.outbox_batches == []  # 2 < 3, but it is the last round:
    c.advance(1.0, 1)
    (last,) = c.state.outbox_batches
    assert last.step == 2 and len(last.samples) == 2 and c.state.finished
    c.clear_outbox()
    c.advance(2.0, 2)
    assert c.state.outbox_batches == [] and c.state.outbox_requests == [] and c.state.rounds_issued == 1


def test_the_group_summary_accounts_for_every_group_closed_since_the_previous_batch() -> None:
    c = core(rollout_batch_size=3, n_samples_per_prompt=2, global_batch_size=6, num_rollout=2, group_timeout_s=50.0,
             min_group_size=2)  # fmt: skip
    c.issue_round(0.0)
    feed = Feed(c)
    # p0: kept, one early exit (2 turns of 3); p1: filtered (same R_0); p2: times out with one member: dropped
    feed.add("r00001-p0-s0", [1.0, 0.5, 0.2], prompt=10, response=4, time_s=3.0)
    feed.add("r00001-p0-s1", [0.6, 0.2], prompt=10, response=6, time_s=2.0)
    feed.add("r00001-p1-s0", [0.0, 0.0, 0.0], prompt=7, response=1, time_s=1.5)
    feed.add("r00001-p1-s1", [0.0, 0.0, 0.0], prompt=7, response=1, time_s=1.5)
    feed.add("r00001-p2-s0", [0.5], prompt=3, response=2, time_s=0.5)
    c.advance(50.0, 0)  # p2 times out; round 2 goes out (1 batch projected - version 0 <= 1)
    assert c.state.outbox_batches == [] and c.pending_samples == 2
    for k, (a, b) in enumerate([(1.0, 0.0), (0.8, 0.4)]):
        feed.add(f"r00002-p{k}-s0", [a], prompt=1, response=1, time_s=1.0)
        feed.add(f"r00002-p{k}-s1", [b], prompt=1, response=1, time_s=1.0)
    (batch,) = c.state.outbox_batches
    g = batch.groups
    assert (g.total_groups, g.groups_kept, g.groups_filtered, g.groups_dropped) == (5, 3, 1, 1)
    assert (g.short_groups, g.lost_rollouts, g.stale_dropped) == (1, 1, 0)
    assert g.num_rollouts == 9
    assert g.num_early_exit == 1 + 1 + 4  # p0-s1 (2 turns), p2-s0 (1 turn), the 4 one-turn rollouts of round 2
    assert g.rollout_time_s == pytest.approx(3.0 + 2.0 + 1.5 + 1.5 + 0.5 + 4 * 1.0)
    assert g.total_tokens == 3 * 14 + 2 * 16 + 2 * 3 * 8 + 5 + 4 * 2  # (prompt + response) per turn
    assert g.trainable_tokens == 3 * 4 + 2 * 6 + 4 * 1  # response tokens of the kept rollouts
    returns0 = grpo([1.0, 0.6])
    table = [[returns0[0], grpo([0.5, 0.2])[0], 0.0], [returns0[1], grpo([0.5, 0.2])[1]],
             *[[a] for a in grpo([1.0, 0.0])], *[[a] for a in grpo([0.8, 0.4])]]  # fmt: skip
    assert [len(row) for row in g.turn_advantages] == [len(row) for row in table]  # rollouts x turns
    assert [a for row in g.turn_advantages for a in row] == pytest.approx([a for row in table for a in row])
    assert g.reward_mean == pytest.approx((1.0 + 0.6 + 0.0 + 0.0 + 0.5 + 1.0 + 0.0 + 0.8 + 0.4) / 9)
    assert g.reward_change is None and g.policy_lag_mean == 0.0
    c.clear_outbox()
    c.advance(100.0, 1)  # round 2's last group times out empty: all closed; a last batch reports it, with no samples
    (last,) = c.state.outbox_batches
    assert c.state.finished and last.step == 2 and last.samples == [] and last.total_steps == 2
    assert (last.groups.total_groups, last.groups.groups_dropped, last.groups.lost_rollouts) == (1, 1, 2)


def test_reward_change_is_against_the_previous_batch() -> None:
    c = core(rollout_batch_size=1, n_samples_per_prompt=2, global_batch_size=2, num_rollout=2)
    c.advance(0.0, 0)
    feed = Feed(c)
    feed.add("r00001-p0-s0", [1.0])
    feed.add("r00001-p0-s1", [0.0])
    c.advance(0.0, 0)
    feed.add("r00002-p0-s0", [1.0])
    feed.add("r00002-p0-s1", [0.6])
    first, second = c.state.outbox_batches
    assert first.groups.reward_mean == pytest.approx(0.5) and first.groups.reward_change is None
    assert second.groups.reward_mean == pytest.approx(0.8) and second.groups.reward_change == pytest.approx(0.3)


# ---------------------------------------------------------------- issuing


def run_round(c: BufferCore, feed: Feed, round_idx: int, version: int) -> None:
    for k in range(c.settings.rollout_batch_size):
        for i in range(c.settings.n_samples_per_prompt):
            feed.add(f"r{round_idx:05d}-p{k}-s{i}", [float(i)], version=version)


def test_synchronous_mode_issues_the_next_round_only_after_the_previous_batch_is_trained() -> None:
    c = core(num_rollout=3, rollout_batch_size=2, n_samples_per_prompt=2, max_off_policy_steps=0, max_inflight_groups=16)
    feed = Feed(c)
    c.advance(0.0, 0)
    assert c.state.rounds_issued == 1  # room for more groups, but round 2 would be trained by a newer policy
    run_round(c, feed, 1, version=0)
    assert c.state.batches_published == 1
    c.advance(1.0, 0)
    assert c.state.rounds_issued == 1  # the learner has not trained batch 1 yet
    c.advance(2.0, 1)
    assert c.state.rounds_issued == 2


def test_synchronous_mode_trains_a_round_as_one_batch_whatever_the_batch_size() -> None:
    """A second batch from one round would be trained by a policy newer than the one that sampled it, and dropped as
    stale: with max_off_policy_steps = 0 a batch holds at least a round."""
    c = core(num_rollout=2, rollout_batch_size=2, n_samples_per_prompt=2, global_batch_size=2, max_off_policy_steps=0)
    feed = Feed(c)
    c.advance(0.0, 0)
    feed.add("r00001-p0-s0", [1.0])
    feed.add("r00001-p0-s1", [0.0])
    assert c.state.outbox_batches == []  # 2 samples make global_batch_size, not a round
    feed.add("r00001-p1-s0", [1.0])
    feed.add("r00001-p1-s1", [0.0])
    (batch,) = c.state.outbox_batches
    assert len(batch.samples) == 4 and batch.groups.stale_dropped == 0


def test_synchronous_mode_goes_on_when_a_whole_round_is_filtered() -> None:
    c = core(num_rollout=3, rollout_batch_size=1, n_samples_per_prompt=2, max_off_policy_steps=0)
    feed = Feed(c)
    c.advance(0.0, 0)
    feed.add("r00001-p0-s0", [0.5])
    feed.add("r00001-p0-s1", [0.5])  # no spread: no batch, so nothing for the learner to train
    c.advance(1.0, 0)
    assert c.state.rounds_issued == 2 and c.state.batches_published == 0


def test_one_step_off_policy_lets_generation_run_one_batch_ahead() -> None:
    c = core(num_rollout=5, rollout_batch_size=2, n_samples_per_prompt=2, max_off_policy_steps=1, max_inflight_groups=16)
    feed = Feed(c)
    c.advance(0.0, 0)
    assert c.state.rounds_issued == 2  # round 2 makes batch 2, trained from version 1: one behind its sampler (0)
    run_round(c, feed, 1, version=0)
    c.advance(1.0, 0)
    assert c.state.rounds_issued == 2  # round 3 would be two behind
    c.advance(2.0, 1)
    assert c.state.rounds_issued == 3
    run_round(c, feed, 2, version=0)
    assert c.state.batches_published == 2 and c.state.tally.stale_dropped == 0


def test_groups_in_flight_are_bounded() -> None:
    c = core(num_rollout=0, rollout_batch_size=2, max_inflight_groups=5, max_off_policy_steps=100)
    c.advance(0.0, 0)
    assert c.state.rounds_issued == 2 and len(c.state.open_groups) == 4  # a third round would make 6
    c = core(num_rollout=0, rollout_batch_size=4, max_inflight_groups=2, max_off_policy_steps=100)
    c.advance(0.0, 0)
    assert c.state.rounds_issued == 1  # a bound below a round's size admits one round at a time
