"""jobctl size parsing and human formatting (pure functions)."""

import pytest

from jobctl.units import format_duration, format_rate, format_size, format_speed_limit, parse_size


@pytest.mark.parametrize("text, expected", [
    ("0", 0),
    ("4096", 4096),
    ("64K", 64 * 1024),
    ("64k", 64 * 1024),
    ("10M", 10 * 1024 ** 2),
    ("10MiB", 10 * 1024 ** 2),
    ("10MB", 10 * 1024 ** 2),
    ("1.5G", 3 * 1024 ** 3 // 2),
    ("2T", 2 * 1024 ** 4),
    ("10M/s", 10 * 1024 ** 2),
    (" 8 M ", 8 * 1024 ** 2),
])
def test_parse_size_accepts_binary_suffixes(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "M", "-1", "10Q", "1.5", "ten", "10 M B x", "0.3K"])
def test_parse_size_rejects_malformed_or_fractional_bytes(text):
    with pytest.raises(ValueError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("nbytes, expected", [
    (0, "0 B"),
    (512, "512 B"),
    (1536, "1.5 KiB"),
    (10 * 1024 ** 2, "10.0 MiB"),
    (3 * 1024 ** 3, "3.0 GiB"),
    (None, "-"),
])
def test_format_size_uses_binary_units(nbytes, expected):
    assert format_size(nbytes) == expected


def test_format_rate_appends_per_second():
    assert format_rate(2 * 1024 ** 2) == "2.0 MiB/s"


def test_format_rate_unknown_is_dash():
    assert format_rate(None) == "-"


def test_speed_limit_zero_means_unlimited():
    assert format_speed_limit(0) == "unlimited"


def test_speed_limit_nonzero_is_a_rate():
    assert format_speed_limit(1024 ** 2) == "1.0 MiB/s"


@pytest.mark.parametrize("seconds, expected", [
    (0, "0:00"),
    (42.4, "0:42"),
    (723, "12:03"),
    (3 * 3600 + 4 * 60 + 5, "3:04:05"),
    (None, "--:--"),
    (float("inf"), "--:--"),
])
def test_format_duration(seconds, expected):
    assert format_duration(seconds) == expected


def test_format_size_never_shows_1024_of_a_unit():
    assert format_size((1 << 30) - 24) == "1.0 GiB"
    assert format_size(1023 * 1024 * 1024) == "1023.0 MiB"
