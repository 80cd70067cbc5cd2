"""The Triton path of accelerated/kvquant.py (accelerated/kvquant_kernels.py; docs/08-kvquant.md).

Two kinds of tests:

* CPU, always run: the launch helpers (tiles cover every element exactly once,
  tile sizes), the broadcast strides of the level tables, the kernel's binary
  search (written in torch) against the reference's ``nearest_level``, and the
  dispatch (``use_kernel``, ``KVSINK_KVQUANT_KERNEL``) on a CPU tensor;
* kernel, run on CUDA (or on CPU under ``TRITON_INTERPRET=1`` with triton
  installed; skipped with the reason otherwise): the kernels against the numpy
  reference, **bit for bit** (codes, packed words, ``s``, ``c``, dequantized
  values) -- the claim of docs/08-kvquant.md "Triton path".
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

import accelerated.kvquant as A
import accelerated.kvquant_kernels as K
import reference.kvquant as R
from accelerated.packing import words_to_reference
from reference.config import KVSinkConfig
from tests.conftest import KERNEL_DEVICE as KDEV, needs_kernel

F32 = np.float32


def t(a, device="cpu"):
    return torch.from_numpy(np.ascontiguousarray(a)).to(device)


def u32(a):
    return np.ascontiguousarray(np.asarray(a, dtype=F32)).view(np.uint32)


# =========================================================================== CPU: launch helpers

SHAPES = [(1, 3, 32, 64), (2, 3, 17, 8), (1, 1, 1, 1), (2, 2, 100, 70), (1, 8, 512, 128), (3, 1, 5, 13),
          (1, 2, 7, 8192)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("group", [1, 3, 8, 32, 64, 200])
def test_quantize_launch_covers_every_element_once(shape, bits, group):
    b, h, tt, d = shape
    cpw = 32 // bits
    w = -(-d // cpw)
    for axis in ("channel", "token"):
        lp = K.quantize_launch(shape, bits, group, axis)
        assert lp["cpw"] == cpw and lp["W"] == w and lp["CPW_PAD"] >= cpw
        assert lp["CPW_PAD"] & (lp["CPW_PAD"] - 1) == 0
        if axis == "channel":
            g_pad, wb, nb = lp["G_PAD"], lp["W_BLOCK"], lp["n_blocks"]
            assert lp["NGT"] == -(-tt // group)
            assert g_pad >= min(group, tt) and g_pad & (g_pad - 1) == 0
            assert wb & (wb - 1) == 0 and wb * nb >= w and (nb - 1) * wb < w      # no empty program
            assert g_pad * wb * lp["CPW_PAD"] <= max(K.MAX_TILE, g_pad * lp["CPW_PAD"])
            assert lp["grid"] == b * h * lp["NGT"] * nb
            # every (n, t, word) belongs to exactly one program (pid -> (n, g, wb) as in the kernel)
            pid = np.arange(lp["grid"])
            wbi, rest = pid % nb, pid // nb
            g, n = rest % lp["NGT"], rest // lp["NGT"]
            r = np.arange(g_pad)
            rows = g[:, None] * group + r[None, :]                            # (grid, G_PAD)
            words = wbi[:, None] * wb + np.arange(wb)[None, :]               # (grid, W_BLOCK)
            keep = ((r[None, :] < group) & (rows < tt))[:, :, None] & (words < w)[:, None, :]
            nn = np.broadcast_to(n[:, None, None], keep.shape)
            rr = np.broadcast_to(rows[:, :, None], keep.shape)
            ww = np.broadcast_to(words[:, None, :], keep.shape)
            seen = np.zeros((b * h, tt, w), int)
            np.add.at(seen, (nn[keep], rr[keep], ww[keep]), 1)
            assert (seen == 1).all()
        else:
            tb, nb = lp["T_BLOCK"], lp["n_blocks"]
            assert lp["NGD"] == -(-d // group) and lp["W_PAD"] >= w
            assert tb & (tb - 1) == 0 and tb * nb >= tt and (nb - 1) * tb < tt
            assert tb * lp["W_PAD"] * lp["CPW_PAD"] <= max(K.MAX_TILE, lp["W_PAD"] * lp["CPW_PAD"])
            assert lp["grid"] == b * h * nb


@pytest.mark.parametrize("shape", SHAPES)
def test_dequantize_launch_covers_every_element_once(shape):
    b, h, tt, d = shape
    lp = K.dequantize_launch(shape)
    assert lp["D_PAD"] >= d and lp["D_PAD"] & (lp["D_PAD"] - 1) == 0
    tb, nb = lp["T_BLOCK"], lp["n_blocks"]
    assert tb & (tb - 1) == 0 and tb * nb >= tt and (nb - 1) * tb < tt
    assert tb * lp["D_PAD"] <= max(K.DEQ_TILE, lp["D_PAD"])
    assert lp["grid"] == b * h * nb


def test_kernel_supported():
    assert K.kernel_supported((1, 3, 32, 64), 32, "channel")
    assert K.kernel_supported((1, 3, 32, 64), 4, "token")                 # 16 groups: unrolled
    assert not K.kernel_supported((1, 3, 32, 64), 3, "token")             # 22 groups > 16
    assert K.kernel_supported((1, 3, 32, 64), 1, "channel")
    assert not K.kernel_supported((1, 3, 0, 64), 32, "channel")           # empty
    with pytest.raises(ValueError, match="axis"):
        K.quantize_launch((1, 1, 4, 4), 2, 2, "row")


@pytest.mark.parametrize("lead", [(), (3, 1, 5), (3, 1, 1), (1, 3, 1, 1), (2, 3, 4, 5), (4, 1), (1, 1, 4, 1)])
def test_broadcast_strides_address_the_broadcast_table(lead):
    """(n,) nf grid, (H, 1, D) key codebooks, (H, 1, 1) value codebooks and other broadcasts."""
    shape = (2, 3, 4, 5)
    m = 7
    table = torch.arange(int(np.prod(lead + (m,))), dtype=torch.float32).reshape(lead + (m,))
    base, (sb, sh, st_, sd) = K.broadcast_strides(table, shape)
    flat = base.reshape(-1)
    want = table.expand(shape + (m,))
    ib, ih, it, id_, ik = np.meshgrid(*[np.arange(n) for n in shape + (m,)], indexing="ij")
    off = torch.from_numpy(ib * sb + ih * sh + it * st_ + id_ * sd + ik)
    assert torch.equal(flat[off], want)


def test_broadcast_strides_rejects_mismatch():
    with pytest.raises(ValueError, match="broadcast"):
        K.broadcast_strides(torch.zeros(4, 1, 5, 3), (1, 3, 2, 5))


# =========================================================================== CPU: the search

@st.composite
def grids_and_points(draw):
    bits = draw(st.integers(1, 8))
    n = 1 << bits
    kind = draw(st.sampled_from(["nf", "random", "repeats", "flat"]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    rows = 3
    if kind == "nf":
        lv = np.broadcast_to(R.nf_levels(bits), (rows, n)).copy()
    elif kind == "flat":                                        # all levels equal: every beta equal
        lv = np.full((rows, n), F32(rng.uniform(-1, 1)), F32)
    else:
        lv = np.sort(rng.uniform(-1, 1, size=(rows, n)), axis=-1).astype(F32)
        if kind == "repeats":
            lv[:, n // 2:] = lv[:, n // 2:n // 2 + 1]
    beta = R.level_boundaries(lv)
    pts = np.concatenate([beta, np.nextafter(beta, F32(2)), np.nextafter(beta, F32(-2)),
                          rng.uniform(-1.5, 1.5, size=(rows, 9)).astype(F32),
                          np.broadcast_to(F32([-2, 2, -1, 1, 0]), (rows, 5))], axis=-1).astype(F32)
    return bits, lv, pts


@settings(max_examples=150, deadline=None)
@given(grids_and_points())
def test_binary_search_equals_reference_count(case):
    """The kernel's b-step search == #{k : t > beta_k} (ties to the lower level), any sorted grid."""
    bits, lv, pts = case
    want = R.nearest_level(pts, lv[:, None, :])
    beta = (t(lv[:, :-1]) + t(lv[:, 1:])) / torch.full_like(t(lv[:, 1:]), 2.0)   # the dispatch's boundaries
    got = K.nearest_level_search(t(pts), beta[:, None, :].expand(pts.shape + (beta.shape[-1],)), bits)
    np.testing.assert_array_equal(got.numpy(), want)


def test_binary_search_rejects_wrong_table():
    with pytest.raises(ValueError, match="2\\*\\*bits - 1"):
        K.nearest_level_search(torch.zeros(3), torch.zeros(4), 2)


# =========================================================================== CPU: dispatch

def cfg(**kw):
    base = dict(quantizer="kvquant", key_bits=2, value_bits=2, key_group_size=4, value_group_size=8,
                outlier_fraction=0.0, kvquant_datatype="nf")
    base.update(kw)
    return KVSinkConfig(**base)


def test_dispatch_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv(A.KERNEL_ENV, raising=False)
    x = torch.randn(1, 2, 8, 8)
    assert not A.kernel_path(x, 4, "channel", None)                        # CPU tensor: torch path
    with pytest.raises(ValueError, match="use_kernel=True"):
        A.quantize_nonuniform(x, A.nf_levels(2), 2, 4, "channel", use_kernel=True)
    with pytest.raises(TypeError, match="use_kernel"):
        A.quantize_nonuniform(x, A.nf_levels(2), 2, 4, "channel", use_kernel="yes")
    with pytest.raises(ValueError, match="use_kernel=True"):
        A.quantize_block_kvquant(x, x, None, cfg(), use_kernel=True)
    monkeypatch.setenv(A.KERNEL_ENV, "maybe")
    with pytest.raises(ValueError, match=A.KERNEL_ENV):
        A.quantize_nonuniform(x, A.nf_levels(2), 2, 4, "channel")
    monkeypatch.setenv(A.KERNEL_ENV, "0")
    assert not A.kernel_path(x, 4, "channel", None)
    # the torch path is unchanged: still the reference's numbers
    qt = A.quantize_nonuniform(x, A.nf_levels(2), 2, 4, "channel", use_kernel=False)
    ref = R.quantize_nonuniform(x.numpy(), R.nf_levels(2), 2, 4, "channel")
    np.testing.assert_array_equal(qt.codes.numpy(), ref.codes)


# =========================================================================== kernels (CUDA / interpreter)

def _levels(kind, bits, h, d, rng):
    n = 1 << bits
    if kind == "nf":
        return R.nf_levels(bits)
    lead = (h, 1, d) if kind == "channel" else (h, 1, 1)
    lv = np.sort(rng.uniform(-1, 1, size=lead + (n,)), axis=-1).astype(F32)
    if kind == "repeats":
        lv[..., 1] = lv[..., 0]
    return lv


def _input(shape, rng, pattern):
    x = (rng.standard_normal(shape) * rng.uniform(0.1, 20, size=shape[:-1] + (1,))).astype(F32)
    if pattern == "ties":
        # groups with lo = -1, hi = 1 (s = 1, c = 0, t = x exactly) and values on the nf boundaries
        x = rng.choice(np.concatenate([[-1, 1], R.level_boundaries(R.nf_levels(2)),
                                       R.level_boundaries(R.nf_levels(3))]), size=shape).astype(F32)
        x[..., 0, :] = -1
        x[..., -1, :] = 1
        x[..., :, 0] = -1
        x[..., :, -1] = 1
    elif pattern == "constant":                                  # zero-range groups: s = 0, codes 0
        x[:] = F32(3.25)
    elif pattern == "sink":
        x[:, :, 0] *= 1000
    return x


CASES = [  # bits, group, axis, shape, levels kind, input pattern
    (2, 32, "channel", (1, 3, 32, 64), "nf", "normal"),            # a SmolLM2 flushed key block
    (2, 64, "token", (1, 3, 32, 64), "nf", "normal"),              # its values
    (3, 5, "channel", (2, 3, 17, 8), "channel", "normal"),
    (4, 8, "token", (2, 2, 7, 30), "head", "ties"),
    (8, 3, "channel", (1, 2, 10, 7), "repeats", "sink"),
    (1, 7, "token", (2, 1, 5, 13), "head", "normal"),
    (5, 1, "channel", (1, 2, 6, 33), "channel", "constant"),
    (6, 4, "token", (1, 1, 9, 64), "repeats", "ties"),
    (7, 16, "channel", (2, 1, 40, 12), "nf", "ties"),
    (2, 128, "token", (1, 2, 64, 128), "nf", "sink"),
]


@needs_kernel
@pytest.mark.parametrize("bits,group,axis,shape,lvkind,pattern", CASES)
@pytest.mark.parametrize("fraction", [0.0, 0.05])
def test_quantize_kernel_bit_identical_to_reference(bits, group, axis, shape, lvkind, pattern, fraction):
    rng = np.random.default_rng(bits * 100 + group)
    b, h, tt, d = shape
    x = _input(shape, rng, pattern)
    excl = rng.random((b, tt)) < 0.2
    if b > 1:
        excl[-1] = True                                           # a row with every token excluded
    lv = _levels(lvkind, bits, h, d, rng)
    if axis == "channel":
        lo, hi = R.key_outlier_thresholds(x, fraction)
        outl = R.key_outliers(x, lo, hi, excl)
    else:
        outl = R.value_outliers(x, fraction, excl)
    want = R.quantize_nonuniform(x, lv, bits, group, axis, outliers=outl, exclude=excl)
    if KDEV == "cuda":                                            # poison the allocator: unwritten -> mismatch
        torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda").fill_(0xFF)
    got = A.quantize_nonuniform(t(x, KDEV), t(lv, KDEV), bits, group, axis, outliers=t(outl, KDEV),
                                exclude=t(excl, KDEV), use_kernel=True)
    np.testing.assert_array_equal(got.codes.cpu().numpy(), want.codes)
    np.testing.assert_array_equal(u32(got.scale.cpu()), u32(want.scale))
    np.testing.assert_array_equal(u32(got.centre.cpu()), u32(want.centre))
    np.testing.assert_array_equal(got.outlier_index.cpu().numpy(), want.outlier_index)
    np.testing.assert_array_equal(got.outlier_value.cpu().numpy(), want.outlier_value)
    # packed words straight from the kernel (what the cache stores), definition 2.4
    beta = (t(lv, KDEV)[..., :-1] + t(lv, KDEV)[..., 1:]) / 2.0
    codes, words, s, c = K.quantize_dense(t(x, KDEV), t(excl, KDEV), t(outl, KDEV), beta, bits, group, axis,
                                          codes=False, words=True)
    assert codes is None
    np.testing.assert_array_equal(words_to_reference(words.cpu()), want.packed())
    # a strided input (a slice of a larger buffer) gives the same numbers
    big = torch.zeros((b, h, tt + 3, d + 2), device=KDEV)
    big[:, :, 1:tt + 1, 2:] = t(x, KDEV)
    view = big[:, :, 1:tt + 1, 2:]
    assert not view.is_contiguous()
    again = A.quantize_nonuniform(view, t(lv, KDEV), bits, group, axis, outliers=t(outl, KDEV),
                                  exclude=t(excl, KDEV), use_kernel=True)
    np.testing.assert_array_equal(again.codes.cpu().numpy(), want.codes)
    # dequantization: bit-identical (two roundings, no FMA), from codes and from words
    xh_ref = R.dequantize_nonuniform(want)
    xh = A.dequantize_nonuniform(got, use_kernel=True)
    np.testing.assert_array_equal(u32(xh.cpu()), u32(xh_ref))
    xw = K.dequantize_dense(words, s, c, t(lv, KDEV), bits, group, axis, shape, packed=True)
    dense = ~np.isin(np.arange(x.size), want.outlier_index).reshape(shape)
    np.testing.assert_array_equal(u32(xw.cpu())[dense], u32(xh_ref)[dense])


@needs_kernel
@pytest.mark.parametrize("datatype", ["nf", "kmeans"])
def test_block_kernel_equals_torch_path(datatype):
    """quantize_block_kvquant / dequantize_block_kvquant: kernel == torch path == reference."""
    rng = np.random.default_rng(7)
    shape = (2, 3, 32, 64)
    k = rng.standard_normal(shape).astype(F32)
    v = rng.standard_normal(shape).astype(F32)
    k[:, :, :, 5] += 40                                          # an outlier channel
    excl = rng.random((2, 32)) < 0.1
    c = cfg(key_bits=3, value_bits=2, key_group_size=32, value_group_size=64, outlier_fraction=0.02,
            kvquant_datatype=datatype)
    fisher = (rng.random(shape), rng.random(shape)) if datatype == "kmeans" else (None, None)
    cal = R.calibrate_kvquant(k, v, c, exclude=excl, key_fisher=fisher[0], value_fisher=fisher[1])
    ref = R.quantize_block_kvquant(k, v, cal, c, exclude=excl)
    acal = A.KVQuantCalibration.from_reference(cal, KDEV)
    for use in (True, False):
        blk = A.quantize_block_kvquant(t(k, KDEV), t(v, KDEV), acal, c, exclude=t(excl, KDEV), use_kernel=use)
        for side, want in (("keys", ref.keys), ("values", ref.values)):
            got = getattr(blk, side).to_reference()
            for name in ("codes", "scale", "centre", "outlier_index", "outlier_value"):
                np.testing.assert_array_equal(getattr(got, name), getattr(want, name), err_msg=f"{side} {name}")
        kh, vh = A.dequantize_block_kvquant(blk, use_kernel=use)
        rk, rv = R.dequantize_block_kvquant(ref)
        np.testing.assert_array_equal(u32(kh.cpu()), u32(rk))
        np.testing.assert_array_equal(u32(vh.cpu()), u32(rv))


@needs_kernel
def test_kernel_path_validation():
    """The kernel path raises the torch path's errors (overflow of a group's range, NaN input)."""
    x = torch.zeros((1, 1, 4, 8), device=KDEV)
    x[0, 0, 0, 3], x[0, 0, 1, 3], x[0, 0, 0, 4] = 3.0e38, -3.0e38, -3.0e38   # channel 3 and token 0
    for axis in ("channel", "token"):
        for use in (False, True):
            with pytest.raises(ValueError, match="overflows float32"):
                A.quantize_nonuniform(x, A.nf_levels(2, KDEV), 2, 8, axis, use_kernel=use)
    y = torch.zeros((1, 1, 4, 8), device=KDEV)
    y[0, 0, 2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        A.quantize_nonuniform(y, A.nf_levels(2, KDEV), 2, 8, "channel", use_kernel=True)
    # an invalid code (>= 2**b) dequantizes to NaN on the kernel path, never to a plausible value
    qt = A.quantize_nonuniform(torch.randn((1, 1, 4, 8), device=KDEV), A.nf_levels(2, KDEV), 2, 4,
                               "channel", use_kernel=True)
    bad = A.KVQuantTensor(codes=torch.full_like(qt.codes, 7), scale=qt.scale, centre=qt.centre,
                          levels=qt.levels, outlier_index=qt.outlier_index, outlier_value=qt.outlier_value,
                          bits=2, group_size=4, axis="channel", shape=qt.shape)
    assert bool(torch.isnan(A.dequantize_nonuniform(bad, use_kernel=True)).all())


@needs_kernel
def test_env_var_forces_torch_path(monkeypatch):
    calls = []
    real = K.quantize_dense
    monkeypatch.setattr(K, "quantize_dense", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    x = torch.randn((1, 2, 8, 16), device=KDEV)
    monkeypatch.setenv(A.KERNEL_ENV, "0")
    a = A.quantize_nonuniform(x, A.nf_levels(3, KDEV), 3, 8, "channel")
    assert calls == []
    monkeypatch.setenv(A.KERNEL_ENV, "1")
    b = A.quantize_nonuniform(x, A.nf_levels(3, KDEV), 3, 8, "channel")
    assert calls == [1]
    assert torch.equal(a.codes, b.codes) and torch.equal(a.scale, b.scale) and torch.equal(a.centre, b.centre)
