"""Exhaustive tests where the input domain is small (beside the Hypothesis properties).

* **Packing** (docs/02-quantization.md definition 2.4): every code of every bit
  width 1..8 at every lane of a word (and in a partial last word), through
  ``pack_codes`` / ``unpack_codes`` of the reference and of accelerated/:
  words bit-identical, each code found in the bits the definition names, and
  unpacking inverts packing.
* **The uniform quantizer** (docs/02 definitions 2.1-2.3, docs/09-tolerances.md
  §9.5: "scales, zero points, codes and packed words are bit-identical to the
  reference"): all 63,488 finite float16 bit patterns, as float16 inputs,
  through accelerated ``quantize`` and ``quantize_packed`` against the
  reference, every bit width, both axes, both schemes, the patterns in sorted
  order (neighbouring magnitudes share groups) and in a fixed shuffle (wide
  groups); and, sorted, through the KVQuant quantizer on the nf grid of every
  width (docs/08-kvquant.md definition 8.7; ``s``, ``c`` and codes bit-identical, §9.5).
* **KVQuant decision boundaries** (docs/08-kvquant.md definition 8.3,
  ``q = #{k : t > beta_k}``, a ``t`` on a boundary goes to the lower level): for
  the nf grid of every bit width, every boundary ``beta_k`` and its float32
  neighbours one ulp either side give levels ``k``, ``k`` and ``k + 1``, in the
  reference and in accelerated/, directly (``nearest_level``) and through the
  quantizer (a group with range [-1, 1] has ``s = 1``, ``c = 0``, ``t = x``
  exactly); plus every finite float16 value in [-1.5, 1.5] against every grid.

accelerated/ runs on the CPU, and also on CUDA when a GPU is present (the
Triton kernels of the packed quantizer and of KVQuant).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from accelerated import kvquant as akv
from accelerated import packing as apk
from accelerated import quantize as aq
from reference import kvquant as rkv
from reference import packing as rpk
from reference import quantize as rq

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
BITS = range(1, 9)


def to_torch(a: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a).copy()).to(device)


def finite_float16() -> np.ndarray:
    """Every finite float16 number, once each (both zeros), float16 ``(63488,)``, by bit pattern."""
    x = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    x = x[np.isfinite(x)]
    assert x.size == 63488
    return x


# --------------------------------------------------------------------------- packing (2.4)

def every_code_at_every_lane(bits: int) -> np.ndarray:
    """uint8 ``(2**b * n, n)``, ``n = 2 cpw + 1`` (two full words and one partial): row
    ``c * n + j`` holds code ``c`` at position ``j``; the other positions hold the codes
    ``(c + 1 + i) mod 2**b`` so that every row differs from its neighbours."""
    levels, cpw = 1 << bits, rpk.codes_per_word(bits)
    n = 2 * cpw + 1
    c = np.repeat(np.arange(levels), n)                   # the code under test, per row
    j = np.tile(np.arange(n), levels)                     # its position
    codes = (c[:, None] + 1 + np.arange(n)[None, :]) % levels
    codes[np.arange(codes.shape[0]), j] = c
    return codes.astype(np.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_packing_every_code_at_every_lane(bits, device):
    codes = every_code_at_every_lane(bits)
    n, cpw = codes.shape[-1], rpk.codes_per_word(bits)
    words = rpk.pack_codes(codes, bits)
    assert words.dtype == np.uint32 and words.shape == (codes.shape[0], rpk.packed_length(n, bits))
    # definition 2.4: code k of a row in word k // cpw, bits [(k % cpw) b, (k % cpw) b + b)
    k = np.arange(n)
    lane = (words[:, k // cpw] >> ((k % cpw) * bits).astype(np.uint32)) & np.uint32((1 << bits) - 1)
    np.testing.assert_array_equal(lane, codes)
    used = cpw * bits                                     # unused high bits and padding lanes are 0
    if used < 32:
        assert not np.any(words >> np.uint32(used))
    tail = n % cpw
    assert not np.any(words[:, -1] >> np.uint32(tail * bits))
    np.testing.assert_array_equal(rpk.unpack_codes(words, bits, n), codes)

    got = apk.pack_codes(to_torch(codes, device), bits)
    np.testing.assert_array_equal(apk.words_to_reference(got), words)
    back = apk.unpack_codes(apk.words_from_reference(words).to(device), bits, n)
    assert back.dtype == torch.uint8
    np.testing.assert_array_equal(back.cpu().numpy(), codes)


# --------------------------------------------------------------------------- uniform quantizer

def float16_arrangements():
    """The finite float16 numbers as ``(2, 62, 512)`` inputs: sorted (rows of neighbouring
    values) and in one fixed shuffle."""
    x = np.sort(finite_float16().astype(np.float32), kind="stable").astype(np.float16)
    shuffled = x[np.random.RandomState(16).permutation(x.size)]
    return {"sorted": x.reshape(2, 62, 512), "shuffled": shuffled.reshape(2, 62, 512)}


ARRANGEMENTS = float16_arrangements()
# (group size, axis): token groups of 512 channels split in 8 / in 37 (a partial last group),
# channel groups of 62 tokens split in 4 (partial) / one group of the whole axis
GROUPINGS = [(8, "token"), (37, "token"), (16, "channel"), (62, "channel")]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("symmetric", [False, True], ids=["asymmetric", "symmetric"])
@pytest.mark.parametrize("arrangement", sorted(ARRANGEMENTS))
def test_every_finite_float16_through_the_quantizer(arrangement, symmetric, device):
    x = ARRANGEMENTS[arrangement]
    xt = to_torch(x, device)
    for bits in BITS:
        if symmetric and bits == 1:
            continue                                      # the symmetric scheme needs b >= 2
        for group_size, axis in GROUPINGS:
            what = f"bits={bits} G={group_size} axis={axis}"
            want = rq.quantize(x, bits, group_size, axis, symmetric=symmetric)
            got = aq.quantize(xt, bits, group_size, axis, symmetric=symmetric)
            np.testing.assert_array_equal(got.scale.cpu().numpy().view(np.uint32),
                                          want.scale.view(np.uint32), err_msg=f"scale, {what}")
            if symmetric:
                assert got.zero is None and want.zero is None
            else:
                np.testing.assert_array_equal(got.zero.cpu().numpy().view(np.uint32),
                                              want.zero.view(np.uint32), err_msg=f"zero, {what}")
            np.testing.assert_array_equal(got.codes.cpu().numpy(), want.codes, err_msg=f"codes, {what}")
            packed = aq.quantize_packed(xt, bits, group_size, axis, symmetric=symmetric)
            np.testing.assert_array_equal(apk.words_to_reference(packed.words), want.packed(),
                                          err_msg=f"packed words, {what}")
            np.testing.assert_array_equal(aq.dequantize(packed).cpu().numpy().view(np.uint32),
                                          rq.dequantize(want).view(np.uint32),
                                          err_msg=f"dequantized, {what}")


@pytest.mark.parametrize("device", DEVICES)
def test_every_finite_float16_through_the_kvquant_quantizer(device):
    """Definition 8.7 on the nf grid of every width (no outliers), the values sorted (token
    groups of neighbouring values): ``s``, ``c`` and codes of accelerated/
    bit-identical to the reference (docs/09-tolerances.md §9.5, KVQuant).  The axes alternate
    with the width (accelerated's CPU path takes about a second per call)."""
    x = ARRANGEMENTS["sorted"].reshape(1, 2, 496, 64)
    xt = to_torch(x, device)
    for bits in BITS:
        group_size, axis = (16, "token") if bits % 2 else (8, "channel")
        what = f"bits={bits} G={group_size} axis={axis}"
        levels = rkv.nf_levels(bits)
        want = rkv.quantize_nonuniform(x, levels, bits, group_size, axis)
        got = akv.quantize_nonuniform(xt, to_torch(levels, device), bits, group_size, axis)
        for field in ("scale", "centre"):
            np.testing.assert_array_equal(getattr(got, field).cpu().numpy().view(np.uint32),
                                          getattr(want, field).view(np.uint32), err_msg=f"{field}, {what}")
        np.testing.assert_array_equal(got.codes.cpu().numpy(), want.codes, err_msg=f"codes, {what}")


def test_symmetric_one_bit_is_refused_alike():
    x = ARRANGEMENTS["sorted"]
    with pytest.raises(ValueError, match="bits"):
        rq.quantize(x, 1, 8, "token", symmetric=True)
    with pytest.raises(ValueError, match="bits"):
        aq.quantize(to_torch(x, "cpu"), 1, 8, "token", symmetric=True)


# --------------------------------------------------------------------------- KVQuant boundaries (8.3)

def boundary_probes(bits: int):
    """``(t, want)``: each boundary of the nf grid and its float32 neighbours, with the level
    definition 8.3 assigns: ``k`` on ``beta_k`` and one ulp below it, ``k + 1`` one ulp above."""
    beta = rkv.level_boundaries(rkv.nf_levels(bits))
    assert np.all(np.diff(beta) > 0), "nf boundaries are strictly increasing"
    k = np.arange(beta.size)
    below = np.nextafter(beta, np.float32(-np.inf))
    above = np.nextafter(beta, np.float32(np.inf))
    assert np.all(below > np.concatenate([[-np.inf], beta[:-1]]))    # no neighbour crosses
    assert np.all(above < np.concatenate([beta[1:], [np.inf]]))      # another boundary
    t = np.concatenate([below, beta, above]).astype(np.float32)
    want = np.concatenate([k, k, k + 1]).astype(np.uint8)
    return t, want


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_kvquant_boundaries_and_their_neighbours(bits, device):
    levels = rkv.nf_levels(bits)
    t, want = boundary_probes(bits)
    np.testing.assert_array_equal(rkv.nearest_level(t, levels), want)
    lv = akv.nf_levels(bits, device)
    np.testing.assert_array_equal(akv.level_boundaries(lv).cpu().numpy().view(np.uint32),
                                  rkv.level_boundaries(levels).view(np.uint32))
    np.testing.assert_array_equal(akv.nearest_level(to_torch(t, device), lv).cpu().numpy(), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("bits", BITS)
def test_kvquant_boundaries_through_the_quantizer(bits, device):
    """Token groups of 16 channels holding -1 and 1 (so ``s = 1``, ``c = 0``, ``t = x``) and
    14 probes; value groups are per token, so every probe is decided on its own ``t``."""
    levels = rkv.nf_levels(bits)
    t, want = boundary_probes(bits)
    per = 14
    pad = -len(t) % per
    probes = np.concatenate([t, np.zeros(pad, np.float32)]).reshape(-1, per)
    x = np.concatenate([np.full((len(probes), 1), -1, np.float32), probes,
                        np.ones((len(probes), 1), np.float32)], axis=1)[None, None]   # (1, 1, T, 16)
    ref = rkv.quantize_nonuniform(x, levels, bits, 16, "token")
    np.testing.assert_array_equal(ref.scale, 1)
    np.testing.assert_array_equal(ref.centre, 0)
    codes = ref.codes[0, 0, :, 1:-1].reshape(-1)[:len(t)]
    np.testing.assert_array_equal(codes, want)
    got = akv.quantize_nonuniform(to_torch(x, device), to_torch(levels, device), bits, 16, "token")
    np.testing.assert_array_equal(got.codes.cpu().numpy(), ref.codes)
    np.testing.assert_array_equal(got.scale.cpu().numpy(), ref.scale)
    np.testing.assert_array_equal(got.centre.cpu().numpy(), ref.centre)


@pytest.mark.parametrize("device", DEVICES)
def test_kvquant_every_float16_in_range_against_every_nf_grid(device):
    x = finite_float16().astype(np.float32)
    t = x[np.abs(x) <= 1.5]
    tt = to_torch(t, device)
    for bits in BITS:
        levels = rkv.nf_levels(bits)
        want = rkv.nearest_level(t, levels)
        assert np.all(np.diff(want[np.argsort(t, kind="stable")].astype(int)) >= 0), "monotone in t"
        got = akv.nearest_level(tt, akv.nf_levels(bits, device))
        np.testing.assert_array_equal(got.cpu().numpy(), want, err_msg=f"bits={bits}")
