"""The one contiguous-split rule (``trine.partition``) for ranks, devices and shards, checked against
numpy's array_split (an independent implementation of the same rule) and through its users."""

from __future__ import annotations

import numpy as np
import pytest

from trine.partition import contiguous_bounds


@pytest.mark.parametrize("count", [0, 1, 2, 5, 7, 10, 101])
@pytest.mark.parametrize("parts", [1, 2, 3, 4, 8])
def test_contiguous_bounds_match_numpy_array_split(count, parts):
    """numpy's array_split gives the first ``count % parts`` pieces one more item: the same rule, derived
    independently; part 0 is always a longest part (the gather in dynamic negatives pads to it)."""
    bounds = contiguous_bounds(count, parts)
    pieces = np.array_split(np.arange(count), parts)
    assert [list(range(s, e)) for s, e in bounds] == [p.tolist() for p in pieces]
    sizes = [e - s for s, e in bounds]
    assert sizes[0] == max(sizes)


@pytest.mark.parametrize(("count", "parts"), [(-1, 2), (3, 0), (2.0, 1), (True, 1), (3, None)])
def test_contiguous_bounds_refuse_bad_arguments(count, parts):
    with pytest.raises(ValueError, match="must be an integer"):
        contiguous_bounds(count, parts)


def test_the_device_pool_cuts_items_by_the_one_rule():
    """``DevicePool.map`` hands out the contiguous parts of ``contiguous_bounds`` (was: ceil-sized chunks,
    which gave 3, 3, 3, 1 for ten items on four devices)."""
    from trine.inference import pool as pool_module

    sent: list[list[int]] = []

    class Recorder:
        def put(self, task):
            sent.append(task[2])

    class Results:
        def get(self, *args, **kwargs):
            cid = len(got)
            got.append(cid)
            return cid, True, sent[cid]

    got: list[int] = []
    fake = pool_module.DevicePool.__new__(pool_module.DevicePool)
    fake.devices = ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    fake.tasks, fake.results, fake.processes = Recorder(), Results(), []
    out = fake.map("encode", list(range(10)))
    assert [len(c) for c in sent] == [3, 3, 2, 2]
    assert [x for part in out for x in part] == list(range(10))
