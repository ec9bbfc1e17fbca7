"""The one rule that cuts work into contiguous parts: ranks of a distributed job, devices of a pool,
shards of an encoded corpus.

``count`` items go to ``parts`` consecutive ranges whose sizes differ by at most one, the first
``count % parts`` one item longer. Part 0 is always a longest part: the pool gather in
``training/dynamic_negatives.py`` pads every rank's block to part 0's size. A part may be empty when
there are fewer items than parts (the last ones are). Torch-free and import-free, so every layer may use it.
"""

from __future__ import annotations


def contiguous_bounds(count: int, parts: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ``(start, end)`` ranges covering ``0 .. count``, in order, sizes differing by at
    most one and the first ``count % parts`` one longer."""
    if isinstance(count, bool) or not isinstance(count, int) or count < 0:
        raise ValueError(f"count must be an integer >= 0, not {count!r}")
    if isinstance(parts, bool) or not isinstance(parts, int) or parts < 1:
        raise ValueError(f"parts must be an integer >= 1, not {parts!r}")
    base, extra = divmod(count, parts)
    bounds, start = [], 0
    for part in range(parts):
        end = start + base + (part < extra)
        bounds.append((start, end))
        start = end
    return bounds
