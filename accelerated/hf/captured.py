"""The captured decode step of a compileable :class:`~accelerated.hf.KVSinkCache` (docs/11 §11.12).

``KVSinkCache(model, config, max_cache_len=N)`` compiled by ``generate`` with
``mode="reduce-overhead"``: every decode step's cache work is traced with the model, so inductor
captures the whole step as ONE CUDA graph and replays it, as it does for transformers'
``StaticCache``.  What makes a replay right at every step:

* the tensors it reads and writes stay where they are: each layer's buffers are pinned
  (``LayerCapture.pin``: the residual window at the front of a fixed buffer that flushes keep, the
  packed store sized by ``max_cache_len``, the preserved store by :data:`PRESERVED_CAPACITY`), and
  reach the traced code as tensor attributes of stable slot objects (:data:`SLOTS`; an eager
  forward reads its own cache's, :func:`current_slots`), rebound to the active cache's tensors
  before each forward and marked ``torch._dynamo.mark_static_address``:
  a new cache, or a buffer that grew, is a new address and inductor's CUDA-graph trees record again;
* what changes per step lives on the device, written by the eager pre-hook before the replay
  (:class:`StepBuffers`): the window slot the token goes to, the query position, its validity;
  the statuses the predictor finds, the per-row counts, the value checks' flags, written by the
  graph in place;
* what the operators' Python did per step (the layers' lengths, the statuses, the deferred slot
  checks) is done by the eager hook after the forward (:meth:`CapturedSteps.finish`), which also
  flushes when a block is due: a flush is eager, outside the graph.

Per layer the traced code appends the step's key and value to the window at the slot
(``index_copy_``), records the query's finiteness in a flag, and calls ``kvsink::captured_attention``
(a custom operator inductor keeps inside the graph): the fused decode kernel over the whole pinned
buffers (accelerated/decode_kernels.py), its launch the same at every step.  At the predictor's
layer it computes the statuses of the step's token (``channel_scores``, ``step_statuses``) into the
step buffers.  The same functions run without compilation (an eager forward of a captured step),
which is how the CPU suite checks them against the growing path.

A step is captured when the cache has ``max_cache_len``, it brings one token per row, every layer
holds tokens in the uniform store on a device where the fused kernel runs, and the query rows per
KV head are at most ``DECODE_ROWS``; otherwise the step takes the operators of
:mod:`accelerated.hf.compiled` when compiled, the growing cache's path when not.  :data:`OFF_CUDA` lets tests capture
on the CPU (the same step, its attention in torch).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import attention as _att
from ..attention_launch import DECODE_ROWS
from ..cache_capture import CAPTURED_TENSORS
from ..decode_kernels import fused_decode_attention
from ..predictor import channel_scores, threshold_float32
from ..preserve import step_statuses
from ..quantize import PackedQuantizedTensor
from .step import active_cache

__all__ = ["CapturedSteps", "StepBuffers", "SLOTS", "current_slots", "PRESERVED_CAPACITY", "OFF_CUDA",
           "captured_attention", "captured_attention_step", "captured_layer_input", "capture_spec",
           "QUERY_MESSAGE", "HIDDEN_MESSAGE"]

#: Preserved tokens per row the pinned preserved store holds before it grows (a growth is a new
#: buffer shape: the compiled step is traced again once).  ``max_preserved`` when larger.
PRESERVED_CAPACITY = 64

#: Capture decode steps off CUDA too (the CPU suite; their attention in torch).
OFF_CUDA = False

QUERY_MESSAGE = "query contains NaN or Inf; pass finite values"
HIDDEN_MESSAGE = "hidden contains NaN or Inf; pass finite hidden states"


class StepBuffers:
    """The device tensors of one captured step (one set per cache, batch ``B``).

    ``slot`` int64 ``(1,)``: the window slot of the step's token; ``qpos`` int64 ``(B, 1)``: its
    position; ``valid`` bool ``(B, 1)``: its validity; ``flags``, ``predicted`` bool ``(B, 1)``:
    its status and the predictor's output (written by the graph); ``valid_count``,
    ``preserved_count`` int64 ``(B,)``: the history's counts (read and updated by the graph);
    ``bad_query``, ``bad_hidden`` bool ``(1,)``: a query / the predictor's hidden state held NaN or
    Inf (OR-ed by the graph); ``channels`` int64: the predictor's channels.
    """

    NAMES = ("slot", "qpos", "valid", "flags", "predicted", "valid_count", "preserved_count",
             "bad_query", "bad_hidden", "channels")

    def __init__(self, batch: int, device, channels: Tuple[int, ...]):
        i64, b1 = dict(dtype=torch.int64, device=device), dict(dtype=torch.bool, device=device)
        self.slot = torch.zeros(1, **i64)
        self.qpos = torch.zeros((batch, 1), **i64)
        self.valid = torch.zeros((batch, 1), **b1)
        self.flags = torch.zeros((batch, 1), **b1)
        self.predicted = torch.zeros((batch, 1), **b1)
        self.valid_count = torch.zeros(batch, **i64)
        self.preserved_count = torch.zeros(batch, **i64)
        self.bad_query = torch.zeros(1, **b1)
        self.bad_hidden = torch.zeros(1, **b1)
        self.channels = torch.tensor(channels or (0,), **i64)
        for name in self.NAMES:
            torch._dynamo.mark_static_address(getattr(self, name))

    @property
    def batch(self) -> int:
        return self.qpos.shape[0]


class _LayerSlot:
    """The captured tensors of one layer (:data:`CAPTURED_TENSORS`) and its packed layout."""

    __slots__ = CAPTURED_TENSORS + ("layout",)


class _Slots:
    """What the traced code reads: stable objects whose tensors are rebound before each forward
    (``step``: a :class:`StepBuffers`' tensors; ``layers[i]``: layer ``i``'s); ``owner``: the
    :class:`CapturedSteps` bound now."""

    def __init__(self):
        self.step = _StepSlot()
        self.layers = []
        self.owner = None

    def layer(self, i: int) -> _LayerSlot:
        while len(self.layers) <= i:
            self.layers.append(_LayerSlot())
        return self.layers[i]

    def bind(self, other: "_Slots") -> None:
        """Take ``other``'s tensors into this object's own (stable) slot objects."""
        for name in StepBuffers.NAMES:
            setattr(self.step, name, getattr(other.step, name))
        for i, src in enumerate(other.layers):
            dst = self.layer(i)
            for name in _LayerSlot.__slots__:
                setattr(dst, name, getattr(src, name, None))


class _StepSlot:
    __slots__ = StepBuffers.NAMES


#: The slots the traced code reads: one per process (one compiled captured forward at a time, as
#: ``compiled_view``).  An eager captured forward reads its own cache's (:func:`current_slots`), so
#: eager forwards in several threads may use different caches.
SLOTS = _Slots()


def current_slots() -> _Slots:
    """:data:`SLOTS` in traced code; the active cache's own slots in an eager forward."""
    if torch.compiler.is_compiling():
        return SLOTS
    return active_cache().steps.captured.slots


def capture_spec(config, predictor, num_hidden_layers: int) -> Tuple:
    """The constants the traced step needs of a cache (part of ``compiled_view``: dynamo guards
    on them): ``(predictor layer or -1, float32 threshold, preserve, preserve_first_n,
    max_preserved)``; the predictor runs in the graph only before a decoder layer (after the last
    one, ``p = L``, the forward hook predicts from the last hidden state)."""
    p = -1 if predictor is None or predictor.layer >= num_hidden_layers else int(predictor.layer)
    thr = 0.0 if p < 0 else threshold_float32(predictor.threshold)
    return (p, thr, config.preserve, config.preserve_first_n, config.max_preserved)


def captured_layer_input(hidden: torch.Tensor, spec: Tuple) -> None:
    """At the predictor's layer of a captured step: the statuses of the step's token from
    ``hidden`` (``(B, 1, C)``, ``hidden_states[p]``; Definition 4.2 then Proposition 3.7) into
    :data:`SLOTS`' step buffers, the per-row counts updated in place, a NaN/Inf in ``hidden``
    recorded in ``bad_hidden``."""
    _, threshold, preserve, first_n, max_preserved = spec
    st = current_slots().step
    st.bad_hidden.logical_or_(~torch.isfinite(hidden).all().reshape(1))
    predicted = channel_scores(hidden.to(torch.float32), st.channels) > threshold
    flags, valid_count, preserved_count = step_statuses(
        st.valid, st.valid_count, st.preserved_count, predicted, preserve=preserve,
        preserve_first_n=first_n, max_preserved=max_preserved)
    st.predicted.copy_(predicted)
    st.flags.copy_(flags)
    st.valid_count.copy_(valid_count)
    st.preserved_count.copy_(preserved_count)


def captured_attention_step(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            layer_idx: int, scaling: Optional[float]) -> torch.Tensor:
    """One layer of a captured step: ``key``/``value`` ``(B, H, 1, D)`` into the window at the
    step's slot, the query's finiteness into ``bad_query``, then the attention of ``query``
    ``(B, Hq, 1, D)`` over the layer: ``(B, 1, Hq, D)`` in the query's dtype."""
    slots = current_slots()
    s, st = slots.layers[layer_idx], slots.step
    if key.dtype != s.keys.dtype or value.dtype != s.values.dtype:
        raise TypeError(f"a captured KVSinkCache step stores keys/values in {s.keys.dtype}; the "
                        f"model gives {key.dtype}/{value.dtype}: build the cache from a forward in "
                        "the model's own dtype")
    s.keys.index_copy_(2, st.slot, key)
    s.values.index_copy_(2, st.slot, value)
    s.valid.index_copy_(1, st.slot, st.valid)
    st.bad_query.logical_or_(~torch.isfinite(query).all().reshape(1))
    scale = float(query.shape[-1] ** -0.5 if scaling is None else scaling)
    return captured_attention(query, s.keys, s.values, s.valid, s.start, st.qpos, s.key_words,
                              s.key_scale, s.key_zero, s.value_words, s.value_scale, s.value_zero,
                              s.slot_positions, s.preserved_keys, s.preserved_values,
                              s.preserved_positions, list(s.layout), scale)


def _packed(words, scale, zero, bits, group, per_channel, symmetric, b, h, d) -> PackedQuantizedTensor:
    return PackedQuantizedTensor(words=words, scale=scale, zero=zero, bits=bits, group_size=group,
                                 axis="channel" if per_channel else "token", symmetric=bool(symmetric),
                                 shape=(b, h, words.shape[2], d))


@torch.library.custom_op("kvsink::captured_attention", mutates_args=())
def captured_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                       valid: torch.Tensor, start: torch.Tensor, qpos: torch.Tensor,
                       key_words: torch.Tensor, key_scale: torch.Tensor, key_zero: Optional[torch.Tensor],
                       value_words: torch.Tensor, value_scale: torch.Tensor,
                       value_zero: Optional[torch.Tensor], slot_positions: torch.Tensor,
                       preserved_keys: torch.Tensor, preserved_values: torch.Tensor,
                       preserved_positions: torch.Tensor, layout: list[int], scale: float) -> torch.Tensor:
    """The attention of ``query`` ``(B, Hq, 1, D)`` over a pinned layer, read whole (a launch
    that is the same at every step: empty slots have position -1, slots after the window are not
    valid): the fused decode kernel where it runs, else the split form in torch.  ``(B, 1, Hq, D)``
    in the query's dtype."""
    b, h, _, d = keys.shape
    kb, kg, kc, vb, vg, vc, sym = layout
    kq = _packed(key_words, key_scale, key_zero, kb, kg, kc, sym, b, h, d)
    vq = _packed(value_words, value_scale, value_zero, vb, vg, vc, sym, b, h, d)
    if _att.attention_kernel_usable(query):
        out = fused_decode_attention(query, qpos, scale, (kq, vq, slot_positions),
                                     (preserved_keys, preserved_values, preserved_positions),
                                     (keys, values, valid, start), out_dtype=query.dtype)
        return out.transpose(1, 2).contiguous()
    return _torch_attention(query, qpos, scale, (kq, vq, slot_positions),
                            (preserved_keys, preserved_values, preserved_positions),
                            (keys, values, valid, start))


@captured_attention.register_fake
def _captured_attention_fake(query, keys, values, valid, start, qpos, key_words, key_scale, key_zero,
                             value_words, value_scale, value_zero, slot_positions, preserved_keys,
                             preserved_values, preserved_positions, layout, scale):
    b, hq, n, d = query.shape
    return query.new_empty((b, n, hq, d))


def _torch_attention(query, qpos, scale, quantized, preserved, residual) -> torch.Tensor:
    """:func:`captured_attention` off the kernel: the three segments' partial softmaxes in float32,
    merged by log-sum-exp (docs/05 Def 5.5), as the growing cache's split form."""
    kq, vq, kpos = quantized
    pk, pv, ppos = preserved
    rk, rv, rvalid, start = residual
    q = query.to(torch.float32)
    rpos = start + torch.arange(rk.shape[2], device=rk.device)
    rpos = torch.where(rvalid, rpos, torch.full_like(rpos, -1))
    parts = [_att.quantized_segment_attention(q, kq, vq, query_positions=qpos, key_positions=kpos,
                                              scale=scale, use_kernel=False, check_query=False),
             _att.segment_partial(q, pk.to(torch.float32), pv.to(torch.float32), qpos, ppos, None,
                                  scale, 256),
             _att.segment_partial(q, rk.to(torch.float32), rv.to(torch.float32), qpos, rpos, None,
                                  scale, 256)]
    out = _att.normalise(*_att.merge_raw(parts))
    return out.to(query.dtype).transpose(1, 2).contiguous()


class CapturedSteps:
    """The captured decode steps of one ``KVSinkCache`` (``cache.steps.captured``): whether a
    step is captured (:meth:`begin`), its host accounting (:meth:`finish`) and the value checks of
    the graph's flags (:meth:`settle`).  ``steps``: the cache's ``StepState``; ``query_heads``: the
    model's attention heads."""

    def __init__(self, steps, query_heads: Optional[int]):
        self.steps = steps
        self.query_heads = query_heads
        self.buffers: Optional[StepBuffers] = None
        self.unsettled = False           # captured steps whose flags are not recorded yet
        self.slots = _Slots()            # this cache's tensors (SLOTS takes them for traced code)
        self._bound = None               # the tensors self.slots holds

    # ------------------------------------------------------------------ before the forward

    def applies(self, tokens) -> bool:
        """Whether a step of ``tokens = (batch, n)`` is captured (module doc)."""
        st = self.steps
        if st.max_length is None or tokens is None or tokens[1] != 1 or not st.layers:
            return False
        stores = [layer.store for layer in st.layers]
        if any(s is None or not s.capturable for s in stores):
            return False
        first = stores[0]
        if self.query_heads is None or tokens[0] != first.batch_size \
                or self.query_heads // first.num_heads > DECODE_ROWS:
            return False
        if first.device.type != "cuda":
            return OFF_CUDA
        return _att.attention_kernel_usable(first.captured_tensors()[0])

    def begin(self, tokens) -> bool:
        """Before a forward (pre-hook): capture it if it :meth:`applies` -- pin and bind the
        buffers, take the step's token into the history and write the step buffers; else record
        the flags of earlier captured steps (:meth:`settle`).  Returns whether it is captured."""
        if not self.applies(tokens):
            self.settle()
            return False
        st = self.steps
        stores = [layer.store for layer in st.layers]
        self._pin(stores)
        batch, n = tokens
        st.begin_tokens(n, batch, stores[0].device)
        buf, hist = self.buffers, st.history
        buf.slot.fill_(stores[0].capture_slot)
        buf.qpos.fill_(hist.length - 1)
        buf.valid.copy_(st.current.valid)
        if st.current.flags is None and hist.valid_count is not buf.valid_count:
            valid_count, preserved_count = hist.counts(batch, buf.qpos.device)
            buf.valid_count.copy_(valid_count)
            buf.preserved_count.copy_(preserved_count)
        self._bind(stores)
        self.unsettled = True
        return True

    def _pin(self, stores) -> None:
        st = self.steps
        c = st.config
        preserved = max(PRESERVED_CAPACITY, c.max_preserved or 0)
        for s in stores:
            s.pin(c.residual_length + c.token_block, st.max_length, preserved)
        slots = {s.capture_slot for s in stores}
        if len(slots) != 1:
            raise RuntimeError("KVSinkCache: the layers' residual windows are out of step "
                               f"({sorted(slots)}); call cache.reset()")
        first = st.layers[0]
        if first.length_tensor is None or any(layer.length_tensor is not first.length_tensor
                                              for layer in st.layers):
            first.share_length(st.layers)
        b, dev = stores[0].batch_size, stores[0].device
        if self.buffers is None or self.buffers.batch != b or self.buffers.qpos.device != dev:
            channels = () if st.predictor is None else tuple(int(x) for x in st.predictor.channels)
            self.buffers = StepBuffers(b, dev, channels)
            self._bound = None

    def _bind(self, stores) -> None:
        """Point this cache's slots and :data:`SLOTS` at its tensors (marked static when new)."""
        tensors = [s.captured_tensors() for s in stores]
        changed = self._bound is None or any(a is not b for old, new in zip(self._bound, tensors)
                                             for a, b in zip(old, new))
        if changed:
            for name in StepBuffers.NAMES:
                setattr(self.slots.step, name, getattr(self.buffers, name))
            for layer, store, ts in zip(self.steps.layers, stores, tensors):
                slot = self.slots.layer(layer.layer_idx)
                for name, t in zip(CAPTURED_TENSORS, ts):
                    if t is not None:
                        torch._dynamo.mark_static_address(t)
                    setattr(slot, name, t)
                slot.layout = store.captured_layout()
            self._bound = tensors
        if changed or SLOTS.owner is not self:
            SLOTS.bind(self.slots)
            SLOTS.owner = self

    # ------------------------------------------------------------------ after the forward

    def finish(self, last_hidden: Optional[torch.Tensor]) -> None:
        """After a captured forward (forward hook): the statuses into the history (from the graph,
        or predicted here when the predictor reads the last hidden state), and every layer's
        window takes the step's token (``LayerCapture.note_appended``)."""
        st, buf = self.steps, self.buffers
        step = st.current
        if step.flags is None:
            if st.predictor is not None and st.predictor.layer < st.num_hidden_layers:
                st.history.append_status(buf.flags, buf.predicted, buf.valid_count, buf.preserved_count)
                step.flags = buf.flags
            else:
                st.predict_last(last_hidden)
        for layer in st.layers:
            layer.store.note_appended(step.flags, step.checks)
            layer.last_new = step.n
        st.layers[0].publish_length()

    def settle(self) -> None:
        """Record the graph's value flags of the captured steps since the last call in the open
        checks (read with them: at the next flush, ``check()``, or at once with ``eager_checks``)."""
        if not self.unsettled:
            return
        buf, checks = self.buffers, self.steps.checks
        checks.none_true(buf.bad_query.clone(), QUERY_MESSAGE)
        checks.none_true(buf.bad_hidden.clone(), HIDDEN_MESSAGE)
        buf.bad_query.zero_()
        buf.bad_hidden.zero_()
        self.unsettled = False

    def reset(self) -> None:
        """The cache was reset: nothing captured is pending (the buffers stay for the next)."""
        self.unsettled = False
        self._bound = None
        if SLOTS.owner is self:
            SLOTS.owner = None
