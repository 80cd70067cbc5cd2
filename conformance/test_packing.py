"""Packing of codes into 32-bit words (CONTRACT: packing; docs/02-quantization.md §2.4).

Exact: packing is integer arithmetic, so words and codes must be bit-identical
to the reference (docs/09-tolerances.md: no tolerance for integers).
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, note, strategies as st

from reference import packing as ref

from .profiles import examples
from .strategies import code_arrays

pytestmark = pytest.mark.part("packing")


@examples(150)
@given(code_arrays())
def test_pack_codes_bit_identical(port, case):
    codes, bits = case
    note(f"pack_codes(codes shape={codes.shape}, bits={bits}); codes={codes.tolist()}")
    got = np.asarray(port.pack_codes(codes, bits))
    want = ref.pack_codes(codes, bits)
    assert got.dtype == np.uint32, f"pack_codes must return uint32 words, got {got.dtype}"
    assert got.shape == want.shape, f"words shape {got.shape} != reference {want.shape}"
    bad = np.argwhere(got != want)
    assert bad.size == 0, (f"{len(bad)} words differ from the reference; first at {tuple(bad[0])}: "
                           f"got {got[tuple(bad[0])]:#010x}, want {want[tuple(bad[0])]:#010x} "
                           f"(bits={bits}, LSB-first layout, cpw={ref.codes_per_word(bits)})")


@examples(150)
@given(code_arrays())
def test_unpack_codes_inverts_reference_words(port, case):
    codes, bits = case
    n = codes.shape[-1]
    words = ref.pack_codes(codes, bits)
    note(f"unpack_codes(words shape={words.shape}, bits={bits}, n={n})")
    got = np.asarray(port.unpack_codes(words, bits, n))
    assert got.dtype == np.uint8, f"unpack_codes must return uint8, got {got.dtype}"
    assert got.shape == codes.shape, f"shape {got.shape} != {codes.shape}"
    bad = np.argwhere(got != codes)
    assert bad.size == 0, (f"{len(bad)} codes differ; first at {tuple(bad[0])}: got "
                           f"{got[tuple(bad[0])]}, want {codes[tuple(bad[0])]}")


@examples(40)
@given(bits=st.integers(1, 8), n=st.integers(0, 40), slot=st.integers(0, 31))
def test_unpack_rejects_dirty_unused_bits(port, bits, n, slot):
    """Nonzero padding codes or unused high bits are an error, not silently dropped."""
    cpw = ref.codes_per_word(bits)
    n_words = ref.packed_length(n, bits)
    if n_words == 0:
        return
    words = np.zeros((n_words,), dtype=np.uint32)
    used = cpw * bits
    padding_slots = n_words * cpw - n
    if used < 32:
        bit = used + slot % (32 - used)            # an unused high bit
    elif padding_slots > 0:
        bit = (cpw - padding_slots) * bits + slot % (padding_slots * bits)   # a padding code
    else:
        return                                      # every bit is used: nothing to dirty
    words[-1] = np.uint32(1) << np.uint32(bit)
    note(f"bits={bits}, n={n}, set bit {bit} of the last word")
    with pytest.raises(ValueError):
        port.unpack_codes(words, bits, n)


@examples(30)
@given(bits=st.sampled_from([0, 9, 16, -1]))
def test_pack_rejects_bad_bits(port, bits):
    with pytest.raises(ValueError):
        port.pack_codes(np.zeros((4,), dtype=np.uint8), bits)


@examples(30)
@given(bits=st.integers(1, 7), n=st.integers(1, 10))
def test_pack_rejects_out_of_range_codes(port, bits, n):
    codes = np.zeros((n,), dtype=np.uint8)
    codes[-1] = 2**bits                      # one too large
    with pytest.raises(ValueError):
        port.pack_codes(codes, bits)
