"""PackedBitmap (plugin/core/packedbitmap.py) against a plain list of granules."""

import random

import pytest

from plugin.core.packedbitmap import PackedBitmap


def _model_runs(ref, g, size, offset, length):
    """Dirty byte ranges of the model inside [offset, offset+length)."""
    out = []
    stop = min(size, offset + length)
    for i, dirty in enumerate(ref):
        if not dirty:
            continue
        a, b = max(offset, i * g), min(stop, (i + 1) * g)
        if a >= b:
            continue
        if out and out[-1][0] + out[-1][1] == a:
            out[-1] = (out[-1][0], b - out[-1][0])
        else:
            out.append((a, b - a))
    return out


@pytest.mark.parametrize("seed", range(40))
def test_marks_clears_runs_and_counts_agree_with_a_model(seed):
    rnd = random.Random(seed)
    g = 1 << rnd.randint(9, 14)
    size = rnd.randint(1, 300) * 512 + rnd.choice([0, 0, 37])
    b = PackedBitmap(size, g)
    ref = [0] * b.nbits
    for _ in range(rnd.randint(0, 25)):
        offset = rnd.randrange(size)
        length = rnd.randint(1, size - offset)
        if rnd.random() < 0.7:
            b.mark(offset, length)
            for i in range(offset // g, (offset + length - 1) // g + 1):
                ref[i] = 1
        else:
            b.clear_range(offset, length)
            end = b.nbits if offset + length >= size else (offset + length) // g
            for i in range(-(-offset // g), end):
                ref[i] = 0
    assert b.count() == sum(ref)
    assert b.dirty_bytes() == sum(ref) * g
    offset = rnd.randrange(size)
    length = rnd.randint(1, size - offset)
    assert b.runs(offset, length) == (_model_runs(ref, g, size, offset, length), None)
    full, _ = b.runs()
    paged, pos = [], 0
    while pos is not None:
        page, pos = b.runs(pos, size - pos, 2)
        paged += page
    assert paged == full
    data, _ = b.snapshot()
    assert PackedBitmap(size, g, data).runs() == (full, None)
    coarse = PackedBitmap(size, g * 4)
    coarse.merge(b)
    for start, n in full:
        assert sum(x[1] for x in coarse.runs(start, n)[0]) == n
    same = PackedBitmap(size, g)
    same.merge(b)
    assert same.runs() == (full, None) and same.count() == b.count()


def test_padding_bits_stay_clear_and_the_last_granule_is_cut_at_the_size():
    b = PackedBitmap(10 * 512 + 100, 512)          # 11 granules, the last one partial
    b.mark(0, 10 * 512 + 100)
    data, _ = b.snapshot()
    assert data == b"\xff\x07"
    assert b.runs() == ([(0, 10 * 512 + 100)], None)


def test_a_granularity_that_is_not_a_power_of_two_is_refused():
    with pytest.raises(ValueError):
        PackedBitmap(1 << 20, 1000)
