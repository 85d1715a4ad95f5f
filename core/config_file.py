"""Loading a run's configuration: the TOML file, then ``--set section.key=value``, then named flags.

Every error is one ``ConfigError`` naming the key (``logger.fsync_interval_s: expected `float`, got
`str```), raised before anything starts.
"""

from __future__ import annotations

import math
import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from kernelrl.core.advantages import ESTIMATORS
from kernelrl.core.config import BACKENDS, ROLES, Config, WorkSettings
from kernelrl.core.subjects import RUN_ID


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


def parse_value(raw: str) -> Any:
    """A ``--set`` value: a TOML value (``30``, ``true``, ``"x"``, ``[1, 2]``) or else the text itself."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_assignment(text: str) -> tuple[list[str], Any]:
    """``section.key=value``; for a text key the value is the text as written (``evaluator.gpus=0`` is "0")."""
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. logger.verbose=true")
    value = parse_value(raw.strip())
    if not isinstance(value, str) and isinstance(field_type(path), msgspec.inspect.StrType):
        value = raw.strip()
    return path, value


def field_type(path: list[str]) -> msgspec.inspect.Type | None:
    """The declared type of the key at ``path`` in ``Config``, or None if there is no such key."""
    info: msgspec.inspect.Type = msgspec.inspect.type_info(Config)
    for part in path:
        if not isinstance(info, msgspec.inspect.StructType):
            return None
        fields = {f.name: f.type for f in info.fields}
        if part not in fields:
            return None
        info = fields[part]
    return info


def set_key(data: dict[str, Any], path: list[str], value: Any) -> None:
    node = data
    for depth, part in enumerate(path[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path[: depth + 1])}: is a value, not a table, so it has no key {path[depth + 1]!r}")
        node = child
    node[path[-1]] = value


def merge(into: dict[str, Any], data: Mapping[str, Any], prefix: str = "") -> None:
    for key, value in data.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            merge(into[key], value, f"{prefix}{key}.")
        else:
            into[key] = value


def check_keys(data: Mapping[str, Any], struct_type: type[msgspec.Struct], prefix: str = "") -> None:
    """Reject the first key the Struct (or a nested one) does not have, naming it and what is there."""
    info = msgspec.inspect.type_info(struct_type)
    assert isinstance(info, msgspec.inspect.StructType)
    fields = {f.name: f.type for f in info.fields}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            where = f"[{prefix[:-1]}]" if prefix else "the top level"
            raise ConfigError(f"{name}: unknown key (known in {where}: {known})")
        nested = fields[key]
        if isinstance(nested, msgspec.inspect.StructType) and isinstance(value, Mapping):
            check_keys(value, nested.cls, f"{name}.")


GPUS = re.compile(r"^(auto|cpu|[0-9A-Za-z-]+(,[0-9A-Za-z-]+)*)$")
_VALIDATION = re.compile(r"^(?P<what>.*?)(?: - at `\$\.?(?P<path>[^`]*)`)?$", re.DOTALL)


def describe(exc: msgspec.ValidationError) -> str:
    """msgspec's ``Expected `float`, got `str` - at `$.logger.x``` as ``logger.x: expected `float`, got `str```."""
    match = _VALIDATION.match(str(exc))
    if match is None or not match["path"]:
        return str(exc)
    what = match["what"]
    return f"{match['path']}: {what[:1].lower()}{what[1:]}"


def validate(config: Config) -> None:
    """Rules across keys that a type cannot say."""
    unknown = [role for role in config.run.roles if role not in ROLES]
    if unknown or not config.run.roles:
        raise ConfigError(f"run.roles: unknown role(s) {', '.join(unknown) or '(none given)'}; choose from {', '.join(ROLES)}")
    works: dict[str, WorkSettings] = {
        "evaluator.work": config.evaluator.work,
        "generator.work": config.generator.work,
        "learner.work": config.learner.work,
    }
    for key, work in works.items():
        if work.max_deliver < 1:
            raise ConfigError(f"{key}.max_deliver: must be at least 1 (a bounded number of deliveries), got {work.max_deliver}")
        if not 0 < work.in_progress_interval_s <= work.ack_wait_s / 2:
            raise ConfigError(
                f"{key}.in_progress_interval_s: must be positive and at most half of {key}.ack_wait_s ({work.ack_wait_s}), "
                f"got {work.in_progress_interval_s}"
            )
        for name in ("fetch_timeout_s", "ack_wait_s"):
            if not getattr(work, name) > 0:
                raise ConfigError(f"{key}.{name}: must be positive, got {getattr(work, name)}")
    if config.bus.replicas < 1:
        raise ConfigError(f"bus.replicas: must be at least 1, got {config.bus.replicas}")
    if config.bus.run and not RUN_ID.match(config.bus.run):
        raise ConfigError(f"bus.run: {config.bus.run!r} is not a run id: use 1-64 letters, digits, '_' or '-'")
    positive = {
        "bus.heartbeat_interval_s": config.bus.heartbeat_interval_s,
        "bus.publish_deadline_s": config.bus.publish_deadline_s,
        "bus.connect_timeout_s": config.bus.connect_timeout_s,
        "logger.fsync_interval_s": config.logger.fsync_interval_s,
        "logger.fetch_timeout_s": config.logger.fetch_timeout_s,
        "generator.concurrency": config.generator.concurrency,
        "generator.eval_timeout_s": config.generator.eval_timeout_s,
        "generator.sampling.max_new_tokens": config.generator.sampling.max_new_tokens,
        "learner.learning_rate": config.learner.learning_rate,
        "learner.clip_eps": config.learner.clip_eps,
        "learner.max_grad_norm": config.learner.max_grad_norm,
        "learner.max_tokens_per_gpu": config.learner.max_tokens_per_gpu,
        "buffer.rollout_batch_size": config.buffer.rollout_batch_size,
        "buffer.n_samples_per_prompt": config.buffer.n_samples_per_prompt,
        "buffer.max_inflight_groups": config.buffer.max_inflight_groups,
        "buffer.group_timeout_s": config.buffer.group_timeout_s,
        "buffer.state_interval_s": config.buffer.state_interval_s,
        "learner.eval_samples": config.learner.eval_samples,
        "learner.eval_timeout_s": config.learner.eval_timeout_s,
        "policy.epochs": config.policy.epochs,
        "policy.learning_rate": config.policy.learning_rate,
        "policy.batch_tokens": config.policy.batch_tokens,
        "policy.mini_layers": config.policy.mini_layers,
        "policy.mini_hidden": config.policy.mini_hidden,
        "policy.mini_heads": config.policy.mini_heads,
    }
    for key, value in positive.items():
        if not value > 0:
            raise ConfigError(f"{key}: must be positive, got {value}")
    if not GPUS.match(config.evaluator.gpus):
        raise ConfigError(f"evaluator.gpus: {config.evaluator.gpus!r}: use auto, cpu, or GPU indices such as 0,2")
    if config.generator.backend not in BACKENDS:
        raise ConfigError(f"generator.backend: {config.generator.backend!r}: choose from {', '.join(BACKENDS)}")
    for key, value in (("check.atol", config.check.atol), ("check.rtol", config.check.rtol)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(f"{key}: must be a finite number ≥ 0, got {value}")
    not_negative = {
        "learner.lora_rank": config.learner.lora_rank,
        "learner.truncate_is": config.learner.truncate_is,
        "learner.ratio_band": config.learner.ratio_band,
        "learner.kl_coef": config.learner.kl_coef,
        "learner.keep_versions": config.learner.keep_versions,
        "learner.eval_steps": config.learner.eval_steps,
        "learner.weight_decay": config.learner.weight_decay,
        "buffer.num_rollout": config.buffer.num_rollout,
        "buffer.global_batch_size": config.buffer.global_batch_size,
        "buffer.max_off_policy_steps": config.buffer.max_off_policy_steps,
        "buffer.min_group_std": config.buffer.min_group_std,
        "policy.target_loss": config.policy.target_loss,
    }
    for key, value in not_negative.items():
        if value < 0:
            raise ConfigError(f"{key}: must not be negative, got {value}")
    if config.learner.device not in ("auto", "cpu") and not config.learner.device.startswith("cuda"):
        raise ConfigError(f"learner.device: {config.learner.device!r}: use auto, cpu, cuda or cuda:N")
    if config.learner.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ConfigError(f"learner.dtype: {config.learner.dtype!r}: choose from auto, float32, bfloat16, float16")
    if 0 < config.learner.keep_versions < config.buffer.max_off_policy_steps + 2:
        raise ConfigError(f"learner.keep_versions: {config.learner.keep_versions} would delete versions generators may still "
                          f"load; use 0 (all) or at least buffer.max_off_policy_steps + 2 "
                          f"({config.buffer.max_off_policy_steps + 2})")  # fmt: skip
    if 0 < config.learner.ratio_band <= 1:
        raise ConfigError(f"learner.ratio_band: must be 0 (off) or above 1, got {config.learner.ratio_band}")
    if config.learner.loss_aggregation not in ("token", "sequence"):
        raise ConfigError(f"learner.loss_aggregation: {config.learner.loss_aggregation!r}: choose token or sequence")
    if config.buffer.advantage_estimator not in ESTIMATORS:
        estimator = config.buffer.advantage_estimator
        raise ConfigError(f"buffer.advantage_estimator: {estimator!r}: choose from {', '.join(ESTIMATORS)}")
    if not 0 <= config.buffer.heldout_fraction < 1:
        raise ConfigError(f"buffer.heldout_fraction: must be in [0, 1), got {config.buffer.heldout_fraction}")
    if not 1 <= config.buffer.min_group_size <= config.buffer.n_samples_per_prompt:
        raise ConfigError(f"buffer.min_group_size: must be between 1 and buffer.n_samples_per_prompt "
                          f"({config.buffer.n_samples_per_prompt}), got {config.buffer.min_group_size}")  # fmt: skip
    if config.policy.mini_hidden % config.policy.mini_heads:
        raise ConfigError(f"policy.mini_hidden: {config.policy.mini_hidden} is not a multiple of policy.mini_heads "
                          f"({config.policy.mini_heads})")  # fmt: skip
    if config.run.restart_budget < 0:
        raise ConfigError(f"run.restart_budget: must not be negative, got {config.run.restart_budget}")


def load_config(path: str | Path | None = None, sets: Iterable[str] = (), named: Mapping[str, Any] | None = None) -> Config:
    """The defaults, then the file (if any), then each ``--set`` in order, then the named flags
    (``{"bus.url": ...}``); a table given in part keeps the defaults of the keys it leaves out."""
    data: dict[str, Any] = msgspec.to_builtins(Config())
    if path:
        try:
            merge(data, tomllib.loads(Path(path).read_text()))
        except OSError as exc:
            raise ConfigError(f"config file {path}: {exc.strerror or exc}") from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"config file {path}: not valid TOML: {exc}") from None
    for text in sets:
        set_key(data, *parse_assignment(text))
    for key, value in (named or {}).items():
        set_key(data, key.split("."), value)
    check_keys(data, Config)
    try:
        config = msgspec.convert(data, Config, strict=True)
    except msgspec.ValidationError as exc:
        raise ConfigError(describe(exc)) from None
    validate(config)
    return config


def _without_none(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    return value


def config_toml(config: Config) -> str:
    """The effective configuration as a TOML file that loads back to the same ``Config`` (unset keys left out)."""
    return msgspec.toml.encode(_without_none(msgspec.to_builtins(config))).decode()
