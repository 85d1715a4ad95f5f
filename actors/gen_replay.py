"""The ``replay`` backend: answers taken from a run's ``turns.jsonl``, matched by problem and turn.

It reproduces a run and drives the whole pipeline with no model. For (problem, turn) the logged responses
are served in turn by sample index; a dialogue that goes on longer than any logged one for its problem gets
that problem's last logged turn again. Token ids and log-probs are those the log recorded (empty if none).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import msgspec

from kernelrl.actors.gen_backend import BackendError, Completion, GenerateRequest, Generation
from kernelrl.core import messages as m
from kernelrl.core.config import GeneratorSettings


class ReplayBackend:
    name = "replay"

    def __init__(self, settings: GeneratorSettings, path: Path | None = None) -> None:
        self.path = path or Path(settings.replay_log)
        self.policy_version = 0
        self._turns: dict[str, dict[int, list[m.TurnData]]] = {}

    async def start(self) -> None:
        if not self.path.is_file():
            raise BackendError(f"generator.replay_log: {self.path} is not a file (a turns.jsonl of an earlier run)")
        decoder = msgspec.json.Decoder(m.TurnEvent)
        turns: dict[str, dict[int, list[m.TurnData]]] = defaultdict(lambda: defaultdict(list))
        with self.path.open("rb") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    event = decoder.decode(line)
                except msgspec.ValidationError as exc:
                    raise BackendError(f"{self.path}:{n}: not a turn record: {exc}") from None
                except msgspec.DecodeError:
                    continue  # a torn last line of a killed writer
                turns[event.instance_id][event.turn_idx].append(event.turn_data)
        if not turns:
            raise BackendError(f"generator.replay_log: {self.path} holds no turns")
        self._turns = {problem: dict(by_turn) for problem, by_turn in turns.items()}

    def responses(self, problem_id: str, turn_idx: int) -> list[m.TurnData]:
        by_turn = self._turns.get(problem_id)
        if not by_turn:
            raise BackendError(f"replay: {self.path} has no turns for problem {problem_id}")
        logged = [t for t in by_turn if t <= turn_idx]
        return by_turn[max(logged) if logged else min(by_turn)]

    async def generate(self, request: GenerateRequest) -> Generation:
        logged = self.responses(request.problem_id, request.turn_idx)
        completions = []
        for i in range(request.n):
            data = logged[(request.sample_idx + i) % len(logged)]
            completions.append(Completion(text=data.response, token_ids=list(data.response_token_ids),
                                          logprobs=list(data.response_logprobs), finish_reason="stop"))  # fmt: skip
        prompt_ids = request.prompt_token_ids if request.prompt_token_ids is not None else list(logged[0].prompt_token_ids)
        return Generation(prompt_token_ids=prompt_ids, completions=completions, policy_version=self.policy_version)

    async def apply_update(self, update: m.PolicyUpdate) -> None:
        self.policy_version = update.version  # nothing to load: the answers are the log's

    async def close(self) -> None:
        self._turns = {}
