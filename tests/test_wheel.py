"""The distributed artefacts: the repaired wheel runs where the system has no
Highway, and the sdist says what to install when Highway is missing.

`make test` builds the wheel first (`make wheel`, dist/) and passes its folder in
LOWBIT_WHEEL_DIR; run alone, this file builds one into a temporary folder.
"""
from __future__ import annotations

import ctypes.util
import glob
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest

import lowbit

REPO = Path(__file__).resolve().parents[1]
TAG = f"cp{sys.version_info.major}{sys.version_info.minor}"

# Run inside the fresh venv: the package comes from the wheel and works.
CHECK = r"""
import sys
# lowbit-autoregister.pth ran at start-up: its finder waits for transformers,
# and nothing of lowbit (or numpy) was imported for it.
assert any(getattr(f, "__name__", "") == "_TransformersQuantizersFinder" for f in sys.meta_path), sys.meta_path
assert "lowbit" not in sys.modules and "numpy" not in sys.modules
import numpy as np
import lowbit
assert "site-packages" in lowbit.__file__, lowbit.__file__
rng = np.random.default_rng(0)
w = rng.standard_normal((48, 256)).astype(np.float32)
x = rng.standard_normal((3, 256)).astype(np.float32)
q = lowbit.quantize_array(w, bits=4, group_size=64)
y = lowbit.matmul(x, q)
ref = x @ q.dequantize().T
assert np.abs(y - ref).max() <= 1e-4 * np.abs(ref).max(), np.abs(y - ref).max()
maps = open("/proc/self/maps").read()
hwy = sorted({line.split()[-1] for line in maps.splitlines() if "libhwy" in line})
print("version", lowbit.__version__, "target", lowbit.cpu_target(), "libhwy", *hwy)
"""


def _build_wheel(dest: Path) -> Path:
    raw = dest / "raw"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-build-isolation", "--no-deps", str(REPO),
                    "-w", str(raw)], check=True)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    subprocess.run([sys.executable, "-m", "auditwheel", "repair", "--plat", "auto", "-w", str(dest),
                    *glob.glob(str(raw / "*.whl"))], check=True, env=env, capture_output=True)
    return dest


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    given = os.environ.get("LOWBIT_WHEEL_DIR")
    if given and glob.glob(os.path.join(given, f"lowbit-{lowbit.__version__}-{TAG}-*.whl")):
        return Path(given)
    if shutil.which("auditwheel") is None and not (Path(sys.executable).parent / "auditwheel").exists():
        pytest.fail("auditwheel is not installed (make installs it): cannot build the wheel to test")
    return _build_wheel(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="module")
def wheel(dist) -> Path:
    found = sorted(dist.glob(f"lowbit-{lowbit.__version__}-{TAG}-*.whl"))
    assert found, f"no lowbit {lowbit.__version__} wheel for {TAG} in {dist}"
    return found[-1]


@pytest.fixture(scope="module")
def fresh_venv(wheel, tmp_path_factory) -> Path:
    """A new venv with only the wheel and its declared dependency (numpy) installed."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--disable-pip-version-check", str(wheel)], check=True)
    return py


def system_libhwy() -> Path:
    """The real file behind the system's libhwy.so.1."""
    name = ctypes.util.find_library("hwy")
    candidates = [Path(p) / "libhwy.so.1" for p in ("/usr/lib/x86_64-linux-gnu", "/lib/x86_64-linux-gnu",
                                                     "/usr/lib64", "/usr/lib", sysconfig.get_config_var("LIBDIR") or "")]
    for c in candidates:
        if c.exists():
            return c.resolve()
    pytest.fail(f"no system libhwy.so.1 found (find_library: {name}); the build needs libhwy-dev")


def hidden_hwy(script: str) -> list[str]:
    """A command that runs `script` (sh) with the system libhwy replaced by an empty
    file, in a private mount namespace: nothing outside the command sees it."""
    return ["unshare", "-m", "sh", "-c",
            f"mount --bind \"$EMPTY\" {system_libhwy()} && {script}"]


def isolation_or_skip(tmp_path) -> dict:
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    env = dict(os.environ, EMPTY=str(empty))
    env.pop("PYTHONPATH", None)
    if shutil.which("unshare") is None:
        pytest.skip("isolation impossible here: no `unshare` command (util-linux)")
    probe = subprocess.run(hidden_hwy("true"), env=env, capture_output=True, text=True)
    if probe.returncode != 0:
        msg = f"isolation impossible here: unshare -m + mount --bind failed ({probe.stderr.strip()})"
        print(msg)
        pytest.skip(msg)
    return env


def test_wheel_is_manylinux_and_carries_highway(wheel):
    import zipfile
    assert "manylinux" in wheel.name, wheel.name
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("lowbit.libs/libhwy") for n in names), names
    assert any(n.startswith("lowbit/_C") and n.endswith(".so") for n in names)
    assert {"lowbit-autoregister.pth", "_lowbit_autoregister.py"} <= set(names), names


def test_wheel_works_in_a_fresh_venv(fresh_venv, tmp_path):
    out = subprocess.run([str(fresh_venv), "-c", CHECK], capture_output=True, text=True, cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    assert out.returncode == 0, out.stderr
    assert f"version {lowbit.__version__}" in out.stdout
    assert "lowbit.libs/libhwy" in out.stdout, out.stdout  # its own copy, not the system's


def test_wheel_imports_with_the_system_highway_hidden(fresh_venv, tmp_path):
    env = isolation_or_skip(tmp_path)
    (tmp_path / "check.py").write_text(CHECK)
    ok = subprocess.run(hidden_hwy(f"{fresh_venv} check.py"), env=env, cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "lowbit.libs/libhwy" in ok.stdout
    # The control: an extension linked to the system library fails in the same
    # namespace, so the hiding is real.
    control = subprocess.run(hidden_hwy(f"{sys.executable} -c 'import lowbit'"), env=env, cwd=tmp_path,
                             capture_output=True, text=True)
    assert control.returncode != 0 and "libhwy" in control.stderr, control.stderr


def test_sdist_without_highway_says_what_to_install(dist, tmp_path):
    sdists = sorted(Path(dist).glob(f"lowbit-{lowbit.__version__}.tar.gz"))
    if sdists:
        with tarfile.open(sdists[-1]) as t:
            t.extractall(tmp_path, filter="data")
        src = tmp_path / f"lowbit-{lowbit.__version__}"
    else:  # a wheel built by this file alone: configure the checkout instead
        src = REPO
    cmake = shutil.which("cmake", path=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    assert cmake, "cmake is not installed (make installs it)"
    # As if libhwy-dev were absent: CMake is told not to find the package.
    out = subprocess.run([cmake, "-S", str(src), "-B", str(tmp_path / "b"), "-DCMAKE_DISABLE_FIND_PACKAGE_hwy=ON"],
                         capture_output=True, text=True)
    assert out.returncode != 0
    errors = [line for line in out.stderr.splitlines() if line.strip()]
    assert any("install libhwy-dev" in line for line in errors), out.stderr
    assert len(errors) <= 6, out.stderr  # one message, not a wall of errors
