"""Unit tests of reference/packing.py (docs/02-quantization.md, definition 2.4)."""

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from hypothesis.extra import numpy as hnp

from reference.packing import codes_per_word, pack_codes, packed_length, unpack_codes


def test_codes_per_word_table():
    assert [codes_per_word(b) for b in range(1, 9)] == [32, 16, 10, 8, 6, 5, 4, 4]


@pytest.mark.parametrize("n,bits,expected", [(0, 2, 0), (1, 2, 1), (16, 2, 1), (17, 2, 2),
                                             (64, 2, 4), (10, 3, 1), (11, 3, 2), (64, 3, 7),
                                             (64, 8, 16), (65, 1, 3)])
def test_packed_length(n, bits, expected):
    assert packed_length(n, bits) == expected


def test_two_bit_word_layout():
    # code k sits in bits [2k, 2k+2), least significant first: 1 | 2<<2 | 3<<4 | 0<<6 = 57
    words = pack_codes(np.array([1, 2, 3, 0], dtype=np.uint8), 2)
    assert words.dtype == np.uint32
    assert words.tolist() == [0b00111001] == [57]


def test_three_bit_codes_do_not_straddle_words():
    # 11 codes of 3 bits: 10 in word 0 (bits 0..29, bits 30-31 zero), the 11th in word 1
    codes = np.full(11, 7, dtype=np.uint8)
    words = pack_codes(codes, 3)
    assert words.tolist() == [(1 << 30) - 1, 7]


def test_eight_bit_layout_is_little_endian_bytes():
    codes = np.array([0x11, 0x22, 0x33, 0x44, 0x55], dtype=np.uint8)
    words = pack_codes(codes, 8)
    assert words.tolist() == [0x44332211, 0x55]
    # on a little-endian host the words' bytes are the codes themselves
    assert words.astype("<u4").tobytes()[:5] == codes.tobytes()


def test_one_bit_layout():
    codes = np.zeros(33, dtype=np.uint8)
    codes[[0, 5, 31, 32]] = 1
    assert pack_codes(codes, 1).tolist() == [(1 << 0) | (1 << 5) | (1 << 31), 1]


def test_packs_along_last_axis_of_batched_array():
    codes = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5) % 16
    words = pack_codes(codes, 4)
    assert words.shape == (2, 3, 1)
    for idx in np.ndindex(2, 3):
        expected = sum(int(c) << (4 * k) for k, c in enumerate(codes[idx]))
        assert int(words[idx][0]) == expected


@settings(max_examples=150, deadline=None)
@given(bits=st.integers(1, 8), data=st.data())
def test_round_trip_all_bits_and_lengths(bits, data):
    lead = data.draw(hnp.array_shapes(min_dims=0, max_dims=2, max_side=3))
    n = data.draw(st.integers(0, 70))
    codes = data.draw(hnp.arrays(np.uint8, lead + (n,), elements=st.integers(0, (1 << bits) - 1)))
    words = pack_codes(codes, bits)
    assert words.dtype == np.uint32
    assert words.shape == lead + (packed_length(n, bits),)
    # unused high bits are zero
    used = codes_per_word(bits) * bits
    if used < 32:
        assert not np.any(words >> np.uint32(used))
    back = unpack_codes(words, bits, n)
    assert back.dtype == np.uint8
    np.testing.assert_array_equal(back, codes)


def test_other_integer_dtypes_accepted():
    codes = np.array([3, 0, 1, 2], dtype=np.int64)
    assert pack_codes(codes, 2).tolist() == pack_codes(codes.astype(np.uint8), 2).tolist()


@pytest.mark.parametrize("bits", [0, 9, -1, 2.0, True])
def test_bad_bits(bits):
    with pytest.raises(ValueError, match="bits"):
        pack_codes(np.zeros(4, np.uint8), bits)
    with pytest.raises(ValueError, match="bits"):
        codes_per_word(bits)


def test_codes_out_of_range():
    with pytest.raises(ValueError, match="codes"):
        pack_codes(np.array([0, 4], np.uint8), 2)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(np.array([-1, 0], np.int16), 2)


def test_codes_wrong_dtype_or_rank():
    with pytest.raises(TypeError, match="codes"):
        pack_codes(np.array([0.0, 1.0]), 2)
    with pytest.raises(TypeError, match="codes"):
        pack_codes(np.array([True, False]), 1)
    with pytest.raises(ValueError, match="codes"):
        pack_codes(np.uint8(1), 2)


def test_unpack_validates_words():
    words = pack_codes(np.array([1, 2, 3], np.uint8), 2)
    with pytest.raises(TypeError, match="words"):
        unpack_codes(words.astype(np.int64), 2, 3)
    with pytest.raises(ValueError, match="words.shape"):
        unpack_codes(words, 2, 17)          # 17 codes need 2 words
    with pytest.raises(ValueError, match="n"):
        unpack_codes(words, 2, -1)
    with pytest.raises(ValueError, match="padding"):
        unpack_codes(words, 2, 2)           # code 2 (value 3) would be silently dropped
    with pytest.raises(ValueError, match="high bits"):
        unpack_codes(np.array([1 << 31], np.uint32), 3, 1)


def test_packed_length_bad_n():
    with pytest.raises(ValueError, match="n"):
        packed_length(-1, 2)
    with pytest.raises(ValueError, match="n"):
        packed_length(2.5, 2)
