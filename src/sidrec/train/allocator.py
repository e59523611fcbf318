"""Keep freed memory in the training process (glibc malloc), instead of handing it back to the OS.

PyTorch's CPU allocator is plain malloc. glibc serves every block over its mmap threshold (32 MB at
most) with a fresh mmap and unmaps it on free, so each large temporary of a training step (a
gradient, an optimizer's moments for the rows a step touched) pays a page fault per 4 KB page on
first touch. On the 2-core reference machine that was ~30% of a row-sparse step at 10^7 items
(bench.scale). With mmap off and a high trim threshold, freed blocks stay in the heap and are
reused: the same arithmetic, no faults, at the price of the process keeping its peak memory until it
exits, which is what a training job does anyway. (The same effect as running under jemalloc or
tcmalloc, which PyTorch's own performance guide recommends on CPUs.)

Called by the command line before training and by the benchmarks, never on import: a library must
not change the allocator of a process it does not own.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_done: bool | None = None


def keep_freed_memory() -> bool:
    """Tune glibc malloc as the module doc says; True when applied (False: not glibc, nothing done)."""
    global _done
    if _done is None:
        _done = False
        name = ctypes.util.find_library("c") if sys.platform.startswith("linux") else None
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            libc = None
        if libc is not None and hasattr(libc, "mallopt"):
            _done = all(libc.mallopt(opt, value) == 1 for opt, value in (
                (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_TOP_PAD, 64 << 20)))
    return _done
