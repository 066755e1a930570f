"""Handing freed memory back to the operating system between big batches."""

from __future__ import annotations

import ctypes
import gc


def release_memory() -> None:
    """Return memory freed by finished batches to the OS. glibc keeps freed heap pages for reuse, so a
    long process (a server, a bench that runs Best-of-32 and then other methods) would otherwise hold
    its largest batch's footprint and add the next one's on top."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
