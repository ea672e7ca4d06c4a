"""PackedBitmap (plugin/core/packedbitmap.py) against a plain list of granules."""

import random

import pytest

import threading

from plugin.core import packedbitmap
from plugin.core.packedbitmap import PackedBitmap, marker


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
    client_mark = marker([b])          # the client path: pending granules
    ref = [0] * b.nbits
    for _ in range(rnd.randint(0, 25)):
        offset = rnd.randrange(size)
        length = rnd.randint(1, size - offset)
        if rnd.random() < 0.3:
            length = rnd.randint(1, min(g, size - offset))
            client_mark(offset, length)
            for i in range(offset // g, (offset + length - 1) // g + 1):
                ref[i] = 1
        elif rnd.random() < 0.6:
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


def test_the_client_marker_marks_every_bitmap_and_readers_see_pending_marks():
    size = 1 << 24
    bms = [PackedBitmap(size, g) for g in (65536, 65536, 1 << 20, 1 << 22)]
    mark = marker(bms)
    data0, changes0 = bms[0].snapshot()
    mark(5 * 65536 + 100, 4096)               # inside one granule of each: pending
    mark(3 * (1 << 22) - 512, 1024)           # across granules: the locked path
    mark(0, 0)                                # nothing
    for b in bms:
        runs, _ = b.runs()
        g = b.granularity
        expect = sorted({(5 * 65536 + 100) // g, (3 * (1 << 22) - 512) // g,
                         (3 * (1 << 22) + 511) // g})
        assert [r[0] // g for r in runs] == _starts(expect)
        assert b.count() == len(expect)
    data, changes = bms[0].snapshot()
    assert changes != changes0 and data != data0
    # A clear takes the pending marks with it; a later mark is kept.
    mark(7 * 65536, 512)
    bms[1].clear()
    assert bms[1].count() == 0
    mark(9 * 65536, 512)
    assert bms[1].runs() == ([(9 * 65536, 65536)], None)


def _starts(granules):
    """First granule of each run of consecutive granules."""
    return [g for i, g in enumerate(granules) if i == 0 or granules[i - 1] != g - 1]


def test_concurrent_client_marks_are_all_kept_and_the_pending_sets_stay_bounded():
    size = 1 << 30
    bms = [PackedBitmap(size, g) for g in (65536, 1 << 20)]
    mark = marker(bms)
    per_thread = 3 * packedbitmap.FOLD_EVERY
    offsets = [[((t * per_thread + i) * 65536) % size for i in range(per_thread)]
               for t in range(4)]
    most = []

    def client(offs):
        for o in offs:
            mark(o + 512, 4096)
            most.append(len(bms[0]._pending))

    def reader():
        for _ in range(200):
            bms[0].snapshot()
            bms[1].runs(0, size, 10)

    threads = [threading.Thread(target=client, args=(o,)) for o in offsets]
    threads.append(threading.Thread(target=reader))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    expect0 = {o // 65536 for offs in offsets for o in offs}
    assert bms[0].count() == len(expect0)
    assert bms[1].count() == len({o >> 20 for offs in offsets for o in offs})
    assert max(most) <= 2 * packedbitmap.FOLD_EVERY
