"""The captured decode step of the compileable KVSinkCache (docs/11-transformers.md §11.12,
accelerated/hf/captured.py): with ``max_cache_len``, a one-token step runs its cache work as
traced torch code and one custom operator over pinned buffers, so that inductor captures the whole
step as one CUDA graph.  On the CPU (``captured.OFF_CUDA``: its attention in torch) the captured
steps, eager and traced by dynamo, give the growing cache's tokens, preserved set, validity and
bytes through flushes; the buffers the graph reads stay where they are; the graph's value flags
raise as the eager checks do.  On CUDA: the same with the fused kernel, and through inductor's
CUDA graphs (``mode="reduce-overhead"``)."""

from __future__ import annotations

import math

import pytest
import torch

from tests.conftest import needs_cuda_kernel, needs_hf
from tests.test_hf_compile import NEW, PROMPT, _generate, _inputs, _model
from tests.test_hf_compile import _config as _compile_config

pytestmark = needs_hf


def _config(preserve: str):
    """test_hf_compile's configs; ``"kvsink"``: PFN-1 and a predictor threshold that this random
    model's ``hidden_states[1]`` passes at some tokens (15 and 5 of the 44 slots preserved)."""
    from dataclasses import replace
    if preserve == "pfn":
        return _compile_config("pfn")
    return replace(_compile_config("kvsink"), preserve="pfn+kvsink", predictor_threshold=0.02)


@pytest.fixture
def off_cuda(monkeypatch):
    import accelerated.hf.captured as captured
    monkeypatch.setattr(captured, "OFF_CUDA", True)
    return captured


class _Recorder:
    """Counts the captured steps and records, per step, the identities of the tensors the graph reads."""

    def __init__(self, captured, monkeypatch):
        self.steps, self.tensors = 0, []
        original = captured.CapturedSteps.finish

        def finish(steps_self, last_hidden):
            self.steps += 1
            self.tensors.append([tuple(id(t) for t in layer.store.captured_tensors())
                                 for layer in steps_self.steps.layers])
            return original(steps_self, last_hidden)
        monkeypatch.setattr(captured.CapturedSteps, "finish", finish)


def _pair(model, preserve, backend=None, **cache_kw):
    from accelerated.hf import KVSinkCache
    growing = KVSinkCache(model, _config(preserve))
    ref = _generate(model, growing)
    static = KVSinkCache(model, _config(preserve), max_cache_len=PROMPT + NEW, **cache_kw)
    return growing, ref, static, _generate(model, static, backend=backend)


def _same_cache(a, b):
    assert torch.equal(a.preserved_mask, b.preserved_mask)
    assert torch.equal(a.valid_mask, b.valid_mask)
    assert a.nbytes() == b.nbytes()
    assert [l.get_seq_length() for l in a.layers] == [l.get_seq_length() for l in b.layers]


@pytest.mark.parametrize("preserve", ["pfn", "kvsink"])
def test_captured_steps_equal_the_growing_cache(off_cuda, monkeypatch, preserve):
    """Every decode step captured, through several flushes (residual 8, blocks of 8): the growing
    cache's tokens and contents; the buffers the graph reads are the same tensors at every step."""
    rec = _Recorder(off_cuda, monkeypatch)
    model = _model()
    growing, ref, static, out = _pair(model, preserve)
    assert rec.steps == NEW - 1
    assert torch.equal(out, ref)
    _same_cache(static, growing)
    if preserve == "kvsink":                # tokens preserved by the predictor during the decode
        assert int(static.preserved_mask[:, PROMPT:].sum()) > 0
    assert all(t == rec.tensors[0] for t in rec.tensors), "a pinned buffer moved"


def test_captured_preserved_store_outgrows_its_pin(off_cuda, monkeypatch):
    """A preserved store pinned for 2 tokens per row outgrows it mid-generation: the captured step
    binds the new buffers and the result is still the growing cache's."""
    monkeypatch.setattr(off_cuda, "PRESERVED_CAPACITY", 2)
    rec = _Recorder(off_cuda, monkeypatch)
    model = _model()
    growing, ref, static, out = _pair(model, "kvsink")
    assert int(static.preserved_mask.sum(dim=1).max()) > 2
    assert torch.equal(out, ref)
    _same_cache(static, growing)
    assert len({tuple(t) for t in rec.tensors}) > 1, "the preserved store never grew"


@pytest.mark.slow
def test_captured_steps_traced_by_dynamo(off_cuda, monkeypatch):
    """The captured step traced by dynamo (one graph for the decoder layers, kept for a second
    cache) gives the growing cache's tokens and contents."""
    from torch._dynamo.utils import counters

    from accelerated.hf import KVSinkCache
    torch._dynamo.reset()
    rec = _Recorder(off_cuda, monkeypatch)
    model = _model()
    growing, ref, static, out = _pair(model, "kvsink", backend="eager")
    assert rec.steps == NEW - 1 and torch.equal(out, ref)
    _same_cache(static, growing)
    graphs = int(counters["stats"]["unique_graphs"])
    again = KVSinkCache(model, _config("kvsink"), max_cache_len=PROMPT + NEW)
    assert torch.equal(_generate(model, again, backend="eager"), ref)
    assert int(counters["stats"]["unique_graphs"]) == graphs, "a new cache recompiled"


@pytest.mark.slow
def test_captured_steps_through_inductor(off_cuda):
    torch._dynamo.reset()
    model = _model()
    growing, ref, static, out = _pair(model, "kvsink", backend="inductor")
    assert torch.equal(out, ref)
    _same_cache(static, growing)


def _poison_after(model, step: int, weight):
    """A logits processor that sets ``weight[0, 0]`` to NaN once ``step`` tokens are generated."""
    from transformers import LogitsProcessor

    class Poison(LogitsProcessor):
        def __init__(self):
            self.n = 0

        def __call__(self, input_ids, scores):
            self.n += 1
            if self.n == step:
                with torch.no_grad():
                    weight[0, 0] = math.nan
            return scores
    return Poison()


def test_captured_value_checks(off_cuda):
    """A NaN query (last layer's q_proj) in a captured step is recorded in the graph's flag and
    raised when ``generate`` returns (the eager check's error); the cache then refuses forwards
    until ``reset()``."""
    from transformers import LogitsProcessorList

    from accelerated.hf import KVSinkCache
    model = _model()
    weight = model.model.layers[3].self_attn.q_proj.weight
    cache = KVSinkCache(model, _config("kvsink"), max_cache_len=PROMPT + NEW)
    ids, mask = _inputs()
    with pytest.raises(ValueError, match="query contains NaN or Inf"):
        with torch.no_grad():
            model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=4,
                           do_sample=False, pad_token_id=0, disable_compile=True,
                           logits_processor=LogitsProcessorList([_poison_after(model, 2, weight)]))
    with pytest.raises(RuntimeError, match="reset"):
        _generate(model, cache)


def test_captured_hidden_check(off_cuda):
    """The predictor's input of a captured step holding NaN sets the graph's flag, which the next
    read of the checks raises (a NaN there also reaches the keys: apart here)."""
    from accelerated.hf import KVSinkCache
    model = _model()
    cache = KVSinkCache(model, _config("kvsink"), max_cache_len=PROMPT + NEW)
    from accelerated.hf.step import pop_active, push_active
    _generate(model, cache)                            # captured steps: the slots are bound to it
    hidden = torch.zeros(2, 1, 64)
    for bad in (False, True):
        hidden[1, 0, 5] = math.inf if bad else 0.0
        push_active(cache)                             # as inside a forward with the cache
        try:
            off_cuda.captured_layer_input(hidden, cache.steps.capture_spec)
        finally:
            pop_active()
        cache.steps.captured.unsettled = True
        if bad:
            with pytest.raises(ValueError, match="hidden contains NaN or Inf"):
                cache.check()
        else:
            cache.check()                              # finite: nothing raised


def test_captured_steps_in_two_threads(off_cuda):
    """Eager captured forwards read their own cache's slots: two threads generating with two
    caches at once get what each gets alone."""
    import threading

    from accelerated.hf import KVSinkCache
    model = _model()
    configs = [_config("kvsink"), _config("pfn")]
    alone = [_generate(model, KVSinkCache(model, c, max_cache_len=PROMPT + NEW)) for c in configs]
    got = [None, None]

    def run(i):
        for _ in range(3):
            got[i] = _generate(model, KVSinkCache(model, configs[i], max_cache_len=PROMPT + NEW))
    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(torch.equal(g, a) for g, a in zip(got, alone))


def test_captured_then_crop_and_continue(off_cuda):
    """Captured steps, a crop, then more: the growing cache's tokens and contents."""
    from accelerated.hf import KVSinkCache
    model = _model()
    results = []
    for kw in ({}, {"max_cache_len": 2 * (PROMPT + NEW)}):
        cache = KVSinkCache(model, _config("kvsink"), **kw)
        out = _generate(model, cache)
        cache.crop(-7)
        ids = out[:, :-7]
        with torch.no_grad():
            more = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                                  max_new_tokens=9, do_sample=False, pad_token_id=0,
                                  disable_compile=True)
        results.append((more, cache))
    assert torch.equal(results[0][0], results[1][0])
    _same_cache(results[1][1], results[0][1])


@pytest.mark.parametrize("kw", [dict(num_beams=2), dict(eager_checks=True),
                                dict(max_preserved=3)], ids=["beams", "eager_checks", "max_preserved"])
def test_captured_steps_with_beams_eager_checks_and_a_cap(off_cuda, monkeypatch, kw):
    """Beam search (rows repeated, then reordered every step, in place: the buffers keep their
    addresses), ``eager_checks=True`` (the graph's flags read every step) and ``max_preserved``
    (the preserved store pinned at the cap): the growing cache's tokens and contents."""
    from dataclasses import replace

    from accelerated.hf import KVSinkCache
    model = _model()
    ids, mask = _inputs()
    gen_kw = {"num_beams": kw["num_beams"]} if "num_beams" in kw else {}
    cache_kw = {"eager_checks": True} if "eager_checks" in kw else {}
    config = _config("kvsink")
    if "max_preserved" in kw:
        config = replace(config, max_preserved=kw["max_preserved"])
    results = []
    rec = _Recorder(off_cuda, monkeypatch)
    for extra in ({}, {"max_cache_len": PROMPT + NEW}):
        cache = KVSinkCache(model, config, **cache_kw, **extra)
        with torch.no_grad():
            out = model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                                 do_sample=False, pad_token_id=0, disable_compile=True, **gen_kw)
        results.append((out, cache))
    assert rec.steps == NEW - 1                          # every decode step of the second run
    if "num_beams" in kw:                                # reordered in place: nothing re-pinned
        assert all(t == rec.tensors[0] for t in rec.tensors)
    assert torch.equal(results[0][0], results[1][0])
    _same_cache(results[1][1], results[0][1])


def test_pinned_window_keeps_its_buffers():
    """``ResidualWindow.pin``: a flush copies the kept tokens to the front of the same buffers,
    the slots after them not valid; ``start_dev`` follows ``start``; a crop clears the slots it drops."""
    from accelerated.cache_state import ResidualWindow
    w = ResidualWindow.empty(2, 3, 4, torch.float32, "cpu", rope=False, steady=64)
    k = torch.randn(2, 3, 10, 4)
    w.append(k, -k, torch.ones(2, 10, dtype=torch.bool), None)
    w.resolve(torch.zeros(2, 10, dtype=torch.bool))
    w.pin(16)
    keys = w.keys
    assert w.pinned and w.offset == 0 and w.capacity == 16 and torch.equal(w.keys[:, :, :10], k)
    w.drop_head(6)
    assert w.keys is keys and w.offset == 0 and w.start == 6 and int(w.start_dev) == 6
    assert torch.equal(w.keys[:, :, :4], k[:, :, 6:]) and torch.equal(w.values[:, :, :4], -k[:, :, 6:])
    assert w.valid[:, :4].all() and not w.valid[:, 4:].any()
    w.crop(8)
    assert w.length == 2 and not w.valid[:, 2:].any() and w.keys is keys
    w.reserve(20)                        # more than the pinned buffer holds: new buffers, unpinned
    assert not w.pinned and w.keys is not keys


@needs_cuda_kernel
@pytest.mark.slow
def test_captured_steps_on_cuda_through_cuda_graphs():
    """On CUDA: the captured steps with the fused kernel, eager and compiled by ``generate`` with
    ``mode="reduce-overhead"`` (inductor's CUDA graphs), give the growing cache's tokens and
    contents."""
    from transformers import CompileConfig

    from accelerated.hf import KVSinkCache
    torch._dynamo.reset()
    model = _model().to("cuda")
    ids, mask = (t.to("cuda") for t in _inputs())

    def run(cache, **kw):
        with torch.no_grad():
            return model.generate(ids, attention_mask=mask, past_key_values=cache, max_new_tokens=NEW,
                                  do_sample=False, pad_token_id=0, **kw)
    growing = KVSinkCache(model, _config("kvsink"))
    ref = run(growing, disable_compile=True)
    eager = KVSinkCache(model, _config("kvsink"), max_cache_len=PROMPT + NEW)
    assert torch.equal(run(eager, disable_compile=True), ref)
    _same_cache(eager, growing)
    for _ in range(2):                   # the second: a new cache, recorded again
        graphed = KVSinkCache(model, _config("kvsink"), max_cache_len=PROMPT + NEW)
        assert torch.equal(run(graphed, compile_config=CompileConfig(mode="reduce-overhead")), ref)
        _same_cache(graphed, growing)
