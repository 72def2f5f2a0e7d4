import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordexp.core import codec


@settings(max_examples=300, deadline=None)
@given(size=st.integers(2, 8192), frac=st.floats(0, 1, allow_nan=False))
def test_roundtrip_within_half_a_bin(size, frac):
    x = frac * (size - 1)
    back = codec.bin_to_pixel(codec.pixel_to_bin(x, size), size)
    assert abs(back - x) <= codec.max_roundtrip_error(size) * (1 + 1e-9)
    assert codec.max_roundtrip_error(size) == pytest.approx((size - 1) / (2 * (codec.K - 1)))


@settings(max_examples=200, deadline=None)
@given(size=st.integers(2, 4096), k=st.integers(0, codec.K - 1))
def test_bin_centres_are_fixed_points(size, k):
    assert codec.pixel_to_bin(codec.bin_to_pixel(k, size), size) == k


@settings(max_examples=200, deadline=None)
@given(size=st.integers(2, 4096), a=st.floats(-50, 5000), b=st.floats(-50, 5000))
def test_monotone_and_clamped(size, a, b):
    ka, kb = codec.pixel_to_bin(a, size), codec.pixel_to_bin(b, size)
    assert 0 <= ka < codec.K and 0 <= kb < codec.K
    if a <= b:
        assert ka <= kb


def test_endpoints_and_half_up_rounding():
    assert codec.pixel_to_bin(0, 128) == 0
    assert codec.pixel_to_bin(127, 128) == 999
    assert codec.pixel_to_bin(128, 128) == 999  # a box edge on the border clamps to the last bin
    # x whose scaled value is exactly k + 0.5 rounds up (not to even)
    size = 1000  # (S-1) == (K-1): scaled value == x
    assert codec.pixel_to_bin(2.5, size) == 3 and codec.pixel_to_bin(3.5, size) == 4


def test_vectorised_matches_scalar():
    rng = np.random.default_rng(0)
    xs = rng.uniform(-10, 300, size=500)
    sizes = rng.integers(2, 300, size=500)
    ks = codec.pixels_to_bins(xs, sizes)
    assert ks.tolist() == [codec.pixel_to_bin(x, s) for x, s in zip(xs, sizes)]
    assert np.allclose(codec.bins_to_pixels(ks, sizes), [codec.bin_to_pixel(k, s) for k, s in zip(ks, sizes)])


def test_token_strings():
    assert codec.coord_token(0) == "<|coord_0|>" and codec.coord_token(999) == "<|coord_999|>"
    assert len(codec.COORD_TOKENS) == 1000 and len(set(codec.COORD_TOKENS)) == 1000
    assert all(codec.parse_coord_token(t) == k for k, t in enumerate(codec.COORD_TOKENS))
    for bad in ["<|coord_1000|>", "<|coord_-1|>", "<|coord_01|>", "coord_3", "<|coord_3|> ", 5, None]:
        assert not codec.is_coord_token(bad)
        with pytest.raises(ValueError):
            codec.parse_coord_token(bad)
    with pytest.raises(ValueError):
        codec.coord_token(1000)


def test_encode_decode_xy_uses_width_for_x_and_height_for_y():
    toks = codec.encode_xy([0, 0, 99, 49], width=100, height=50)
    assert toks == ["<|coord_0|>", "<|coord_0|>", "<|coord_999|>", "<|coord_999|>"]
    px = codec.decode_xy(toks, 100, 50)
    assert px == [0.0, 0.0, 99.0, 49.0]
    with pytest.raises(ValueError):
        codec.pixel_to_bin(3, 1)
    assert math.isclose(codec.bin_to_pixel(499.5, 1000), 499.5)
