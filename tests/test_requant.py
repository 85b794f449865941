"""Requantization against exact rational arithmetic: edge cases and hypothesis properties."""
from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hwgen.golden import requantize
from hwgen.ir import quantize_multiplier

M0_MIN, M0_MAX = 1 << 30, (1 << 31) - 1
ACC_MIN, ACC_MAX = -(1 << 31), (1 << 31) - 1


def exact(acc: int, m0: int, shift: int, zero_point: int, lo: int, hi: int) -> int:
    """round-half-up(acc * M0 / 2**(31 - s)) + z, clamped, in exact rationals."""
    value = Fraction(acc * m0, 1 << (31 - shift))
    return min(hi, max(lo, math.floor(value + Fraction(1, 2)) + zero_point))


def golden(acc, m0, shift, zero_point=0, lo=-128, hi=127) -> int:
    return int(requantize(np.array([acc]), np.array([m0]), np.array([shift]), zero_point, lo, hi)[0])


@pytest.mark.parametrize("acc, m0, shift, z, lo, hi", [
    (0, M0_MIN, 0, 0, -128, 127),
    (1 << 20, M0_MAX, 30, 0, -128, 127),          # saturates high, largest shift
    (-(1 << 20), M0_MAX, 30, 0, -128, 127),       # saturates low
    (ACC_MAX, M0_MAX, 30, 0, 0, 255),             # int32 extreme, uint8 clamp
    (ACC_MIN, M0_MAX, 30, 0, 0, 255),
    (ACC_MAX, M0_MAX, -31, 0, -128, 127),         # smallest shift: right shift by 62
    (ACC_MIN, M0_MIN, -31, -128, -128, 127),
    (-5, M0_MIN, 0, 0, -128, 127),                # negative accumulator
    (-12345, 1518500250, -10, 3, -128, 127),
])
def test_edge_cases_equal_exact_arithmetic(acc, m0, shift, z, lo, hi):
    assert golden(acc, m0, shift, z, lo, hi) == exact(acc, m0, shift, z, lo, hi)


@pytest.mark.parametrize("acc, expected", [(1, 1), (3, 2), (-1, 0), (-3, -1), (5, 3), (-5, -2)])
def test_exact_half_way_ties_round_up(acc, expected):
    # M0 = 2**30 with s = 0 multiplies by exactly 1/2: odd accumulators land on .5.
    assert golden(acc, M0_MIN, 0) == expected == exact(acc, M0_MIN, 0, 0, -128, 127)


def test_largest_and_smallest_shift_unclamped():
    wide = (-(1 << 40), 1 << 40)
    # s = 30: right shift by 1 with rounding term 1; 3 * 2**30 / 2 = 3 * 2**29 exactly.
    assert golden(3, M0_MIN, 30, 0, *wide) == 3 << 29
    assert golden(-3, M0_MAX, 30, 0, *wide) == exact(-3, M0_MAX, 30, 0, *wide) == -3221225470
    # s = -31: right shift by 62; the int32 extremes times M0 land on -1, 0 or 1 only.
    assert golden(ACC_MAX, M0_MAX, -31, 0, *wide) == exact(ACC_MAX, M0_MAX, -31, 0, *wide) == 1
    assert golden(ACC_MIN, M0_MAX, -31, 0, *wide) == exact(ACC_MIN, M0_MAX, -31, 0, *wide)


def test_relu_clamp_at_zero_point():
    assert golden(-1000, M0_MIN, 0, zero_point=-128, lo=-128, hi=127) == -128
    assert golden(-1000, M0_MIN, 0, zero_point=0, lo=0, hi=255) == 0


@settings(max_examples=400, deadline=None)
@given(acc=st.integers(ACC_MIN, ACC_MAX), m0=st.integers(M0_MIN, M0_MAX), shift=st.integers(-31, 30),
       z=st.integers(-128, 127), out=st.sampled_from([(-128, 127), (0, 255)]))
def test_property_equals_exact(acc, m0, shift, z, out):
    lo, hi = out
    z = min(max(z, lo), hi)
    assert golden(acc, m0, shift, z, lo, hi) == exact(acc, m0, shift, z, lo, hi)


@settings(max_examples=300, deadline=None)
@given(acc=st.integers(-(1 << 24), 1 << 24), shift=st.integers(-31, 30), m0=st.integers(M0_MIN, M0_MAX))
def test_property_vectorized_equals_scalar(acc, shift, m0):
    accs = np.array([acc, -acc, acc // 3, 0])
    got = requantize(accs, np.full(4, m0), np.full(4, shift), 0, -(1 << 40), 1 << 40)
    assert got.tolist() == [exact(int(a), m0, shift, 0, -(1 << 40), 1 << 40) for a in accs]


@settings(max_examples=300, deadline=None)
@given(real=st.floats(2.0 ** -32, 2.0 ** 29, allow_nan=False, allow_infinity=False))
def test_quantize_multiplier_range_and_precision(real):
    m0, shift = quantize_multiplier(real)
    assert M0_MIN <= m0 <= M0_MAX and -31 <= shift <= 30
    assert abs(Fraction(m0) * Fraction(2) ** (shift - 31) - Fraction(real)) <= Fraction(real) * Fraction(1, 1 << 31)


def test_quantize_multiplier_edges():
    assert quantize_multiplier(1.0) == (M0_MIN, 1)
    assert quantize_multiplier(0.5) == (M0_MIN, 0)
    assert quantize_multiplier(1 - 2.0 ** -40) == (M0_MIN, 1)   # mantissa rounds up to 2**31
    with pytest.raises(ValueError, match="needs shift -33"):
        quantize_multiplier(2.0 ** -34)
    with pytest.raises(ValueError, match="positive and finite"):
        quantize_multiplier(0.0)
