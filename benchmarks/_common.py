"""Shared helpers of the benchmark scripts (stdlib only in the parent process).

Each measured configuration runs in its own ``python`` subprocess so that
peak-memory figures do not mix. The parent process never imports torch: on
Linux a child's ``ru_maxrss`` starts from the spawning process's peak (it is
carried across fork/exec), so a large parent would inflate every child's
figure. The children report ``VmHWM`` from ``/proc/self/status`` (the peak
resident set of their own address space, reset by exec) and, as a cross-check,
``getrusage(RUSAGE_SELF).ru_maxrss``.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
from pathlib import Path

RESULT_PREFIX = "BENCHMARK-RESULT "
GIB = 1024**3


# ------------------------------------------------------------------ children
def peak_memory() -> dict:
    """This process's peak and current resident memory, in bytes."""
    out: dict = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS"):
                out[key] = int(value.split()[0]) * 1024
    except OSError:
        pass
    try:
        import resource

        maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["ru_maxrss"] = maxrss if sys.platform == "darwin" else maxrss * 1024  # bytes on macOS, KiB on Linux
    except (ImportError, OSError):
        pass
    return {
        "load_average_1_5_15": load_average(),
        "peak_rss_bytes": out.get("VmHWM", out.get("ru_maxrss")),
        "rss_bytes": out.get("VmRSS"),
        "ru_maxrss_bytes": out.get("ru_maxrss"),
        "peak_source": "VmHWM" if "VmHWM" in out else "ru_maxrss",
    }


def cpu_times() -> dict:
    """User and system CPU seconds and minor page faults of this process so far."""
    try:
        import resource

        r = resource.getrusage(resource.RUSAGE_SELF)
        return {"user": r.ru_utime, "system": r.ru_stime, "minor_faults": r.ru_minflt}
    except (ImportError, OSError):
        return {}


def cpu_delta(before: dict, after: dict, per: float = 1.0) -> dict:
    """CPU seconds (user, system) and minor page faults between two :func:`cpu_times`, divided by ``per``.

    System time and page faults well above zero mean the allocator hands large
    tensors back to the OS and faults them in again; user + system much below
    wall time x threads means the threads waited (other work on the cores).
    """
    if not before or not after:
        return {}
    return {
        "cpu_user_seconds": (after["user"] - before["user"]) / per,
        "cpu_system_seconds": (after["system"] - before["system"]) / per,
        "minor_page_faults": int((after["minor_faults"] - before["minor_faults"]) / per),
    }


def emit(result: dict) -> None:
    """Hand a child's result to the parent (one tagged JSON line on stdout)."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def set_threads(threads: int | None) -> int:
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# -------------------------------------------------------------------- parent
def run_child(script: str, spec: dict, timeout: float | None = None) -> dict:
    """Run ``script --_worker SPEC`` in a fresh interpreter; return its result.

    A child that dies (e.g. killed for memory) or times out gives a result with
    ``ok: False`` and the reason, so the other configurations still run.
    """
    cmd = [sys.executable, script, "--_worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=None, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**spec, "ok": False, "error": f"timed out after {timeout} s"}
    result = None
    for line in proc.stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            result = json.loads(line[len(RESULT_PREFIX):])
        elif line.strip():
            print(line, file=sys.stderr)
    if proc.returncode != 0 or result is None:
        why = f"exit status {proc.returncode}"
        if proc.returncode in (-9, 137):
            why += " (killed: probably out of memory)"
        return {**spec, "ok": False, "error": why}
    return {"ok": True, **result}  # a child may report its own failure


def environment(threads_used: int | None = None) -> dict:
    """What the numbers were measured on (no torch import: asked of a child)."""
    info = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
    }
    if threads_used is not None:
        info["torch_threads"] = threads_used
    info["load_average_1_5_15"] = load_average()
    return info


def load_average() -> list[float] | None:
    """The 1/5/15-minute load averages: other work on the cores skews every figure."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def command_line() -> str:
    return shlex.join([sys.executable, *sys.argv])


def write_json(path: str | None, payload: dict) -> None:
    if not path:
        return
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, target)
    print(f"wrote {target}", file=sys.stderr)


def gib(value: float | None) -> str:
    return "-" if value is None else f"{value / GIB:.2f}"


def fmt(value: float | None, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths]), *(line(r) for r in rows)])
