"""The one place a subject, stream, consumer or bucket name is spelled.

Subjects are ``krl.<run>.<noun>[.<detail>]`` so runs share a server without mixing; which message type
travels on each subject is fixed here too (``SUBJECT_TYPES``).
"""

from __future__ import annotations

import re

import msgspec

from kernelrl.core import messages as m

RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_PUBLISHABLE_TOKEN = re.compile(r"^[!-~]+$")  # printable ASCII, no spaces


def publishable_subject(subject: object) -> bool:
    """Whether ``subject`` can be published to: dot-separated printable tokens, no wildcards, at most 255 chars.

    A malformed subject would make the server drop the publishing connection, so replies are checked first.
    """
    if not isinstance(subject, str) or not subject or len(subject) > 255:
        return False
    return all(_PUBLISHABLE_TOKEN.match(t) and t not in ("*", ">") for t in subject.split("."))


class RunSubjects(msgspec.Struct, frozen=True):
    run: str

    def __post_init__(self) -> None:
        if not RUN_ID.match(self.run):
            raise ValueError(
                f"run id {self.run!r} is not valid: use 1-64 letters, digits, '_' or '-' "
                "(it becomes part of subject, stream and bucket names)"
            )

    # subjects
    @property
    def root(self) -> str:
        return f"krl.{self.run}"

    @property
    def rollout_request(self) -> str:
        return f"krl.{self.run}.rollout.request"

    @property
    def eval_request(self) -> str:
        return f"krl.{self.run}.eval.request"

    def eval_result(self, generator_id: str) -> str:
        return f"krl.{self.run}.eval.result.{generator_id}"

    @property
    def eval_results(self) -> str:
        return f"krl.{self.run}.eval.result.>"

    def is_eval_result(self, subject: str) -> bool:
        return subject.startswith(f"krl.{self.run}.eval.result.")

    @property
    def event_turn(self) -> str:
        return f"krl.{self.run}.event.turn"

    @property
    def event_trajectory(self) -> str:
        return f"krl.{self.run}.event.trajectory"

    @property
    def event_step(self) -> str:
        return f"krl.{self.run}.event.step"

    @property
    def event_eval(self) -> str:
        return f"krl.{self.run}.event.eval"

    @property
    def event_parked(self) -> str:
        return f"krl.{self.run}.event.parked"

    def parked(self, consumer: str) -> str:
        return f"krl.{self.run}.parked.{consumer}"

    @property
    def parked_all(self) -> str:
        return f"krl.{self.run}.parked.>"

    @property
    def events(self) -> str:
        return f"krl.{self.run}.event.>"

    @property
    def batch(self) -> str:
        return f"krl.{self.run}.batch"

    # streams (names may not contain '.')
    @property
    def rollout_stream(self) -> str:
        return f"KRL_{self.run}_ROLLOUT"

    @property
    def eval_stream(self) -> str:
        return f"KRL_{self.run}_EVAL"

    @property
    def event_stream(self) -> str:
        return f"KRL_{self.run}_EVENTS"

    @property
    def batch_stream(self) -> str:
        return f"KRL_{self.run}_BATCH"

    @property
    def results_stream(self) -> str:
        return f"KRL_{self.run}_RESULTS"

    @property
    def parked_stream(self) -> str:
        return f"KRL_{self.run}_PARKED"

    # KV buckets
    @property
    def policy_bucket(self) -> str:
        return f"krl-{self.run}-policy"

    @property
    def actors_bucket(self) -> str:
        return f"krl-{self.run}-actors"

    @property
    def buffer_bucket(self) -> str:
        """The buffer's checkpointed state (key ``BUFFER_STATE_KEY``): what a restarted buffer resumes from."""
        return f"krl-{self.run}-buffer"

    def type_for(self, subject: str) -> type[m.Message] | None:
        """The message type that travels on ``subject``, or None for a subject outside this run."""
        prefix = self.root + "."
        if not subject.startswith(prefix):
            return None
        rest = subject[len(prefix) :]
        if rest.startswith("eval.result."):
            return m.EvalResult
        return SUBJECT_TYPES.get(rest)


# consumer durable names
GENERATORS_CONSUMER = "generators"
EVALUATORS_CONSUMER = "evaluators"
LOGGER_CONSUMER = "logger"
BUFFER_CONSUMER = "buffer"
LEARNER_CONSUMER = "learner"

POLICY_LATEST_KEY = "latest"
EVAL_GROUP_PREFIX = "eval-"  # group ids of evaluation rollouts (``kernelrl eval``, the learner's eval_steps): never trained


def is_eval_group(group_id: str) -> bool:
    """A held-out evaluation rollout's group (never trained, left out of training summaries)."""
    return group_id.startswith(EVAL_GROUP_PREFIX)


BUFFER_STATE_KEY = "state"

SUBJECT_TYPES: dict[str, type[m.Message]] = {
    "rollout.request": m.RolloutRequest,
    "eval.request": m.EvalRequest,
    "event.turn": m.TurnEvent,
    "event.trajectory": m.TrajectoryEvent,
    "event.step": m.StepSummary,
    "event.eval": m.EvalSummary,
    "event.parked": m.WorkParked,
    "batch": m.TrainBatch,
}
