"""The prefill path (accelerated/attention_sdpa.py, docs/11-transformers.md §11.3 "Prefill").

* A prefill's attention through SDPA equals the blocked float32 path (``_attend_prefill``
  disabled) within the sum of the two paths' bounds of docs/09-tolerances.md §9.3 (each is within
  its own bound of the exact result): the SDPA row of the cache dtype (bf16: ``u_p = u_o = 2^-8``)
  plus the float32 row, computed from the test's own inputs (conformance/tolerances.py
  ``attention_bound``); queries that see no key are exactly 0 on both.  Cases: no padding (the
  causal case), left padding (queries seeing nothing), right-aligned queries (older residual
  tokens), chunked prefill (earlier quantized blocks and preserved tokens, merged by log-sum-exp;
  with older residual tokens and padding, or with the window = the queries: the causal plan).
* The SDPA path builds neither a float32 copy of the residual nor a float32 ``(.., Tq, S)`` score
  or mask tensor (every op's outputs recorded by a dispatch mode).
* A prefill's flush quantizes all its blocks in one ``quantize_packed`` call per side.
* Inside a model, the per-layer early flush leaves bit-identical cache contents and logits to the
  end-of-forward flush, and no layer past the predictor's holds the prompt at full precision once
  its forward is done.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from accelerated import attention_sdpa
from accelerated.cache import QuantizedKVCacheLayer
from conformance.tolerances import attention_bound
from reference.config import KVSinkConfig
from tests.conftest import DEVICES

B, H, HQ, D = 2, 2, 4, 8
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _config(residual_length: int) -> KVSinkConfig:
    return KVSinkConfig(key_bits=4, value_bits=4, key_group_size=4, value_group_size=4,
                        residual_length=residual_length)


def _kv(n: int, dtype, device, gen):
    k = torch.randn(B, H, n, D, generator=gen).to(dtype)
    v = torch.randn(B, H, n, D, generator=gen).to(dtype)
    return k.to(device), v.to(device)


def _scenario(name: str, dtype, device):
    """``(layer, query (B, HQ, Tq, D) in dtype, query positions (B, Tq))`` of one prefill case."""
    gen = torch.Generator().manual_seed(7)
    if name in ("causal", "left-padding"):
        n = 24
        layer = QuantizedKVCacheLayer(_config(4), dtype=dtype, device=device)
        valid = torch.ones(B, n, dtype=torch.bool)
        if name == "left-padding":
            valid[1, :5] = False                    # row 1's first 5 queries see no key
        layer.update(*_kv(n, dtype, device, gen), valid=valid.to(device))
        first = 0
    elif name == "right-aligned":                   # older, unflushed tokens before the queries
        n = 6
        layer = QuantizedKVCacheLayer(_config(16), dtype=dtype, device=device)
        layer.update(*_kv(10, dtype, device, gen))
        layer.resolve(torch.zeros(B, 10, dtype=torch.bool, device=device))
        layer.update(*_kv(n, dtype, device, gen))
        first = 10
    else:               # chunked: quantized blocks + preserved tokens (+ older residual tokens)
        n, r0 = (7, 4) if name == "chunked" else (5, 0)
        layer = QuantizedKVCacheLayer(_config(r0), dtype=dtype, device=device)
        layer.update(*_kv(20, dtype, device, gen))
        keep = torch.zeros(B, 20, dtype=torch.bool)
        keep[0, 0] = keep[1, 3] = keep[1, 9] = True
        layer.resolve(keep.to(device))
        layer.flush()
        valid = torch.ones(B, n, dtype=torch.bool)
        if name == "chunked":
            valid[1, :2] = False                    # padding queries still see the earlier keys
        layer.update(*_kv(n, dtype, device, gen), valid=valid.to(device))
        first = 20
        assert layer.quantized.num_codes and layer.preserved_positions()[1].numel() == 2
        assert (layer.num_residual == n) == (name == "chunked-causal")
    query = torch.randn(B, HQ, n, D, generator=gen).to(dtype).to(device)
    qp = torch.arange(first, first + n, device=device).expand(B, n)
    return layer, query, qp


def _bound(layer, query, qp, dtype_name: str):
    """Per-output bound of docs/09 §9.3 over the layer's segments, and the visible-key counts."""
    segs = layer.segments()
    keys = np.concatenate([s[0].float().cpu().numpy() for s in segs], axis=2)
    values = np.concatenate([s[1].float().cpu().numpy() for s in segs], axis=2)
    kp = torch.cat([s[2].cpu() for s in segs], dim=1)
    q = qp.cpu()
    n_visible = ((kp[:, None, :] >= 0) & (kp[:, None, :] <= q[:, :, None])).sum(-1).numpy()
    qn = query.float().cpu().numpy()
    return attention_bound(qn, keys, values, n_visible, None, dtype_name), n_visible


def _counted(monkeypatch):
    """Count the calls of the SDPA path's two entry points."""
    calls = {"sdpa_attention": 0, "sdpa_partial": 0}
    for name in calls:
        original = getattr(attention_sdpa, name)

        def wrapper(*args, _original=original, _name=name):
            calls[_name] += 1
            return _original(*args)
        monkeypatch.setattr(attention_sdpa, name, wrapper)
    return calls


SCENARIOS = ["causal", "left-padding", "right-aligned", "chunked", "chunked-causal"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("name", SCENARIOS)
def test_sdpa_prefill_equals_the_blocked_path_within_the_bound(monkeypatch, device, dtype_name, name):
    dtype = DTYPES[dtype_name]
    layer, query, qp = _scenario(name, dtype, device)
    calls = _counted(monkeypatch)
    got = layer.attend(query, qp)
    entry = "sdpa_partial" if name.startswith("chunked") else "sdpa_attention"
    assert calls[entry] == 1 and sum(calls.values()) == 1, calls       # the SDPA path ran
    monkeypatch.setattr(QuantizedKVCacheLayer, "_attend_prefill", lambda self, *a: None)
    want = layer.attend(query, qp)
    assert sum(calls.values()) == 1                                     # ... and not for this one
    assert got.dtype == torch.float32 and got.shape == want.shape
    sdpa_bound, n_visible = _bound(layer, query, qp, dtype_name)
    f32_bound, _ = _bound(layer, query, qp, "float32")
    blind = np.broadcast_to((n_visible == 0)[:, None, :, None], got.shape)
    g, w = got.cpu().double().numpy(), want.cpu().double().numpy()
    assert np.all(g[blind] == 0) and np.all(w[blind] == 0)
    assert (name == "left-padding") == bool(blind.any())
    err = np.abs(g - w)
    assert np.all(err[~blind] <= np.broadcast_to(sdpa_bound + f32_bound, err.shape)[~blind]), err.max()


def test_decode_and_foreign_dtype_queries_keep_the_blocked_path(monkeypatch):
    """One query (decoding), or a query not in the cache dtype, does not take the SDPA path."""
    layer, query, qp = _scenario("causal", torch.bfloat16, "cpu")
    calls = _counted(monkeypatch)
    layer.attend(query[:, :, -1:], qp[:, -1:])
    layer.attend(query.float(), qp)
    assert sum(calls.values()) == 0


def test_chunked_prefill_without_a_log_sum_exp_op_keeps_the_blocked_path(monkeypatch):
    """Earlier segments to merge and no log-sum-exp op on the device: the float32 blocks, the
    same numbers as with ``_attend_prefill`` disabled."""
    layer, query, qp = _scenario("chunked", torch.bfloat16, "cpu")
    calls = _counted(monkeypatch)
    monkeypatch.setattr(attention_sdpa, "lse_available", lambda device_type: False)
    assert not attention_sdpa.lse_supported("cpu", torch.bfloat16, D)
    got = layer.attend(query, qp)
    assert sum(calls.values()) == 0
    monkeypatch.setattr(QuantizedKVCacheLayer, "_attend_prefill", lambda self, *a: None)
    assert torch.equal(got, layer.attend(query, qp))


def test_lse_ops_have_the_expected_schema_here():
    """This torch has the CPU op with the arguments sdpa_partial passes (the CUDA op's schema is
    part of every build's op registry, checked the same way)."""
    assert attention_sdpa.lse_available("cpu") and attention_sdpa.lse_available("cuda")
    assert not attention_sdpa.lse_available("meta")
    assert attention_sdpa.lse_supported("cuda", torch.float32, 12)               # fp32: 4-aligned
    assert not attention_sdpa.lse_supported("cuda", torch.bfloat16, 12)          # 16-bit: 8-aligned
    assert attention_sdpa.lse_supported("cpu", torch.bfloat16, 3)


def test_residual_plan_is_causal_only_for_the_window_itself():
    valid = torch.ones(2, 5, dtype=torch.bool)
    qp = torch.arange(3, 8).expand(2, 5)
    assert attention_sdpa.residual_plan(qp, 3, valid).causal
    assert not attention_sdpa.residual_plan(qp[:, 1:], 3, valid).causal        # right-aligned
    assert not attention_sdpa.residual_plan(qp + 1, 3, valid).causal           # other positions
    padded = valid.clone()
    padded[0, 0] = False
    plan = attention_sdpa.residual_plan(qp, 3, padded)
    assert not plan.causal and plan.mask.shape == (2, 1, 5, 5) and plan.mask.dtype == torch.bool
    assert plan.seen[:, 0, :, 0].tolist() == [[False, True, True, True, True], [True] * 5]


class _Outputs(TorchDispatchMode):
    """Records (shape, dtype) of every tensor an op returns."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(o, torch.Tensor):
                self.seen.append((tuple(o.shape), o.dtype))
        return out


@pytest.mark.parametrize("name", ["causal", "left-padding"])
@pytest.mark.parametrize("sdpa", [True, False])
def test_prefill_builds_no_float32_residual_copy_or_score_mask(monkeypatch, name, sdpa):
    """bf16 cache, 24 queries over a 24-token residual: the SDPA path makes no float32 tensor
    shaped like the residual ``(B, H, r, D)`` and none with ``>= B*Tq*r`` elements ending in ``r``
    (scores, masks); the blocked path (the control) makes both."""
    layer, query, qp = _scenario(name, torch.bfloat16, "cpu")
    if not sdpa:
        monkeypatch.setattr(QuantizedKVCacheLayer, "_attend_prefill", lambda self, *a: None)
    r, tq = layer.num_residual, query.shape[2]
    with _Outputs() as rec:
        layer.attend(query, qp)
    f32 = [shape for shape, dtype in rec.seen if dtype == torch.float32]
    residual_copy = any(shape == (B, H, r, D) for shape in f32)
    score_like = any(shape[-1] == r and int(np.prod(shape)) >= B * tq * r for shape in f32)
    assert residual_copy == (not sdpa) and score_like == (not sdpa), f32


# ---------------------------------------------------------------------------- inside a model

def _store_state(store):
    """Everything a layer holds, as CPU tensors (bit-level comparison)."""
    out = [store.quantized_slot_positions]
    for side in (store.quantized_keys, store.quantized_values):
        out += [side.words, side.scale] + ([] if side.zero is None else [side.zero])
    out += list(store.preserved) + list(store.residual)
    return [t.cpu() for t in out] + [torch.tensor([store.num_quantized, store.num_residual])]


def test_early_flush_gives_the_end_of_forward_contents(monkeypatch):
    """A prefill with left padding and a predictor at layer 2 of 4: layers 0-1 are flushed when the
    predictor runs, layers 2-3 right after their attention; contents and logits are bit-identical
    to flushing every layer at the end of the forward, and so is the next decode step."""
    from accelerated.hf import KVSinkCache
    from accelerated.hf.step import StepState
    from tests.test_hf import _tiny_llama, forward, predictor_fields, prompt, quant_config

    model = _tiny_llama(4)
    ids = prompt(seed=5, n=30, batch=2)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    cfg = quant_config(4, "pfn+kvsink", **predictor_fields(model, ids[:1], layer=2))
    block = cfg.residual_length + cfg.token_block

    held = []                  # after each decoder layer: which kvsink layers hold >= R + blk tokens
    hooks = [layer.register_forward_hook(
        lambda *a: held.append([l.store is not None and l.store.num_residual >= block for l in early.layers]))
        for layer in model.model.layers]
    early = KVSinkCache(model, cfg)
    try:
        out_early = forward(model, ids, early, attention_mask=mask)
    finally:
        for h in hooks:
            h.remove()
    assert held == [[True, False, False, False], [True, True, False, False],
                    [False] * 4, [False] * 4]

    monkeypatch.setattr(StepState, "flush_early", lambda self, layers: None)
    late = KVSinkCache(model, cfg)
    out_late = forward(model, ids, late, attention_mask=mask)
    assert torch.equal(out_early.logits, out_late.logits)
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], dim=1)
    tok = out_late.logits[:, -1:].argmax(-1)
    for cache in (early, late):
        cache.last = forward(model, tok, cache, attention_mask=step_mask).logits
    assert torch.equal(early.last, late.last)
    for a, b in zip(early.layers, late.layers):
        assert a.store.num_quantized > 0
        for x, y in zip(_store_state(a.store), _store_state(b.store)):
            assert x.dtype == y.dtype and torch.equal(x, y)


@pytest.mark.parametrize("layer_idx", [0, 3])
def test_nonfinite_keys_in_a_prefill_raise_before_anything_is_quantized(layer_idx):
    """NaN keys of layer 0 (waiting for the predictor at layer 2) or layer 3 (flushed right after
    its attention) in a prefill: the ValueError naming the keys is raised by the first early flush
    that reads the checks, before that flush quantizes anything (the layers flushed before it held
    checked tokens only); the cache refuses the next forward until reset()."""
    from accelerated.hf import KVSinkCache
    from tests.test_hf import _tiny_llama, forward, predictor_fields, prompt, quant_config

    model = _tiny_llama(4)
    ids = prompt(seed=6, n=24)
    cfg = quant_config(4, "pfn+kvsink", **predictor_fields(model, ids, layer=2))
    cache = KVSinkCache(model, cfg)

    def poison(mod, args, out):
        out = out.clone()
        out[..., 0] = float("nan")
        return out

    hook = model.model.layers[layer_idx].self_attn.k_proj.register_forward_hook(poison)
    try:
        with pytest.raises(ValueError, match="^keys contains NaN or Inf"):
            forward(model, ids, cache)
    finally:
        hook.remove()
    assert cache.layers[layer_idx].store.num_quantized == 0          # the NaN keys: never quantized
    for layer in cache.layers[:layer_idx]:     # layer 3's case: layers 0-2 flushed checked tokens
        assert layer.store.num_quantized > 0 and bool(torch.isfinite(layer.store.segments()[0][0]).all())
    with pytest.raises(RuntimeError, match="reset"):
        forward(model, ids, cache)
    cache.reset()
    assert torch.equal(forward(model, ids, cache).logits, forward(model, ids, KVSinkCache(model, cfg)).logits)


def test_a_prefill_flush_quantizes_all_its_blocks_in_one_call_per_side(monkeypatch):
    """The flush of a 40-token prefill (9 blocks of 4 due) calls ``quantize_packed_deferred`` once
    for the keys and once for the values (one kernel launch per side on CUDA), each on all 36
    tokens."""
    from accelerated import cache_store
    calls = []
    original = cache_store.quantize_packed_deferred

    def counting(x, *args, **kwargs):
        calls.append(tuple(x.shape))
        return original(x, *args, **kwargs)
    monkeypatch.setattr(cache_store, "quantize_packed_deferred", counting)
    layer = QuantizedKVCacheLayer(_config(4), dtype=torch.bfloat16)
    layer.update(*_kv(40, torch.bfloat16, "cpu", torch.Generator().manual_seed(1)))
    layer.resolve(torch.zeros(B, 40, dtype=torch.bool))
    assert layer.flush() == 9
    assert calls == [(B, H, 36, D), (B, H, 36, D)]
