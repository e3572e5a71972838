"""The counter formatter against the number it formats: what a user reads back is that number.

Issue 11 item 9: ``count(26195)`` was "2.62k" (divided by 1e4, labelled k = 1e3), so every
counter above 9,999 read ten times too small. These properties fail on that formatter.
"""
from __future__ import annotations

import re

from hypothesis import given, settings
from hypothesis import strategies as st

from tui import format as fmt

MULTIPLIER = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}


def read_back(text: str) -> tuple[float, float]:
    """What a reader takes ``text`` to mean, and half a unit of its last digit (the rounding allowed)."""
    m = re.fullmatch(r"(-?)(\d+)(?:\.(\d+))?([kMGT]?)", text)
    assert m, f"{text!r} is not a plain number with an optional k/M/G/T unit"
    sign, whole, frac, unit = m.groups()
    value = float(f"{whole}.{frac or 0}") * MULTIPLIER[unit] * (-1 if sign else 1)
    return value, 0.5 * 10 ** -len(frac or "") * MULTIPLIER[unit]


@settings(max_examples=500)
@given(st.integers(min_value=0, max_value=10 ** 16))
def test_count_reads_back_as_the_number(n):
    text = fmt.count(n)
    value, half_unit = read_back(text)
    assert abs(value - n) <= half_unit * 1.0001, f"count({n}) = {text!r} reads as {value:g}"


@settings(max_examples=300)
@given(st.integers(min_value=0, max_value=10 ** 14))
def test_count_is_exact_below_ten_thousand_and_narrow_above(n):
    text = fmt.count(n)
    if n < fmt.EXACT_BELOW:
        assert text == str(n)
    else:
        assert len(text) <= 5 and text[-1] in "kMGT"
        assert len(re.sub(r"[^0-9]", "", text).lstrip("0")) == 3     # three significant digits


@given(st.integers(min_value=fmt.EXACT_BELOW, max_value=10 ** 12), st.integers(min_value=1, max_value=10 ** 6))
def test_count_keeps_order(a, d):
    """A bigger counter never reads smaller (sorting by eye works)."""
    assert read_back(fmt.count(a))[0] <= read_back(fmt.count(a + d))[0]


def test_the_reported_instance():
    assert fmt.count(26195) == "26.2k"
    assert fmt.count(999_999) == "1.00M"           # rounding carries into the next unit, never "1e+03k"
    assert fmt.rate(26195.0) == "26.2k"
