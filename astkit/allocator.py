"""CPU memory allocator settings (glibc ``mallopt``).

By default glibc serves every allocation of 32 MiB or more with its own
``mmap`` and returns it to the operating system when freed. The unrolled
student allocates and frees many tensors of that size per step, so the
kernel zero-fills fresh pages again and again: on the benchmark's ConvNet a
large share of an iteration is system time spent in page faults. ``retain``
makes malloc serve large blocks from its heap and keep freed memory for
reuse (``M_MMAP_MAX = 0``, ``M_TRIM_THRESHOLD`` = 2 GiB): faster, at the
price of a higher peak resident memory (see docs/results.md). ``auto`` (the
default) is ``retain`` where glibc's ``mallopt`` is there and ``system``
elsewhere. The same
effect, for any process, comes from the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=68719476736``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from astkit.errors import UserError

#: ``mallopt`` parameters from glibc's malloc.h.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
#: The largest trim threshold ``mallopt``'s int argument can hold.
TRIM_THRESHOLD = 2**31 - 1

CHOICES = ("auto", "system", "retain")


def configure(choice: str) -> None:
    """Apply ``choice`` to this process (``system`` leaves malloc alone)."""
    if choice not in CHOICES:
        raise UserError(f"allocator must be one of {', '.join(CHOICES)}, got {choice!r}")
    if choice == "auto":
        retain_freed_memory()
        return
    if choice == "retain" and not retain_freed_memory():
        raise UserError("allocator = 'retain' needs glibc malloc (Linux); set allocator = 'system'")


def retain_freed_memory() -> bool:
    """Keep freed memory in the heap instead of unmapping it; False where impossible."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt  # absent from musl
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
