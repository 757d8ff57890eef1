"""Every ```python block of README.md runs, in order, in a fresh interpreter
(tests/readme_blocks.py), with SmolLM2 and Austen from `make setup`."""
import os
import subprocess
import sys
from pathlib import Path

import lowbit

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from readme_blocks import python_blocks  # noqa: E402


def test_readme_python_blocks_run_in_order(tmp_path):
    readme = REPO / "README.md"
    blocks = python_blocks(readme.read_text(encoding="utf-8"))
    assert len(blocks) >= 7  # LLM, quick start, PTQ, QAT, storage, NumPy, matmul
    env = dict(os.environ, PYTHONPATH=str(Path(lowbit.__file__).parents[1]), OMP_WAIT_POLICY="PASSIVE",
               TQDM_DISABLE="1")
    run = subprocess.run([sys.executable, str(REPO / "tests" / "readme_blocks.py"), str(readme)], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    for i, (line, _) in enumerate(blocks, 1):
        assert f"block {i} (line {line}): ok" in run.stdout
    # What the comments promise is what the blocks print.
    assert "QArray(shape=(4096, 4096), int4 sym, group 128, 4.250 bits/weight" in run.stdout
    assert "It is a truth universally acknowledged, that" in run.stdout  # the quick start generates
    assert (tmp_path / "model.safetensors").exists()  # the storage block wrote in the working folder


def test_block_extraction_keeps_order_and_lines():
    text = "intro\n```python\na = 1\n```\ntext\n```sh\nls\n```\n```python\nb = a + 1\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (10, "b = a + 1\n")]
