"""One configuration: a TOML file, ``--set`` and named flags, checked before anything starts."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import tomllib
from pathlib import Path

import pytest

from kernelrl.core import subjects as s
from kernelrl.core.bus import Bus
from kernelrl.core.config import BusSettings, Config, EvaluatorSettings
from kernelrl.core.config_file import ConfigError, config_toml, load_config
from kernelrl.core.run_dirs import CONFIG_FILE, latest_run

from helpers import command_env, kernelrl_cmd, wait_for


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def error_of(*args: object, **kwargs: object) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(*args, **kwargs)  # type: ignore[arg-type]
    return str(caught.value)


@pytest.mark.parametrize(
    ("text", "key", "says"),
    [
        ("[logger]\nfsync_intervall_s = 1\n", "logger.fsync_intervall_s", "unknown key"),
        ("[loger]\nverbose = true\n", "loger", "unknown key"),
        ("[evaluator.limits]\nload_time_s = 1\nbogus = 2\n", "evaluator.limits.bogus", "unknown key"),
        ('[logger]\nfsync_interval_s = "fast"\n', "logger.fsync_interval_s", "expected `float`, got `str`"),
        ("[bus]\nreplicas = 1.5\n", "bus.replicas", "expected `int`, got `float`"),
        ('[run]\nroles = "logger"\n', "run.roles", "expected `array`, got `str`"),
        ('[run]\nroles = ["logger", "generatr"]\n', "run.roles", "generatr"),
        ("logger = 3\n", "logger", "expected `object`, got `int`"),
        ("[learner.work]\nmax_deliver = 0\n", "learner.work.max_deliver", "at least 1"),
        ("[evaluator.work]\nin_progress_interval_s = 400\n", "evaluator.work.in_progress_interval_s", "at most half"),
        ('[bus]\nrun = "a.b"\n', "bus.run", "not a run id"),
        ("[bus]\nheartbeat_interval_s = 0\n", "bus.heartbeat_interval_s", "must be positive"),
        ('[evaluator]\ngpus = "0;1"\n', "evaluator.gpus", "GPU indices"),
        ('[generator]\nbackend = "tgi"\n', "generator.backend", "choose from"),
    ],
)
def test_a_bad_file_is_one_error_naming_the_key(tmp_path: Path, text: str, key: str, says: str) -> None:
    message = error_of(write(tmp_path, text))
    assert message.startswith(f"{key}:"), message
    assert says in message


def test_a_text_key_set_on_the_command_line_keeps_its_text() -> None:
    config = load_config(sets=["evaluator.gpus=0", "bus.run=42", "bus.url=nats://h:4222", "evaluator.limits.load_time_s=3"])
    assert (config.evaluator.gpus, config.bus.run, config.bus.url) == ("0", "42", "nats://h:4222")
    assert config.evaluator.limits.load_time_s == 3.0


def test_set_and_named_flags_are_checked_like_the_file() -> None:
    assert error_of(sets=["evaluator.limits.load_time_s=soon"]).startswith("evaluator.limits.load_time_s: expected `float`")
    assert error_of(sets=["logger.nope=1"]).startswith("logger.nope: unknown key")
    assert "expected section.key=value" in error_of(sets=["verbose"])
    assert error_of(named={"bus.replicas": "three"}).startswith("bus.replicas: expected `int`")


def test_a_file_that_is_not_toml_or_not_there_is_named(tmp_path: Path) -> None:
    assert "not valid TOML" in error_of(write(tmp_path, "[logger\n"))
    assert error_of(tmp_path / "missing.toml").startswith(f"config file {tmp_path / 'missing.toml'}")


def test_the_file_then_set_then_named_flags_and_untouched_keys_keep_their_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, "[evaluator.limits]\nload_time_s = 5\ncorrectness_time_s = 6\n[bus]\nreplicas = 3\n")
    config = load_config(path, sets=["evaluator.limits.correctness_time_s=7", 'bus.url="nats://a:1"'],
                         named={"bus.url": "nats://b:2"})  # fmt: skip
    defaults = Config()
    assert config.evaluator.limits.load_time_s == 5.0  # file
    assert config.evaluator.limits.correctness_time_s == 7.0  # --set beats the file
    assert config.bus.url == "nats://b:2"  # a named flag beats --set
    assert config.bus.replicas == 3
    assert config.evaluator.limits.benchmark_time_s == defaults.evaluator.limits.benchmark_time_s
    assert config.evaluator.work == defaults.evaluator.work
    assert config.logger == defaults.logger


def test_the_printed_configuration_loads_back_to_the_same_values(tmp_path: Path) -> None:
    config = load_config(sets=["check.atol=0.01", "run.roles=['logger']", "evaluator.gpus=0,1"])
    path = write(tmp_path, config_toml(config))
    assert load_config(path) == config
    assert load_config(write(tmp_path, config_toml(Config()))) == Config()


def run_command(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(kernelrl_cmd(*args), cwd=cwd, env=command_env(), capture_output=True, text=True, timeout=60)


def test_a_bad_key_stops_kernelrl_run_before_anything_starts(tmp_path: Path) -> None:
    done = run_command(tmp_path, "run", "--set", "evaluator.limits.corectness_time_s=30")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [done.stderr.strip()]  # one line, no traceback
    assert "evaluator.limits.corectness_time_s: unknown key" in done.stderr
    assert not (tmp_path / "runs").exists()  # no run directory, no broker, no child


def test_print_config_shows_the_effective_values(tmp_path: Path) -> None:
    path = write(tmp_path, "[logger]\nfsync_interval_s = 0.5\n")
    done = run_command(tmp_path, "run", "--config", str(path), "--set", "evaluator.work.max_deliver=4", "--verbose",
                       "--print-config")  # fmt: skip
    assert done.returncode == 0, done.stderr
    shown = tomllib.loads(done.stdout)
    assert shown["logger"]["fsync_interval_s"] == 0.5
    assert shown["logger"]["verbose"] is True
    assert shown["evaluator"]["work"]["max_deliver"] == 4
    assert shown["evaluator"]["work"]["ack_wait_s"] == EvaluatorSettings().work.ack_wait_s
    assert not (tmp_path / "runs").exists()


async def test_a_run_provisions_its_consumers_from_the_configuration_and_records_it(tmp_path: Path) -> None:
    path = write(tmp_path, "[evaluator.work]\nack_wait_s = 77\nmax_deliver = 4\n[learner.work]\nmax_deliver = 2\n")
    argv = kernelrl_cmd("run", "--config", str(path), "--roles", "logger", "--sample-steps", "0")
    run = subprocess.Popen(argv, cwd=tmp_path, env=command_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        await wait_for(lambda: (d := latest_run(tmp_path / "runs")) is not None and (d.path / CONFIG_FILE).exists(), 60,
                       "the run's config.toml")  # fmt: skip
        run_dir = latest_run(tmp_path / "runs")
        assert run_dir is not None
        recorded = load_config(run_dir.path / CONFIG_FILE)
        assert recorded.bus.run == run_dir.run_id and recorded.bus.url == run_dir.url_file.read_text().strip()
        assert Path(recorded.logger.log_dir) == (tmp_path / run_dir.logs).resolve()
        assert recorded.evaluator.work.ack_wait_s == 77.0
        bus = await Bus.connect(BusSettings(url=recorded.bus.url, run=run_dir.run_id), name="test")
        try:
            evaluators = await bus.js.consumer_info(bus.subjects.eval_stream, s.EVALUATORS_CONSUMER)
            learner = await bus.js.consumer_info(bus.subjects.batch_stream, s.LEARNER_CONSUMER)
        finally:
            await bus.close()
        assert evaluators.config.ack_wait == 77.0 and evaluators.config.max_deliver == 4
        assert learner.config.max_deliver == 2
    finally:
        run.send_signal(signal.SIGINT)
        out, _ = await asyncio.to_thread(run.communicate, timeout=90)
    assert run.returncode == 0, out
