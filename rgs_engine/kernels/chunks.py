"""How reduction kernels split their items into chunks.

A reduction over many items (pixels, Gaussians) into a few sums runs one thread per chunk of
items: the thread accumulates its chunk in registers and adds the result once (atomics only
between chunks). Item ``t`` of chunk ``ch`` is ``ch * chunk_step + t * item_step``: on a GPU
many chunks of strided items (the threads of a warp read consecutive items), on a CPU a few
contiguous runs (one per core's share).
"""
from __future__ import annotations

GPU_CHUNKS = 1024
CPU_CHUNKS = 16


def chunking(items: int, cuda: bool) -> tuple[int, int, int, int]:
    """``(chunks, chunk_step, item_step, per_chunk)`` for ``items`` items (the kernel skips
    indices past the last item)."""
    chunks = max(1, min(items, GPU_CHUNKS if cuda else CPU_CHUNKS))
    per = -(-items // chunks)
    return (chunks, 1, chunks, per) if cuda else (chunks, per, 1, per)
