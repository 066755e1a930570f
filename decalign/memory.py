"""Handing freed memory back to the operating system between big batches."""

from __future__ import annotations

import ctypes
import gc
import os
import sys


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def map_large_blocks(threshold: int = 1 << 20) -> None:
    """Have glibc give every block of `threshold` bytes or more a mapping of its own, handed back to
    the OS as soon as it is freed. glibc otherwise raises that threshold to the largest block freed
    so far (up to 32 MiB on 64-bit), after which a server's tensors come from its threads' heaps,
    which `malloc_trim` cannot shrink past a block still in use: after a load, a server held about
    +8% or about +40% of its starting memory from one run to the next (docs/server.md)."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, threshold)
    except (OSError, AttributeError):  # not glibc
        pass


def bound_kernel_cache(kernels: int = 64) -> None:
    """Keep at most `kernels` compiled oneDNN kernels (oneDNN's own bound is 1,024) unless
    ONEDNN_PRIMITIVE_CACHE_CAPACITY says otherwise. A packed layer compiles a kernel per shape it
    meets, about 2.7 MB per row count on the embedded model; a server meets new shapes at every join
    and kept them (docs/server.md). oneDNN reads the variable once, at its first kernel: call this
    before any model runs."""
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(kernels))


def freeze_long_lived() -> None:
    """Leave every object alive now out of the cyclic garbage collector's later passes. A full pass
    scans every object the process holds, about 400,000 once torch, transformers and a server are
    imported: some 0.2 s here, with the interpreter lock held, so a server's engine and every stream
    stop for it, at each idle moment (`release_memory`) and whenever Python decides to run one under
    load. What a server holds when it starts (modules, the model) lives as long as the process;
    frozen, a pass costs about a millisecond. Objects freed by reference counts are freed as before."""
    gc.collect()
    gc.freeze()


def release_memory() -> None:
    """Return memory freed by finished batches to the OS, and to the GPU's driver where CUDA is in use.
    glibc keeps freed heap pages for reuse, and torch's CUDA allocator every block it ever held, so a
    long process (a server, a bench that runs Best-of-32 and then other methods) would otherwise hold
    its largest batch's footprint and add the next one's on top."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass
    torch = sys.modules.get("torch")  # never imported, nor CUDA started, for this
    if torch is not None and torch.cuda.is_initialized():
        torch.cuda.empty_cache()
