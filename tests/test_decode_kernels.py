"""The fused decode-attention kernel (accelerated/decode_kernels.py) against the reference.

``QuantizedKVCacheLayer.attend`` takes the fused kernel for decode-sized queries (g*Tq <= 8 rows
per KV head) over the uniform store wherever the Triton kernels run: on CUDA, or on CPU under
``TRITON_INTERPRET=1`` with triton installed (``needs_kernel``; skipped otherwise).  Each case drives
the reference layer and ours with the same tokens (rows of different lengths by left padding,
preserved tokens or none, a residual window or none) and checks the fused output against the
reference's attention within docs/09-tolerances.md 9.3 (row "float32 throughout"), plus the input
differences of 9.2 (b) (the kernel's dequantization q*s + z may be one FMA); a query that sees no
key outputs exactly 0.

On CPU: ``TRITON_INTERPRET=1`` with triton >= 3.8 beside the venv (triton 3.6's interpreter fails
on numpy >= 2.4: ``int()`` of a one-element array in ``range(runtime_int)``), ~4 minutes.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from reference import cache as ref_cache
from reference import quantize as RQ
from reference.config import KVSinkConfig

from accelerated import attention_launch as AL
from accelerated import cache_attend as ACA
from accelerated.attention_launch import fused_launch
from accelerated.cache_checks import DeferredChecks
from accelerated.cache_layer import QuantizedKVCacheLayer
from tests.conftest import KERNEL_DEVICE, needs_cuda, needs_kernel

U = 2.0 ** -24
ETA = 2.0 ** -149


@pytest.fixture
def fused_calls(monkeypatch):
    """Counts the layer's calls of the fused kernel's entry point (proves attend took it)."""
    calls = []
    real = ACA.fused_decode_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)
    monkeypatch.setattr(ACA, "fused_decode_attention", spy)
    return calls


def _np(x):
    x = x.detach().cpu()
    return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()


#: docs/09-tolerances.md 9.5, tensor-core decode: TF32 splits, and sums on tensor cores (2u per
#: addition, truncating) over the 3 chained products of a split
U_TF32 = 2.0 ** -21
U_ACC_TENSOR = 6 * U


def fma_diff(qt, xd):
    """docs/09-tolerances.md 9.2 (b): |x' - x| <= 2u(|q s| + |x|) + eta per element (0 symmetric)."""
    if qt.symmetric:
        return np.zeros(xd.shape)
    gax = RQ.GROUP_AXIS[qt.axis]
    s = RQ.expand_groups(qt.scale, qt.group_size, qt.shape[gax], gax).astype(np.float64)
    return 2 * U * (qt.codes * s + np.abs(xd)) + ETA


def _stats(qt):
    """Scale and zero of every element of ``qt`` (symmetric: ``z = -M s``), float64."""
    gax = RQ.GROUP_AXIS[qt.axis]
    s = RQ.expand_groups(qt.scale, qt.group_size, qt.shape[gax], gax).astype(np.float64)
    if qt.symmetric:
        return s, -((1 << (qt.bits - 1)) - 1) * s
    return s, RQ.expand_groups(qt.zero, qt.group_size, qt.shape[gax], gax).astype(np.float64)


def fold_diff(qt):
    """docs/09-tolerances.md 9.5: keys whose group scale the tensor-core kernel folds into the query,
    ``(3D + 5)u (|code s| + |z|)`` per element."""
    s, z = _stats(qt)
    return (3 * qt.shape[-1] + 5) * U * (np.abs(qt.codes * s) + np.abs(z))


def value_fold_diff(qt, block_t):
    """docs/09-tolerances.md 9.5: values whose per-token statistics the tensor-core kernel folds
    into the weights, ``(BT + 1)u (|code s| + |z|)`` per element."""
    s, z = _stats(qt)
    return (block_t + 1) * U * (np.abs(qt.codes * s) + np.abs(z))


def tensor_constants(launch):
    """(u_in, u_p, u_v) of docs/09 9.5 for a ``TensorDecodeLaunch``: 0 on a folded side (exact
    bfloat16 products), the TF32 split's ``2^-21`` on a dequantized one (``tf32x3``)."""
    u_in = 0.0 if launch.key_fold else U_TF32
    u_pv = 0.0 if launch.value_fold else U_TF32
    return u_in, u_pv, u_pv


def _segments_with_diffs(ref, tensor=None):
    """The reference's segments and, per segment, the kernel's possible key/value differences
    (``tensor``: the tensor-core launch, whose folded sides add their input differences)."""
    segs = ref.segments()
    qk = [b.keys.unpack() for b in ref.blocks]
    qv = [b.values.unpack() for b in ref.blocks]
    kd, vd = segs[0][0], segs[0][1]
    kfold = tensor is not None and tensor.key_fold
    vfold = tensor is not None and tensor.value_fold
    if qk:
        dk = np.concatenate([fma_diff(q, RQ.dequantize(q)) + (fold_diff(q) if kfold else 0.0)
                             for q in qk], axis=2)
        dv = np.concatenate([fma_diff(q, RQ.dequantize(q))
                             + (value_fold_diff(q, tensor.block_t) if vfold else 0.0)
                             for q in qv], axis=2)
    else:
        dk, dv = np.zeros(kd.shape), np.zeros(vd.shape)
    diffs = [(dk, dv)] + [(np.zeros(k.shape), np.zeros(v.shape)) for k, v, _ in segs[1:]]
    return segs, diffs


def _bound(query, ref, qp, tensor=None):
    """Per-output bound: 9.3 with ``c*sum_d |q_d||dk_jd|`` in delta and ``max|dv|`` on the output
    (u_o = u; V, A, S over the visible keys); the CUDA-core engine (``tensor`` None): u_in = u_p =
    u_v = 0, sums u; ``tensor`` (the tensor-core launch): 9.5's constants and its folded sides'
    input differences.  Returns (bound, S)."""
    u_in, u_p, u_v = (0.0, 0.0, 0.0) if tensor is None else tensor_constants(tensor)
    u_acc = U if tensor is None else U_ACC_TENSOR
    segs, diffs = _segments_with_diffs(ref, tensor)
    q = np.abs(query.astype(np.float64))
    b, hq, tq, d = q.shape
    k = np.concatenate([np.asarray(s[0], np.float64) for s in segs], axis=2)
    v = np.concatenate([np.asarray(s[1], np.float64) for s in segs], axis=2)
    kp = np.concatenate([np.asarray(s[2]) for s in segs], axis=1)
    dk = np.concatenate([x[0] for x in diffs], axis=2)
    dv = np.concatenate([x[1] for x in diffs], axis=2)
    heads = np.arange(hq) // (hq // k.shape[1])
    vis = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])              # (B, Tq, S)
    vis4 = vis[:, None]

    def vmax(x):                                                                  # (B, Hq, Tq)
        return np.where(vis4[..., None], np.abs(x[:, heads])[:, :, None], 0.0).max(axis=(3, 4),
                                                                                 initial=0.0)
    a = np.where(vis4, np.einsum("bhtd,bhsd->bhts", q, np.abs(k[:, heads])), 0.0).max(-1, initial=0.0)
    ad = np.where(vis4, np.einsum("bhtd,bhsd->bhts", q, dk[:, heads]), 0.0).max(-1, initial=0.0)
    s_vis = np.broadcast_to(vis.sum(-1)[:, None], (b, hq, tq)).astype(np.float64)
    s = np.maximum(s_vis, 1.0)
    c = 1.0 / math.sqrt(d)
    inner = c * a * (2 * u_in + (d + 1) * u_acc) + U * (3 * np.log(s) + 4) + 2 * s * u_acc + u_p + c * ad
    return (vmax(v) * (2.5 * inner + u_v + 2 * U) + vmax(dv) * (1 + 1e-6))[..., None], s_vis


def _config(bits, residual, axis_v="token", key_group=8):
    return KVSinkConfig(key_bits=bits, value_bits=bits, key_group_size=key_group, value_group_size=16,
                        key_axis="channel", value_axis=axis_v, quantizer="uniform",
                        residual_length=residual, preserve=(), preserve_first_n=1)


def _drive(bits, d, residual, preserve, b=3, h=2, n=48, dtype=torch.bfloat16, seed=0, key_group=8):
    """Reference and fused layers fed the same tokens: a prefill with rows of different lengths
    (left padding), statuses, a flush, then (residual) two single-token decode updates."""
    rng = np.random.default_rng(seed)
    cfg = _config(bits, residual, key_group=key_group)
    ref = ref_cache.QuantizedKVCacheLayer(cfg, dtype=np.float32)
    ours = QuantizedKVCacheLayer(cfg, dtype=dtype, device=KERNEL_DEVICE)
    t = (lambda x: torch.from_numpy(np.ascontiguousarray(x)).to(KERNEL_DEVICE))
    pads = [0, 5, 17][:b]
    steps = ((0, n), (n, n + 1), (n + 1, n + 2)) if residual else ((0, n),)   # n: whole blocks
    for lo, hi in steps:
        k = rng.standard_normal((b, h, hi - lo, d)).astype(np.float32)
        v = rng.standard_normal((b, h, hi - lo, d)).astype(np.float32)
        k[:, :, :, 0] *= 8.0                                  # an outlier channel (sink-like)
        k, v = [torch.from_numpy(x).to(dtype).float().numpy() for x in (k, v)]   # storable exactly
        valid = np.arange(lo, hi)[None, :] >= np.array(pads)[:, None]
        ref.update(k, v, valid)
        ours.update(t(k).to(dtype), t(v).to(dtype), t(valid))
        flags = (rng.random((b, hi - lo)) < 0.2) & valid if preserve else np.zeros((b, hi - lo), bool)
        if preserve and lo == 0:
            flags[np.arange(b), np.array(pads)] = True        # every row's first token: a sink
        ref.resolve(flags)
        ours.resolve(t(flags))
        assert ours.flush() == ref.flush()
    return ref, ours, t


CASES = [  # (bits, D, rows per KV head g, query tokens, residual window, preserved, key group)
    (2, 64, 1, 1, 8, True, 8), (2, 64, 4, 1, 0, False, 16), (2, 128, 2, 2, 8, False, 16),
    (4, 64, 3, 2, 0, True, 8), (4, 128, 4, 1, 8, True, 16), (4, 64, 8, 1, 16, False, 8),
]


@pytest.fixture(params=AL.ENGINES)
def engine(request, monkeypatch):
    """The packed store's programs on tensor cores or on CUDA cores (fused_launch's default made
    this engine wherever the tensor-core kernel applies)."""
    real = AL.decode_engine

    def forced(q_shape, keys, values, device):
        if request.param == "tensor" and real(q_shape, keys, values, "cpu") != "tensor":
            return real(q_shape, keys, values, device)
        return request.param
    monkeypatch.setattr(AL, "decode_engine", forced)
    return request.param


@needs_kernel
@pytest.mark.parametrize("bits,d,g,tq,residual,preserve,key_group", CASES)
def test_fused_decode_matches_reference(bits, d, g, tq, residual, preserve, key_group, engine,
                                        fused_calls):
    h = 2
    ref, ours, t = _drive(bits, d, residual, preserve, h=h, seed=bits * 1000 + d + g,
                          key_group=key_group)
    assert (ref.num_residual > 0) == (residual > 0)
    assert (sum(p.size for p in ref.preserved_positions()) > 0) == preserve
    b = ref.batch_size
    rng = np.random.default_rng(d + g)
    s = ref.seq_length
    # the newest slots, a slot in the middle, and a query before every key (sees nothing)
    choices = [np.full(b, s - 1), rng.integers(0, s, b), np.full(b, -1)]
    qp = np.stack(choices[:tq] if tq < 3 else choices, axis=1).astype(np.int64)
    qp[:, -1] = -1 if tq > 1 else qp[:, -1]
    # the layout transformers hands over: (B, Hq, Tq, D) as a transposed view of (B, Tq, Hq, D)
    q = torch.from_numpy(rng.standard_normal((b, tq, h * g, d)).astype(np.float32)).to(torch.bfloat16)
    q = q.transpose(1, 2)
    query = q.float().numpy()
    qd = q.to(KERNEL_DEVICE)
    got = ours.attend(qd, t(qp))
    assert len(fused_calls) == 1, "attend must take the fused kernel for this query"
    assert got.dtype == torch.float32 and tuple(got.shape) == (b, h * g, tq, d)
    # out_dtype: the kernel writes the float32 result rounded to nearest even, as .to() does (on
    # CUDA, cvt.rn; Triton's CPU interpreter emulates the bf16 store by truncation: one ulp there)
    narrow = ours.attend(qd, t(qp), out_dtype=torch.bfloat16)
    assert len(fused_calls) == 2 and narrow.dtype == torch.bfloat16
    if narrow.is_cuda:
        assert torch.equal(narrow, got.to(torch.bfloat16))
    else:
        ulp = torch.finfo(torch.bfloat16).eps * got.abs().clamp_min(ETA)
        assert torch.all((narrow.float() - got).abs() <= ulp)
    want = ref.attend(query, qp)
    launch = fused_launch(qd.shape, *ours.quantized.kernel_views()[:2], 1, qd.device)
    assert (launch.tensor is not None) == (engine == "tensor")
    folded = launch.tensor is not None and launch.tensor.key_fold
    assert folded == (engine == "tensor" and key_group == 16)
    bound, n_vis = _bound(query, ref, qp, launch.tensor)
    got = _np(got).astype(np.float64)
    blind = np.broadcast_to((n_vis == 0)[..., None], got.shape)
    if tq > 1:
        assert blind[:, :, -1].all()
    assert np.all(got[blind] == 0), "a query that sees no key must output exactly 0"
    err = np.abs(got - want)
    bad = ~blind & (err > bound)
    assert not bad.any(), f"max err {err[~blind].max():.3g} beyond docs/09 9.3"
    # and the float32 torch path (use_kernel=False) agrees within the same bound; the query is given
    # in float32 (the same bf16 values): in the cache's dtype with Tq > 1 it would take the SDPA
    # prefill path, whose bf16 arithmetic has the bf16 row of docs/09 9.5, not this one
    torch_out = _np(ours.attend(qd.float(), t(qp), use_kernel=False)).astype(np.float64)
    assert len(fused_calls) == 2, "use_kernel=False keeps the torch path"
    assert not (~blind & (np.abs(got - torch_out) > 2 * bound)).any()


@needs_kernel
def test_fused_decode_empty_store_and_deferred_checks(fused_calls):
    """Nothing flushed yet (the packed store holds no slot): the fused kernel's full-precision
    programs alone; a non-finite query raises (eager) or is recorded (deferred checks)."""
    cfg = _config(2, 64)
    ref = ref_cache.QuantizedKVCacheLayer(cfg, dtype=np.float32)
    ours = QuantizedKVCacheLayer(cfg, dtype=torch.float32, device=KERNEL_DEVICE)
    rng = np.random.default_rng(7)
    k = rng.standard_normal((2, 1, 5, 64)).astype(np.float32)
    v = rng.standard_normal((2, 1, 5, 64)).astype(np.float32)
    valid = np.array([[True] * 5, [False, False, True, True, True]])
    ref.update(k, v, valid)
    ours.update(torch.from_numpy(k).to(KERNEL_DEVICE), torch.from_numpy(v).to(KERNEL_DEVICE),
                torch.from_numpy(valid).to(KERNEL_DEVICE))
    assert ours.quantized.num_codes == 0
    q = rng.standard_normal((2, 2, 1, 64)).astype(np.float32)
    qp = np.array([[4], [1]])                            # row 1 sees only padding: 0
    qd = torch.from_numpy(q).to(KERNEL_DEVICE)
    got = _np(ours.attend(qd, torch.from_numpy(qp).to(KERNEL_DEVICE))).astype(np.float64)
    assert len(fused_calls) == 1
    bound, n_vis = _bound(q, ref, qp)
    assert np.all(got[1] == 0) and n_vis[1].max() == 0
    assert np.all(np.abs(got - ref.attend(q, qp)) <= bound)
    bad = qd.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ours.attend(bad, torch.from_numpy(qp).to(KERNEL_DEVICE))
    checks = DeferredChecks()
    ours.attend(bad, torch.from_numpy(qp).to(KERNEL_DEVICE), checks=checks)
    with pytest.raises(ValueError, match="NaN or Inf"):
        checks.check()


@needs_kernel
def test_fused_decode_not_taken_beyond_decode_rows(fused_calls):
    """More than DECODE_ROWS query rows per KV head (a prefill), or use_kernel=False: the split
    path (the quantized kernel and the torch blocks), same result within the bound."""
    ref, ours, t = _drive(2, 64, 8, True, h=2, seed=5)
    b, s = ref.batch_size, ref.seq_length
    rng = np.random.default_rng(5)
    q = rng.standard_normal((b, 6, 3, 64)).astype(np.float32)        # g*Tq = 3*3 = 9 rows
    qp = np.stack([np.full(b, s - 3), np.full(b, s - 2), np.full(b, s - 1)], axis=1)
    got = _np(ours.attend(t(q), t(qp))).astype(np.float64)
    assert fused_calls == []
    bound, _ = _bound(q, ref, qp)
    assert np.all(np.abs(got - ref.attend(q, qp)) <= bound)


def test_fused_launch_covers_every_token():
    """The launch's programs cover the packed store's slots and every full-precision token; an
    empty store gets no quantized program; results are cached per shape."""
    from accelerated.quantize import quantize_packed
    from accelerated.triton_support import CPU_NOMINAL_SMS
    for t_len, fp_tokens, d in ((0, 5, 64), (64, 0, 128), (4096, 161, 128), (96, 1000, 64),
                                (32768, 168, 128)):
        x = torch.zeros((2, 3, t_len, d))
        keys = quantize_packed(x, 2, 32, "channel") if t_len else quantize_packed(x, 2, 32, "token")
        values = quantize_packed(x, 4, 32, "token")
        for engine in AL.ENGINES:
            fl = fused_launch((2, 6, 1, d), keys, values, fp_tokens, "cpu", engine=engine)
            dec, tc = fl.decode, fl.tensor
            assert (tc is not None) == (engine == "tensor")
            tile = tc.block_t if tc else dec.a * dec.ts
            assert fl.n_split * fl.tiles_per_split * tile >= t_len
            assert (fl.n_split == 0) == (t_len == 0)
            assert fl.n_fp * fl.fp_tiles * fl.fp_block >= fp_tokens > (fl.n_fp - 1) * fl.fp_tiles * fl.fp_block
            # quantized and full-precision programs that work, together within the target (whole
            # waves); on tensor cores one program per (KV head, split) does all rows
            heads, rows = 2 * 3, 2 * 3 * dec.nrg
            programs = (heads if tc else rows) * fl.n_split + rows * fl.n_fp
            per_sm = AL.tensor_tuning("cpu").programs_per_sm if tc else AL.PROGRAMS_PER_SM
            target = per_sm * CPU_NOMINAL_SMS
            assert programs <= max(target, (heads if tc else rows) * min(fl.n_split, 1) + rows * fl.n_fp)
            assert fused_launch((2, 6, 1, d), keys, values, fp_tokens, "cpu", engine=engine) is fl
        assert fused_launch((2, 6, 1, d), keys, values, fp_tokens, "cpu").tensor is not None
    with pytest.raises(ValueError, match="engine must be one of"):
        fused_launch((2, 6, 1, 64), keys, values, 1, "cpu", engine="fast")
    odd = quantize_packed(torch.zeros((2, 3, 64, 64)), 3, 32, "token")
    assert fused_launch((2, 6, 1, 64), odd, odd, 1, "cpu").tensor is None    # 3-bit: CUDA cores
    with pytest.raises(ValueError, match="engine='tensor' needs"):
        fused_launch((2, 6, 1, 64), odd, odd, 1, "cpu", engine="tensor")


def test_decode_tuning_by_device_family(monkeypatch):
    """The named per-device launch settings: an H100 finds its (bits, head dim) entry, a device or
    shape without one gets the default; decode_launch takes them unless told otherwise."""
    from accelerated.quantize import quantize_packed
    from accelerated.triton_support import DeviceProperties
    assert AL.decode_tuning("cpu", 2, 128) == AL.DEFAULT_DECODE_TUNING
    h100 = DeviceProperties(name="NVIDIA H100 80GB HBM3", sm_count=132, capability=(9, 0))
    monkeypatch.setattr(AL, "device_properties", lambda device: h100)
    special = AL.DecodeTuning(a=4, num_warps=8, rb=2)
    monkeypatch.setitem(AL.DECODE_TUNING, ("H100", 4, 64), special)
    assert AL.decode_tuning("cuda", 4, 64) == special
    assert AL.decode_tuning("cuda", 8, 64) == AL.DEFAULT_DECODE_TUNING
    x = torch.zeros((1, 2, 256, 64))
    keys, values = quantize_packed(x, 4, 32, "channel"), quantize_packed(x, 2, 32, "token")
    dl = AL.decode_launch((1, 8, 1, 64), keys, values, "cuda")
    assert (dl.a, dl.num_warps, dl.rb) == (4, 8, 2)
    assert dl.n_split * dl.tiles_per_split * dl.a * dl.ts >= 256
    assert AL.decode_launch((1, 8, 1, 64), keys, values, "cuda", a=1).a == 1


def test_tensor_engine_by_device_family(monkeypatch):
    """The tensor-core programs are the default only on the families of TENSOR_TUNING (with
    capability >= 8.0) and on CPU (the interpreter), with their named settings; elsewhere, and
    for layouts they do not take, the CUDA-core programs."""
    from accelerated.quantize import quantize_packed
    from accelerated.triton_support import DeviceProperties
    x = torch.zeros((1, 2, 256, 128))
    keys, values = quantize_packed(x, 2, 32, "channel"), quantize_packed(x, 2, 32, "token")
    shape = (1, 8, 1, 128)
    assert AL.decode_engine(shape, keys, values, "cpu") == "tensor"
    devices = {"h100": DeviceProperties(name="NVIDIA H100 80GB HBM3", sm_count=132, capability=(9, 0)),
               "a100": DeviceProperties(name="NVIDIA A100-SXM4-80GB", sm_count=108, capability=(8, 0)),
               "old": DeviceProperties(name="NVIDIA H100 (pretend)", sm_count=80, capability=(7, 5))}
    monkeypatch.setattr(AL, "device_properties", lambda device: devices[device])
    assert AL.decode_engine(shape, keys, values, "h100") == "tensor"
    assert AL.decode_engine(shape, keys, values, "a100") == "cuda-core"     # not measured there
    assert AL.decode_engine(shape, keys, values, "old") == "cuda-core"      # no TF32 tensor cores
    three = quantize_packed(torch.zeros((1, 2, 256, 128)), 3, 32, "token")
    assert AL.decode_engine(shape, keys, three, "h100") == "cuda-core"
    assert AL.tensor_tuning("h100") == AL.TENSOR_TUNING["H100"]
    assert AL.tensor_tuning("a100") == AL.DEFAULT_TENSOR_TUNING
    tl = AL.tensor_decode_launch(shape, keys, values, "h100")
    tuning = AL.TENSOR_TUNING["H100"]
    assert (tl.block_t, tl.num_warps, tl.num_stages, tl.key_fold) == (32, tuning.num_warps,
                                                                      tuning.num_stages, True)
    assert tl.n_split == min(256 // 32, tuning.programs_per_sm * 132 // 2)
    assert tl.max_registers == tuning.max_registers       # the named cap reaches the launch
    assert tl.compile_options().get("maxnreg") == tuning.max_registers
    g16 = quantize_packed(x, 2, 16, "channel")
    assert AL.tensor_decode_launch(shape, g16, values, "h100").block_t == 16   # folds at G = 16
    assert not AL.tensor_decode_launch(shape, g16, values, "h100", fold=False).key_fold


@needs_kernel
@pytest.mark.parametrize("bits,d,g", [(2, 64, 4), (4, 128, 1)])
def test_decode_attention_kernel_shares_the_split_body(bits, d, g):
    """decode_attention_kernel (quantized_segment_attention's decode path) and the fused kernel
    share decode_split_state: the segment's partial triple from the kernel equals the torch path's
    after normalisation within 9.3 (+ 9.2 b)."""
    from accelerated import attention as AA
    ref, ours, t = _drive(bits, d, 0, False, h=2, seed=11)
    rng = np.random.default_rng(11)
    b, s = ref.batch_size, ref.seq_length
    q = rng.standard_normal((b, 2 * g, 1, d)).astype(np.float32)
    qp = np.array([[s - 1], [s // 2], [-1]])[:b]
    keys, values, pos = ours.quantized.kernel_views()
    args = dict(query_positions=t(qp), key_positions=pos)
    got = AA.normalise(*AA.quantized_segment_attention(t(q), keys, values, use_kernel=True, **args))
    bound, n_vis = _bound(q, ref, qp)
    want = ref.attend(q, qp)
    got = _np(got).astype(np.float64)
    assert np.all(got[n_vis == 0] == 0)
    assert np.all(np.abs(got - want) <= bound)


@needs_cuda
def test_fused_decode_step_never_synchronises(fused_calls):
    """With deferred checks (as in a model step) the fused attend reads nothing on the host:
    CUDA's sync debug mode turns any synchronising call into an error."""
    if KERNEL_DEVICE != "cuda":
        pytest.skip("needs triton on the GPU")
    ref, ours, t = _drive(2, 128, 8, True, h=2, seed=3)
    q = torch.randn(ref.batch_size, 8, 1, 128, device="cuda", dtype=torch.bfloat16)
    qp = torch.full((ref.batch_size, 1), ref.seq_length - 1, device="cuda")
    ours.attend(q, qp, checks=DeferredChecks())                       # compile outside the guard
    checks = DeferredChecks()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = ours.attend(q, qp, checks=checks)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert len(fused_calls) == 2
    checks.check()
    assert bool(torch.isfinite(out).all())
