"""Wire format: round trips, strict decoding, schema evolution."""

from __future__ import annotations

import msgspec
import pytest

from kernelrl.core import messages as m
from kernelrl.core.subjects import SUBJECT_TYPES, RunSubjects

EXAMPLES: list[m.Message] = [
    m.RolloutRequest(request_id="r1", run_id="x", problem_id="level1/19_ReLU", group_id="g", sample_idx=2, n_samples=8),
    m.EvalRequest(
        eval_id="e1",
        run_id="x",
        problem_id="level1/19_ReLU",
        candidate_source="code",
        reply_to="krl.x.eval.result.gen1",
    ),
    m.EvalResult(compiled=True, correctness=True, runtime=1.5, speedup=2.0, eval_id="e1", timings={"compile_s": 0.4}),
    m.TurnEvent(
        event_id="t1",
        timestamp=m.log_timestamp(),
        instance_id="level1/19_ReLU",
        turn_idx=1,
        turn_data=m.TurnData(prompt=[m.ChatMessage("user", "hi")], response="r", reward=0.4, response_token_ids=[1, 2]),
    ),
    m.TrajectoryEvent(
        event_id="tr1",
        timestamp="20250807_084801_412128",
        instance_id="p",
        final_reward=1.0,
        num_turns=2,
        turn_rewards=[0.1, 1.0],
        aggregated_return=0.5,
    ),
    m.StepSummary(event_id="s1", step=3, groups=m.GroupSummary(total_groups=8, turn_advantages=[[0.5, -0.5]])),
    m.EvalSummary(event_id="ev1", step=10, accuracy=0.85, correct_answers=85, total_samples=100),
    m.TrainBatch(
        batch_id="b1",
        run_id="x",
        step=1,
        samples=[m.BatchSample(stream_seq=7, trajectory_id="tr1", turn_advantages=[0.3])],
    ),
    m.PolicyUpdate(version=4, path="/ckpt/v4", sha256="ab" * 32),
    m.Heartbeat(
        role="logger",
        actor_id="l1",
        host="h",
        pid=1,
        state="running",
        updated_at=1.0,
        counters={"written": 3},
        gauges={"last_fsync_ms": 1.5},
    ),
    m.WorkParked(
        event_id="parked-learner-b1",
        timestamp="20250807_084801_411804",
        run_id="r",
        role="learner",
        consumer="learner",
        stream="KRL_r_BATCH",
        stream_seq=7,
        deliveries=3,
        message_type="TrainBatch",
        message_id="b1",
        parked_subject="krl.r.parked.learner",
    ),
]


def test_every_message_type_has_an_example() -> None:
    assert {type(e) for e in EXAMPLES} == set(m.MESSAGE_TYPES)


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda e: type(e).__name__)
def test_message_round_trips_through_its_codec(msg: m.Message) -> None:
    codec = m.codec_for(type(msg))
    assert codec.decode(codec.encode(msg)) == msg


@pytest.mark.parametrize("msg", EXAMPLES, ids=lambda e: type(e).__name__)
def test_every_message_carries_the_schema_version(msg: m.Message) -> None:
    assert msgspec.json.decode(m.codec_for(type(msg)).encode(msg))["v"] == m.SCHEMA_VERSION


def test_turn_record_keeps_the_seed_field_names() -> None:
    turn = msgspec.json.decode(m.codec_for(m.TurnEvent).encode(EXAMPLES[3]))
    assert {"timestamp", "instance_id", "turn_idx", "turn_data"} <= turn.keys()
    assert {"prompt", "response", "kernel_code", "eval_result", "reward", "extra_info"} <= turn["turn_data"].keys()
    assert {"compiled", "correctness", "runtime", "speedup", "error_message"} <= turn["turn_data"]["eval_result"].keys()


def test_trajectory_record_keeps_the_seed_field_names() -> None:
    tr = msgspec.json.decode(m.codec_for(m.TrajectoryEvent).encode(EXAMPLES[4]))
    assert {
        "final_reward",
        "num_turns",
        "turn_rewards",
        "aggregated_return",
        "history",
        "messages",
        "execution_details",
        "extra_info",
    } <= tr.keys()
    assert set(tr["execution_details"]) == {"final_compiled", "final_correctness", "final_runtime", "final_speedup"}


def test_wrong_field_type_is_rejected_with_type_and_field_named() -> None:
    with pytest.raises(m.DecodeError, match=r"RolloutRequest.*sample_idx"):
        m.codec_for(m.RolloutRequest).decode(
            b'{"request_id":"r","run_id":"x","problem_id":"p","group_id":"g","sample_idx":"two","n_samples":1}'
        )


def test_missing_required_field_is_rejected() -> None:
    with pytest.raises(m.DecodeError, match="eval_id"):
        m.codec_for(m.EvalRequest).decode(b'{"run_id":"x","problem_id":"p","candidate_source":"","reply_to":"r"}')


def test_invalid_json_is_rejected() -> None:
    with pytest.raises(m.DecodeError, match="PolicyUpdate"):
        m.codec_for(m.PolicyUpdate).decode(b"{not json")


def test_older_reader_ignores_a_field_added_later() -> None:
    newer = msgspec.json.decode(m.codec_for(m.PolicyUpdate).encode(EXAMPLES[8]))
    newer["added_in_v2"] = {"anything": [1, 2]}
    newer["v"] = 2
    decoded = m.codec_for(m.PolicyUpdate).decode(msgspec.json.encode(newer))
    assert decoded.version == 4 and decoded.v == 2


def test_newer_reader_fills_defaults_for_fields_an_older_writer_lacked() -> None:
    old = b'{"event_id":"t","timestamp":"x","instance_id":"p","turn_idx":0,"turn_data":{"response":"r","reward":0.5}}'
    turn = m.codec_for(m.TurnEvent).decode(old)
    assert turn.v == m.SCHEMA_VERSION
    assert turn.policy_version == 0 and turn.trajectory_id == ""
    assert turn.turn_data.eval_result == m.EvalResult()
    assert turn.turn_data.response_token_ids == []


def test_codec_refuses_to_encode_another_type() -> None:
    with pytest.raises(TypeError):
        m.codec_for(m.PolicyUpdate).encode(EXAMPLES[0])  # type: ignore[arg-type]


def test_message_id_is_the_messages_own_id() -> None:
    assert [m.message_id(e) for e in EXAMPLES[:3]] == ["r1", "e1", "e1"]
    assert m.message_id(EXAMPLES[8]) == "policy-4"


def test_subjects_are_scoped_by_run_and_typed() -> None:
    rs = RunSubjects("exp-7")
    assert rs.rollout_request == "krl.exp-7.rollout.request"
    assert rs.eval_result("gen-1") == "krl.exp-7.eval.result.gen-1"
    assert rs.type_for(rs.event_turn) is m.TurnEvent
    assert rs.type_for(rs.eval_result("g")) is m.EvalResult
    assert rs.type_for("krl.other.event.turn") is None
    assert set(SUBJECT_TYPES.values()) <= set(m.MESSAGE_TYPES)


def test_run_id_that_cannot_be_a_subject_token_is_refused() -> None:
    with pytest.raises(ValueError, match="run id"):
        RunSubjects("my.run")
