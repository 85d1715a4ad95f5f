"""Loading a run's configuration: the TOML file, then ``--set section.key=value``, then named flags.

Every error is one ``ConfigError`` naming the key (``logger.fsync_interval_s: expected `float`, got
`str```), raised before anything starts.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import msgspec

from kernelrl.core.config import ROLES, Config, WorkSettings


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the key."""


def parse_value(raw: str) -> Any:
    """A ``--set`` value: a TOML value (``30``, ``true``, ``"x"``, ``[1, 2]``) or else the text itself."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_assignment(text: str) -> tuple[list[str], Any]:
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.split(".")]
    if not sep or len(path) < 2 or not all(path):
        raise ConfigError(f"--set {text!r}: expected section.key=value, e.g. logger.verbose=true")
    return path, parse_value(raw.strip())


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
        if not 0 < work.in_progress_interval_s < work.ack_wait_s:
            raise ConfigError(
                f"{key}.in_progress_interval_s: must be positive and below {key}.ack_wait_s ({work.ack_wait_s}), "
                f"got {work.in_progress_interval_s}"
            )
    if config.bus.replicas < 1:
        raise ConfigError(f"bus.replicas: must be at least 1, got {config.bus.replicas}")
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
