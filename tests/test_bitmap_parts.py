"""DirtyBitmap parts (plugin/core/bitmap.py): a small change inside one clean granule
is copied alone, never less than what changed."""

import random

from plugin.core.bitmap import DirtyBitmap

G = 65536


def test_a_change_inside_a_clean_granule_is_taken_as_its_bytes():
    b = DirtyBitmap(16 * G, G)
    assert b.mark_part(3 * G + 4096, 4096)               # the bitmap was clean
    assert b.take_part(0, 1 << 20) == (3 * G, G, 3 * G + 4096, 4096)
    assert b.take_part(0, 1 << 20) is None


def test_more_changes_in_the_granule_widen_its_part():
    b = DirtyBitmap(16 * G, G)
    b.mark_part(3 * G + 8192, 4096)
    b.mark_part(3 * G + 40960, 512)
    assert b.take_part(0, 1 << 20) == (3 * G, G, 3 * G + 8192, 40960 + 512 - 8192)


def test_any_other_mark_makes_the_granule_whole():
    b = DirtyBitmap(16 * G, G)
    b.mark_part(3 * G + 8192, 4096)
    b.mark(3 * G, 1)                                     # a failure, a comparison...
    b.mark_part(3 * G + 16384, 4096)                     # dirty and whole: stays whole
    assert b.take_part(0, 1 << 20) == (3 * G, G, 3 * G, G)
    b.mark(5 * G, G)                                     # dirty and whole first
    b.mark_part(5 * G + 4096, 4096)
    assert b.take_part(0, 1 << 20) == (5 * G, G, 5 * G, G)


def test_a_change_across_granules_is_whole():
    b = DirtyBitmap(16 * G, G)
    b.mark_part(2 * G - 4096, 8192)
    assert b.take_part(0, 1 << 20) == (G, 2 * G, G, 2 * G)


def test_a_run_narrows_only_at_its_ends():
    b = DirtyBitmap(16 * G, G)
    b.mark_part(4 * G + 60000, 100)
    b.mark(5 * G, G)
    b.mark_part(6 * G + 10, 20)
    assert b.take_part(0, 1 << 20) == (4 * G, 3 * G, 4 * G + 60000, 2 * G + 30 - 60000)


def test_clear_and_take_drop_parts():
    b = DirtyBitmap(16 * G, G)
    b.mark_part(G + 4096, 4096)
    b.clear(G, G)
    b.mark(G, G)
    assert b.take_part(0, 1 << 20) == (G, G, G, G)
    b.mark_part(2 * G + 4096, 4096)
    assert b.take(0, 1 << 20) == (2 * G, G)
    b.mark(2 * G, 1)
    assert b.take_part(0, 1 << 20) == (2 * G, G, 2 * G, G)


def test_the_last_short_granule():
    b = DirtyBitmap(3 * G + 1000, G)
    b.mark_part(3 * G + 100, 4096)                       # past the disk's end: cut
    assert b.take_part(0, 1 << 20) == (3 * G, 1000, 3 * G + 100, 900)


def test_a_random_history_never_takes_less_than_what_changed():
    rnd = random.Random(5)
    size = 64 * G
    b = DirtyBitmap(size, G)
    changed = bytearray(size // 512)                     # what must reach the target
    for _ in range(5000):
        op = rnd.random()
        if op < 0.6:
            off = rnd.randrange(0, size // 512) * 512
            n = min(rnd.choice([512, 4096, 8192, G, 3 * G]), size - off)
            (b.mark_part if op < 0.5 else b.mark)(off, n)
            changed[off // 512:(off + n) // 512] = b"\x01" * (n // 512)
        else:
            run = b.take_part(rnd.randrange(size), rnd.choice([G, 4 * G, 16 * G]))
            if run is None:
                continue
            off, n, part_off, part_n = run
            assert off <= part_off and part_off + part_n <= off + n
            within = changed[off // 512:(off + n) // 512]
            first, last = within.find(1), within.rfind(1)
            if first >= 0:
                assert part_off <= off + first * 512
                assert off + (last + 1) * 512 <= part_off + part_n
            changed[off // 512:(off + n) // 512] = bytes(n // 512)
