"""Where a run lives on disk, and how commands find a run and its broker without being told.

Each ``kernelrl run`` gets a fresh, readable, time-based run id (``20261124-071530``) and its own directory
``runs/<id>/`` (NATS store, logs, the broker's URL in ``nats.url``, the effective ``config.toml``);
``runs/latest`` points at the newest. ``--run ID`` continues that run on purpose. Commands resolve the broker
in this order: the configuration (``--nats``, ``--set bus.url=…``, the ``--config`` file), ``$KRL_NATS``, the
latest local run's ``nats.url``, then ``nats://127.0.0.1:4222`` (the NATS convention); the run id likewise:
``bus.run``, ``$KRL_RUN``, the latest local run, then ``default``.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import os
from pathlib import Path

import msgspec

from kernelrl.core.config import Config, RunSettings

DEFAULT_NATS = "nats://127.0.0.1:4222"
DEFAULT_RUN = "default"
RUNS_ROOT = Path(RunSettings().runs_root)
LATEST = "latest"
URL_FILE = "nats.url"
CONFIG_FILE = "config.toml"  # the effective configuration, written by ``kernelrl run``, read by its children


class RunDirectory(msgspec.Struct, frozen=True):
    root: str
    run_id: str

    @property
    def path(self) -> Path:
        return Path(self.root) / self.run_id

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def nats_store(self) -> Path:
        return self.path / "nats"

    @property
    def url_file(self) -> Path:
        return self.path / URL_FILE

    def create(self) -> None:
        """Make the directory and point ``<root>/latest`` at it (atomically: a symlink renamed into place)."""
        self.path.mkdir(parents=True, exist_ok=True)
        latest = Path(self.root) / LATEST
        staging = Path(self.root) / f".{LATEST}.{os.getpid()}"
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        staging.symlink_to(self.run_id)
        staging.replace(latest)

    def write_url(self, url: str) -> None:
        staging = self.url_file.with_suffix(".tmp")
        staging.write_text(url + "\n")
        staging.replace(self.url_file)


def new_run_id(root: Path = RUNS_ROOT, now: dt.datetime | None = None) -> str:
    """A readable id from the local time, with a suffix if a run of that second already exists."""
    base = (now or dt.datetime.now()).strftime("%Y%m%d-%H%M%S")
    run_id, n = base, 1
    while (root / run_id).exists():
        n += 1
        run_id = f"{base}-{n}"
    return run_id


def latest_run(root: Path = RUNS_ROOT) -> RunDirectory | None:
    link = root / LATEST
    try:
        target = os.readlink(link)
    except OSError:
        return None
    run_id = Path(target).name
    return RunDirectory(root=str(root), run_id=run_id) if (root / run_id).is_dir() else None


def resolve_nats_url(explicit: str | None, root: Path = RUNS_ROOT) -> tuple[str, str]:
    """(url, where it came from)."""
    if explicit:
        return explicit, "--nats"
    if os.environ.get("KRL_NATS"):
        return os.environ["KRL_NATS"], "$KRL_NATS"
    latest = latest_run(root)
    if latest is not None and latest.url_file.is_file():
        url = latest.url_file.read_text().strip()
        if url:
            return url, f"{latest.url_file}"
    return DEFAULT_NATS, "default"


def resolve_run_id(explicit: str | None, root: Path = RUNS_ROOT) -> str:
    if explicit:
        return explicit
    if os.environ.get("KRL_RUN"):
        return os.environ["KRL_RUN"]
    latest = latest_run(root)
    return latest.run_id if latest is not None else DEFAULT_RUN


def run_dir_of(config: Config) -> Path:
    """The directory of the run ``config`` describes: ``run.run_dir``, else ``<run.runs_root>/<bus.run>``."""
    return Path(config.run.run_dir) if config.run.run_dir else Path(config.run.runs_root) / config.bus.run
