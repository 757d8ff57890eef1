"""Threads, the dispatched SIMD target, and the test hook over compiled targets."""
from __future__ import annotations

import contextlib

from . import _C


def set_num_threads(n: int) -> None:
    """Set how many threads lowbit's kernels use (a persistent pool; default: the CPUs
    this process may run on).

    >>> import lowbit
    >>> old = lowbit.get_num_threads(); lowbit.set_num_threads(1); lowbit.get_num_threads()
    1
    >>> lowbit.set_num_threads(old)
    """
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"n must be an int, got {type(n).__name__}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    _C.set_num_threads(n)


def get_num_threads() -> int:
    """Number of threads lowbit's kernels use."""
    return _C.get_num_threads()


def compiled_targets() -> list[tuple[int, str]]:
    """Highway targets compiled into this build, as (bit mask, name), best first."""
    return sorted(_C.compiled_targets(), key=lambda t: t[0])


def cpu_target() -> str:
    """The Highway target the kernels dispatch to on this CPU, e.g. ``"AVX3"``, plus
    the CPU features that later fast paths (VNNI int8 dot products, BF16) can use.

    >>> import lowbit
    >>> lowbit.cpu_target().split()[0] in {name for _, name in lowbit.runtime.compiled_targets()}
    True
    """
    from . import _C as c
    mask = c.dispatched_target()
    name = dict(c.compiled_targets()).get(mask, hex(mask))
    feats = c.cpu_features()
    extra = [f for f in ("avx512vnni", "avx512bf16") if feats.get(f)]
    return f"{name} ({', '.join(extra)})" if extra else name


@contextlib.contextmanager
def only_target(mask: int):
    """Test hook: dispatch to the compiled target ``mask`` only, inside the block."""
    _C.restrict_targets(mask)
    try:
        if _C.dispatched_target() != mask:
            raise RuntimeError(f"target {mask:#x} is not available on this CPU")
        yield
    finally:
        _C.restrict_targets(0)


def available_targets() -> list[tuple[int, str]]:
    """Compiled targets that this CPU can run."""
    out = []
    cpu = _C.cpu_targets()
    for mask, name in compiled_targets():
        if not mask & cpu:
            continue
        _C.restrict_targets(mask)
        try:
            if _C.dispatched_target() == mask:
                out.append((mask, name))
        finally:
            _C.restrict_targets(0)
    return out
