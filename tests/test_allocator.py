"""allocator = "retain": glibc keeps freed large blocks instead of unmapping them."""

import subprocess
import sys
import textwrap

import pytest

from astkit import RunConfig
from astkit.errors import UserError

PROBE = textwrap.dedent("""
    import sys, torch
    from astkit import allocator

    def rss():
        for line in open("/proc/self/status"):
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024

    if sys.argv[1] == "retain":
        assert allocator.retain_freed_memory()
    before = rss()
    x = torch.ones(64 * 2**20 // 4)  # 64 MiB: above glibc's mmap threshold
    del x
    print((rss() - before) / 2**20)
""")


def freed_but_resident_mib(mode: str) -> float:
    proc = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return float(proc.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc malloc")
def test_retain_keeps_a_freed_large_block_resident():
    assert freed_but_resident_mib("system") < 16  # unmapped on free
    assert freed_but_resident_mib("retain") > 48  # kept for reuse


def test_cli_run_with_retain_allocator(tmp_path):
    """End to end through the CLI: the option is accepted, applied and recorded."""
    proc = subprocess.run(
        [sys.executable, "-m", "astkit", "run", "--set", "allocator=retain", "--set", "model.width=8",
         "--set", "experts.num_experts=1", "--set", "experts.epochs=2", "--set", "distill.max_start_epoch=1",
         "--set", "distill.expert_epochs=1", "--set", "distill.iterations=1", "--set", "distill.syn_steps=2",
         "--set", "distill.ipc=1", "--set", "evaluate.epochs=2", "--set", "evaluate.num_nets=1",
         "--quiet", "--out", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert 'allocator = "retain"' in (tmp_path / "run" / "config.toml").read_text()


def test_bad_allocator_is_one_line_error():
    with pytest.raises(UserError, match="allocator must be 'auto', 'system' or 'retain'"):
        RunConfig.load(overrides=["allocator=jemalloc"]).validate()
