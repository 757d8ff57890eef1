"""10,000 seeded random calls of the public NumPy API (tests/fuzz_numpy_api.py),
in batches, each batch in its own process so that a crash is counted and its
call reported instead of taking the suite down."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lowbit

FUZZER = Path(__file__).with_name("fuzz_numpy_api.py")
BATCHES, CALLS = 10, 1000


@pytest.mark.parametrize("seed", range(BATCHES))
def test_random_calls_return_or_raise_cleanly(seed, tmp_path):
    log = tmp_path / "last_call.txt"
    env = dict(os.environ, PYTHONPATH=str(Path(lowbit.__file__).parents[1]))
    run = subprocess.run([sys.executable, str(FUZZER), str(1000 + seed), str(CALLS), str(log)],
                         capture_output=True, text=True, env=env, timeout=600)
    last = log.read_text() if log.exists() else "(no call logged)"
    assert run.returncode >= 0, f"crashed (signal {-run.returncode}) in {last}"
    findings = [line for line in run.stdout.splitlines() if line.startswith("FINDING")]
    assert run.returncode == 0 and not findings, "\n".join(findings[:20]) + run.stderr[-2000:]
    assert f"call {CALLS - 1}:" in last  # every call ran
