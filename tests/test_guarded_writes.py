"""Every write and folder creation goes through astkit.store's guarded path:
a file in the way, no permission, a read-only file system or a full disk is
one line with exit 2, nothing is half-written, and modes follow the umask.

Running as root, chmod does not stop a write, so permission, read-only and
full-disk failures are simulated by making os / safetensors raise the error
the kernel (or safetensors) raises.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import SafetensorError

from astkit import Engine, hookimpl, store
from astkit.cli.common import EXIT_USAGE, invoke, os_error_message
from astkit.metrics_log import MetricsLog
from astkit.errors import UserError

from conftest import TINY, tiny_config

CLI_TINY = [arg for item in TINY for arg in ("--set", item)]


@pytest.fixture(scope="module")
def experts_dir(tmp_path_factory, digits) -> Path:
    tmp = tmp_path_factory.mktemp("guarded")
    engine = Engine(tiny_config(tmp), dataset=digits)
    engine.train_experts()
    return engine.folder.experts


def astkit(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "astkit", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120, env=env)


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == EXIT_USAGE, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    return errors[0]


def leftovers(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# --------------------------------------------------------- --out is a file
@pytest.mark.parametrize("command", ["distill", "run"])
def test_out_that_is_a_file_is_one_line_exit_2_and_creates_nothing(tmp_path, experts_dir, command):
    blocker = tmp_path / "taken"
    blocker.write_text("not a folder\n")
    extra = ["--set", f"experts.dir={experts_dir}"] if command == "distill" else []
    result = astkit(command, *CLI_TINY, *extra, "--out", "taken", "-q", cwd=tmp_path)
    line = one_error_line(result)
    assert "taken is a file, not a folder" in line and "; " in line, line
    assert blocker.read_text() == "not a folder\n"
    assert leftovers(tmp_path) == ["taken"]


def test_engine_distill_into_a_file_is_a_user_error(tmp_path, digits, experts_dir):
    (tmp_path / "run").write_text("x")
    engine = Engine(tiny_config(tmp_path, f"experts.dir={experts_dir}"), dataset=digits)
    with pytest.raises(UserError, match=r"run is a file, not a folder; remove it or choose another folder"):
        engine.distill()
    assert leftovers(tmp_path) == ["run"]


@pytest.mark.parametrize("number, fragment", [
    (errno.EACCES, "permission denied; check the folder's permissions"),
    (errno.EROFS, "read-only file system; choose a folder on a writable file system"),
    (errno.ENOSPC, "disk full while writing"),
])
def test_folder_creation_errors_are_named(tmp_path, monkeypatch, number, fragment):
    def refuse(self, *args, **kwargs):
        raise OSError(number, os.strerror(number), str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(UserError) as caught:
        store.make_dir(tmp_path / "a" / "b")
    message = str(caught.value)
    assert fragment in message and str(tmp_path / "a" / "b") in message and "\n" not in message


# -------------------------------------------------- atomic tensor / text writes
def _good_file(tmp_path: Path) -> tuple[Path, bytes]:
    path = tmp_path / "d.safetensors"
    store.save(path, "distilled", {"images": torch.zeros(3)}, {})
    return path, path.read_bytes()


@pytest.mark.parametrize("message, fragment", [
    ("Error while serializing: I/O error: No space left on device (os error 28)", "disk full while writing"),
    ('Error while serializing: I/O error: Read-only file system (os error 30) at path "x"', "read-only file system"),
    ("Error while serializing: IoError: Permission denied", "permission denied"),
])
def test_a_safetensors_error_is_mapped_and_leaves_the_previous_file(tmp_path, monkeypatch, message, fragment):
    path, good = _good_file(tmp_path)

    def failing_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a fi")  # what a cut write leaves
        raise SafetensorError(message)

    monkeypatch.setattr(store, "save_file", failing_save)
    with pytest.raises(UserError, match=fragment) as caught:
        store.save(path, "distilled", {"images": torch.ones(3)}, {})
    assert str(path) in str(caught.value)
    assert path.read_bytes() == good
    assert leftovers(tmp_path) == ["d.safetensors"]


@pytest.mark.parametrize("number, fragment", [
    (errno.EROFS, "read-only file system"),
    (errno.EACCES, "permission denied"),
    (errno.ENOSPC, "disk full while writing"),
])
def test_a_failed_rename_is_mapped_and_leaves_no_temporary(tmp_path, monkeypatch, number, fragment):
    path, good = _good_file(tmp_path)

    def refuse(*args, **kwargs):
        raise OSError(number, os.strerror(number))

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(UserError, match=fragment):
        store.save(path, "distilled", {"images": torch.ones(3)}, {})
    with pytest.raises(UserError, match=fragment):
        store.atomic_write_text(tmp_path / "notes.txt", "text")
    assert path.read_bytes() == good
    assert leftovers(tmp_path) == ["d.safetensors"]


def test_other_errors_of_the_writer_still_propagate_and_clean_up(tmp_path):
    def bug(tmp):
        Path(tmp).write_text("partial")
        raise RuntimeError("a bug in the writer")

    with pytest.raises(RuntimeError, match="a bug in the writer"):
        store.atomic_write(tmp_path / "x.png", bug)
    assert leftovers(tmp_path) == []


def test_writing_over_a_folder_is_named(tmp_path):
    (tmp_path / "report.md").mkdir()
    with pytest.raises(UserError, match="report.md: it is a folder"):
        store.atomic_write_text(tmp_path / "report.md", "x")
    assert leftovers(tmp_path) == ["report.md"]


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_file_modes_follow_the_umask(tmp_path, umask, mode):
    old = os.umask(umask)
    try:
        store.save(tmp_path / "e.safetensors", "trajectory", {"a": torch.zeros(2)}, {})
        store.atomic_write_text(tmp_path / "config.toml", "seed = 0\n")
        store.append_line(tmp_path / "metrics.jsonl", "{}")
        store.make_dir(tmp_path / "grids")
    finally:
        os.umask(old)
    for name in ("e.safetensors", "config.toml", "metrics.jsonl"):
        assert (tmp_path / name).stat().st_mode & 0o777 == mode, name
    assert (tmp_path / "grids").stat().st_mode & 0o777 == 0o777 & ~umask


# ------------------------------------------------------------- metrics.jsonl
def strict(line: str):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")

    return json.loads(line, parse_constant=refuse)


def test_a_failed_append_leaves_only_whole_lines(tmp_path, monkeypatch):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.write({"event": "iteration", "iteration": 0, "loss": 1.5})
    before = path.read_bytes()
    real_write = os.write
    calls = []

    def half_then_full(fd, data):  # the kernel writes part of the line, then the disk is full
        calls.append(len(data))
        if len(calls) == 1:
            return real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_full)
    with pytest.raises(UserError, match="disk full while writing .*metrics.jsonl"):
        log.write({"event": "iteration", "iteration": 1, "loss": 1.25, "terms": [0.5, 0.75]})
    assert len(calls) == 2
    assert path.read_bytes() == before

    monkeypatch.setattr(os, "write", lambda fd, data: 0)  # a write that makes no progress
    with pytest.raises(UserError, match="disk full"):
        log.write({"event": "iteration", "iteration": 1})
    assert path.read_bytes() == before

    monkeypatch.setattr(os, "write", real_write)
    log.write({"event": "iteration", "iteration": 1, "loss": 1.25})
    assert [strict(x)["iteration"] for x in path.read_text().splitlines()] == [0, 1]


def test_an_append_after_a_cut_line_drops_the_fragment(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"event": "iteration", "iteration": 0}\n{"event": "iteration", "itera')
    MetricsLog(path).write({"event": "iteration", "iteration": 1})
    assert [strict(x)["iteration"] for x in path.read_text().splitlines()] == [0, 1]


def test_an_unwritable_metrics_log_is_named(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "open", refuse)
    with pytest.raises(UserError, match="metrics.jsonl: read-only file system"):
        MetricsLog(tmp_path / "metrics.jsonl").write({"event": "iteration"})


def test_non_finite_metrics_are_written_as_null():
    record = {"loss": float("nan"), "lr": float("inf"), "terms": [1.0, float("-inf")],
              "architectures": {"convnet": {"accuracies": (0.5, float("nan"))}}}
    parsed = strict(store.json_line(record))
    assert parsed == {"loss": None, "lr": None, "terms": [1.0, None],
                      "architectures": {"convnet": {"accuracies": [0.5, None]}}}


class NaNExpert:
    """Makes iteration 1's expert start NaN, so its matching loss is NaN."""

    astkit_plugin_name = "nan-expert"

    @hookimpl
    def astkit_perturb_expert(self, params, iteration):
        if iteration == 1:
            return {k: v * float("nan") for k, v in params.items()}
        return None


def test_a_run_with_a_nan_loss_writes_strict_json(tmp_path, digits, experts_dir):
    engine = Engine(tiny_config(tmp_path, f"experts.dir={experts_dir}"), dataset=digits, plugins=[NaNExpert()])
    engine.distill()
    records = [strict(line) for line in (engine.out / "metrics.jsonl").read_text().splitlines()]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    assert records[1]["rolled_back"] and records[1]["loss"] is None
    # a resume rewrites the file from the checkpoint's history: still strict
    MetricsLog(engine.out / "metrics.jsonl", [{"iteration": 0, "loss": float("nan")}])
    assert strict((engine.out / "metrics.jsonl").read_text())["loss"] is None


# -------------------------------------------------------- the CLI catch-all
@pytest.mark.parametrize("exc, fragment", [
    (PermissionError(errno.EACCES, "Permission denied", "/data/x"), "/data/x: permission denied"),
    (OSError(errno.EROFS, "Read-only file system", "/data/x"), "read-only file system"),
    (OSError(errno.ENOSPC, "No space left on device"), "disk full while writing"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/data/x"), "/data/x: is a folder"),
])
def test_a_stray_os_error_is_one_line_exit_2(capsys, exc, fragment):
    class Command:
        def main(self, **kwargs):
            raise exc

    assert invoke(lambda: Command(), []) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert type(exc).__name__ + ":" not in err
    assert os_error_message(OSError(errno.ECONNRESET, "Connection reset")) is None
