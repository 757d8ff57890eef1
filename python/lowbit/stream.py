"""Weight streaming: run a model whose quantized weights stay on disk.

``lowbit.load(path, model, stream=True, max_resident_bytes=B, prefetch=P)``
leaves every QuantLinear's tiles in a private memory map of the file and
attaches a :class:`WeightStreamer`:

* Layers are ordered as the file stores them (module registration order, which
  is execution order for sequential stacks and transformers blocks); after the
  last layer comes the first again (the next token).
* When layer i starts (a forward pre-hook), the window is i plus up to P next
  layers, as many as fit in B bytes together. A background thread releases the
  layers that left the window (madvise DONTNEED) and then prefetches the new
  ones (madvise WILLNEED + touching each page), both in C++ with the GIL
  released, while layer i computes.
* Rule for layers called out of order (shared modules, skipped branches): any
  layer may run at any time, because its pages are read from the file on demand;
  the window simply re-centres on the layer that runs. Out-of-order calls cost
  speed (page faults), never correctness. Results are bit-identical to the
  fully loaded model.

A streamed model runs one forward at a time (concurrent forwards stay correct,
but their windows fight over the budget).
"""
from __future__ import annotations

import atexit
import queue
import threading
import weakref
from typing import Optional

import numpy as np

from . import _C
from .io import expected_packed_shapes

# Budget slack at each end of a layer's byte range: the partial page shared with
# a neighbour, and the kernel's fault-around (it maps cached pages in the 64 KiB
# block around a faulting address, fault_around_bytes = 65536 by default).
EDGE = 64 << 10


class WeightStreamer:
    """Keeps the resident bytes of a streamed model's quantized weights under a budget."""

    def __init__(self, regions: list, names: list, modules: list, max_resident_bytes: Optional[int],
                 prefetch: int, mm):
        self.names = names
        self.sizes = [r.nbytes for r in regions]
        self.budget = max_resident_bytes
        self.prefetch = prefetch
        self._regions = regions
        self._outside: list = []
        self._mm = mm
        self._index = {id(m): i for i, m in enumerate(modules)}
        self._resident: set = set()
        self._lock = threading.Lock()
        self.stats = dict(calls=0, misses=0, prefetched_layers=0, released_layers=0)
        self._tasks: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=_work, args=(self._tasks, regions), daemon=True,
                                        name="lowbit-stream")
        self._worker.start()
        self._hooks = [m.register_forward_pre_hook(self._before) for m in modules]
        weakref.finalize(self, self._tasks.put, None)
        _WORKERS[self._worker] = self._tasks

    @classmethod
    def attach(cls, model, mm, info, *, max_resident_bytes: Optional[int], prefetch: int) -> "WeightStreamer":
        names = list(info.linear_layers)
        regions, modules = [], []
        for name in names:
            keys = [f"{name}.{part}" for part in expected_packed_shapes(info.layers[name])]
            begin = min(info.tensors[k].begin for k in keys)
            end = max(info.tensors[k].end for k in keys)
            regions.append(np.frombuffer(mm, np.uint8, count=end - begin, offset=begin))
            modules.append(model.get_submodule(name))
        largest = max(r.nbytes for r in regions)
        if max_resident_bytes is not None:
            if isinstance(max_resident_bytes, bool) or not isinstance(max_resident_bytes, int):
                raise TypeError(f"max_resident_bytes must be an int, got {max_resident_bytes!r}")
            if max_resident_bytes < largest + 2 * EDGE:
                raise ValueError(f"max_resident_bytes={max_resident_bytes} is smaller than the largest layer "
                                 f"({largest} bytes + 2 pages); give at least {largest + 2 * EDGE}")
        old = getattr(model, "_lowbit_streamer", None)
        if old is not None:
            old.close()
        # The header and the float tensors (copied into memory by load) need no mapping.
        first = min(info.tensors[f"{n}.data"].begin for n in names)
        last = max(r.ctypes.data + r.nbytes for r in regions) - regions[0].ctypes.data + \
            info.tensors[f"{names[0]}.data"].begin
        outside = [np.frombuffer(mm, np.uint8, count=first, offset=0),
                   np.frombuffer(mm, np.uint8, count=len(mm) - last, offset=last)]
        for r in outside:
            _C.release_pages(r)
        streamer = cls(regions, names, modules, max_resident_bytes, prefetch, mm)
        streamer._outside = outside
        model._lowbit_streamer = streamer
        return streamer

    # The budget counts whole layers plus their two edges.
    def _cost(self, i: int) -> int:
        return self.sizes[i] + 2 * EDGE

    def window(self, i: int) -> list:
        """Layer i and the layers to prefetch after it, in order."""
        win, total = [i], self._cost(i)
        for d in range(1, self.prefetch + 1):
            j = (i + d) % len(self.sizes)
            if j in win:
                break
            if self.budget is not None and total + self._cost(j) > self.budget:
                break
            win.append(j)
            total += self._cost(j)
        return win

    def _before(self, module, args):
        i = self._index[id(module)]
        with self._lock:
            self.stats["calls"] += 1
            if i not in self._resident:
                self.stats["misses"] += 1
                self._resident.add(i)
            win = self.window(i)
            for r in sorted(self._resident - set(win)):
                self._tasks.put(("release", r))
                self._resident.discard(r)
                self.stats["released_layers"] += 1
            new = [j for j in win[1:] if j not in self._resident]
            for j in new:  # queue the disk reads of all of them first, then map in order
                self._tasks.put(("willneed", j))
            for j in new:
                self._tasks.put(("prefetch", j))
                self._resident.add(j)
                self.stats["prefetched_layers"] += 1

    def sync(self) -> None:
        """Wait until the background thread has done every queued release/prefetch."""
        done = threading.Event()
        self._tasks.put(("signal", done))
        done.wait()

    def release_all(self) -> None:
        """Drop every layer's pages (e.g. between requests)."""
        with self._lock:
            # Every layer, not just the window: fault-around maps neighbours' pages.
            for r in range(len(self._regions)):
                self._tasks.put(("release", r))
            self._resident.clear()
        self.sync()
        for r in self._outside:  # fault-around may have mapped header/tail pages
            _C.release_pages(r)

    def resident_bytes(self) -> int:
        """Bytes of the weight file mapped into this process now (from /proc/self/smaps)."""
        start = self._regions[0].ctypes.data if self._regions else 0
        return mapped_rss(start)

    def close(self, timeout: float = 60.0) -> None:
        """Remove the hooks and stop the thread (the weights stay mapped and usable)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        self._tasks.put(None)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)


# Every live prefetch thread and its queue (strong references: a streamer may be
# gone while its thread still works through queued prefetches).
_WORKERS: dict = {}


@atexit.register
def _stop_workers() -> None:
    # A daemon thread still inside a C++ prefetch when the interpreter finalizes
    # would be torn down mid-call (pybind11 aborts): let each finish and exit first.
    for thread, tasks in list(_WORKERS.items()):
        tasks.put(None)
        thread.join(60.0)


def _work(tasks: queue.Queue, regions: list) -> None:
    while True:
        task = tasks.get()
        if task is None:
            _WORKERS.pop(threading.current_thread(), None)
            return
        kind, arg = task
        if kind == "release":
            _C.release_pages(regions[arg])
        elif kind == "willneed":
            _C.advise_willneed(regions[arg])
        elif kind == "prefetch":
            _C.prefetch_pages(regions[arg])
        else:
            arg.set()


def mapped_rss(address: int) -> int:
    """Resident bytes of the mapping that contains ``address`` (Linux /proc/self/smaps)."""
    with open("/proc/self/smaps") as f:
        inside = False
        for line in f:
            head = line.split(" ", 1)[0]
            if "-" in head and ":" not in head:
                lo, hi = (int(v, 16) for v in head.split("-"))
                inside = lo <= address < hi
            elif inside and line.startswith("Rss:"):
                return int(line.split()[1]) * 1024
    return 0
