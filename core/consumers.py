"""Every durable consumer of a run, one row per owning role: the table ``Bus.provision`` creates them from.

A work consumer (a work-queue stream: rollouts, eval requests, train batches) has bounded deliveries; a
message that exhausts them is parked by the owning role's ``WorkLoop``. The logger's consumer reads the
event log and is unbounded: an event is never given up, only retried until a logger can write it.
"""

from __future__ import annotations

import msgspec
from nats.js import api

from kernelrl.core import subjects as s
from kernelrl.core.config import Config, WorkSettings


class ConsumerSpec(msgspec.Struct, frozen=True, kw_only=True):
    role: str
    stream: str
    durable: str
    ack_wait_s: float
    max_deliver: int  # -1: unbounded
    max_ack_pending: int
    filter_subject: str | None

    @property
    def bounded(self) -> bool:
        return self.max_deliver > 0

    def consumer_config(self) -> api.ConsumerConfig:
        return api.ConsumerConfig(
            durable_name=self.durable,
            deliver_policy=api.DeliverPolicy.ALL,
            ack_policy=api.AckPolicy.EXPLICIT,
            ack_wait=self.ack_wait_s,
            max_deliver=self.max_deliver,
            max_ack_pending=self.max_ack_pending,
            filter_subject=self.filter_subject,
        )


def _work(role: str, stream: str, durable: str, work: WorkSettings) -> ConsumerSpec:
    return ConsumerSpec(role=role, stream=stream, durable=durable, ack_wait_s=work.ack_wait_s, max_deliver=work.max_deliver,
                        max_ack_pending=work.max_ack_pending, filter_subject=None)  # fmt: skip


def consumer_table(config: Config) -> tuple[ConsumerSpec, ...]:
    st = s.RunSubjects(config.bus.run)
    return (
        _work("generator", st.rollout_stream, s.GENERATORS_CONSUMER, config.generator.work),
        _work("evaluator", st.eval_stream, s.EVALUATORS_CONSUMER, config.evaluator.work),
        _work("learner", st.batch_stream, s.LEARNER_CONSUMER, config.learner.work),
        ConsumerSpec(
            role="logger",
            stream=st.event_stream,
            durable=s.LOGGER_CONSUMER,
            ack_wait_s=config.logger.ack_wait_s,
            max_deliver=-1,
            max_ack_pending=config.logger.max_ack_pending,
            filter_subject=st.events,
        ),
    )


def consumer_for(config: Config, role: str) -> ConsumerSpec:
    """The one consumer ``role`` pulls from."""
    for spec in consumer_table(config):
        if spec.role == role:
            return spec
    raise KeyError(f"no consumer is declared for role {role!r}")
