"""The per-forward state of a :class:`~accelerated.hf.KVSinkCache`: what one forward pass shares
between the hooks, the layers and the attention function (docs/11-transformers.md §11.3).

A forward with a ``KVSinkCache`` goes through these steps (the hooks of :mod:`accelerated.hf.hooks`
call them; :class:`StepState` holds them):

1. ``begin(attention_mask, position_ids)`` (base-model pre-hook): a fresh :class:`ForwardStep`.
2. ``begin_tokens`` (first layer update, or the predictor hook): the step's ``n`` new tokens, their
   validity (from the new columns of the 2-D mask: padding is invalid) and, for kvquant, their
   rotary positions; the validity is written in place into the :class:`TokenHistory`'s buffers.
3. ``set_flags`` (once the predictor has read ``hidden_states[p]``, or at once without a predictor):
   the preservation status of the new tokens (``accelerated.preserve.preserved_step`` from the
   history's per-row counts, kept on the device: a fixed number of operations whatever the
   history's length); layers updated before that are resolved then.
4. ``end`` (base-model forward hook): every layer is flushed at once
   (``accelerated.cache_flush.flush_layers``): if any quantizes a block, one device->host
   synchronisation reads the deferred value checks of all the steps since the last flush with
   every layer's quantize flags and preserved-store sizes, before any layer changes.  A step that
   flushes nothing reads nothing from the device; its checks stay in the cache's open
   :class:`~accelerated.cache.DeferredChecks` (``eager_checks=True``: read at every ``end``;
   :meth:`StepState.read_checks`: at once, e.g. before a crop).
   ``flush_early`` (after a layer's attention, and for the layers resolved by ``set_flags``): in a
   step of at least ``token_block`` new tokens (a prefill or a chunk of one), a layer that has
   attended and whose tokens are resolved is flushed at once (reading the checks first, as any
   flush that quantizes does), so that one or a few layers hold the prompt at full precision.
   ``abandon`` (always-called hook) marks the cache broken if the forward raised after appending.

A captured decode step (``max_length`` given, one token per row on CUDA:
:mod:`accelerated.hf.captured`, docs/11 §11.12) takes steps 2 and 3 in ``begin`` (its token's
validity and position into device buffers the traced graph reads), does its cache work inside
the forward's graph, and its host accounting in ``end`` before the flush of step 4.

The stack of active caches (one per nested forward, per thread) lives here too: the attention
function of :mod:`accelerated.hf.attention` reads the innermost one.
"""

from __future__ import annotations

import threading
from typing import Callable, List, Optional

import torch

from reference.config import KVSinkConfig

from ..cache_flush import flush_layers

__all__ = [
    "ForwardStep",
    "TokenHistory",
    "StepState",
    "rope_positions",
    "active_cache",
    "push_active",
    "pop_active",
    "compiled_view",
    "refresh_view",
]

_LOCAL = threading.local()

#: What a forward traced by torch.compile needs to know of the innermost active cache, as plain
#: constants dynamo can guard on (it cannot read the thread-local stack): None (no KVSinkCache), or
#: ``(has_full_precision_layers, predictor_layer or -1, capture)``, ``capture`` None or, for a
#: captured step, ``accelerated.hf.captured.capture_spec``.  Set by :func:`push_active` /
#: :func:`pop_active` / :func:`refresh_view` (the hooks, which run outside the compiled graphs:
#: accelerated/hf/compiled.py, accelerated/hf/captured.py).
#: One per process, unlike the stack: compiled forwards in several threads at once must use caches of
#: the same view (docs/11 §11.11).
_COMPILED_VIEW = None


def compiled_view():
    """``None`` or ``(has_full_precision_layers, predictor_layer, capture)`` of the innermost active
    ``KVSinkCache`` (``predictor_layer`` -1 without a predictor; ``capture`` the captured step's
    constants or None): read by the traced code of :mod:`accelerated.hf.compiled` and
    :mod:`accelerated.hf.captured`; a change between forwards makes dynamo recompile."""
    return _COMPILED_VIEW


def _set_view(stack) -> None:
    global _COMPILED_VIEW
    cache = stack[-1] if stack else None
    if cache is None:
        _COMPILED_VIEW = None
    else:
        p, step = cache.predictor, cache.steps.current
        capture = cache.steps.capture_spec if step is not None and step.captured else None
        _COMPILED_VIEW = (bool(cache.has_full_precision_layers), -1 if p is None else int(p.layer),
                          capture)


def refresh_view() -> None:
    """Recompute :func:`compiled_view` once the innermost forward's step has begun (whether it is
    captured is known then)."""
    _set_view(getattr(_LOCAL, "stack", None))


def active_cache():
    """The ``KVSinkCache`` of the innermost forward running in this thread (None: none or no cache)."""
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


def push_active(cache) -> None:
    """A forward begins with ``cache`` (or None: a forward without a ``KVSinkCache``)."""
    stack = _LOCAL.__dict__.setdefault("stack", [])
    stack.append(cache)
    _set_view(stack)


def pop_active():
    """The innermost forward ended: its cache (None if none was pushed)."""
    stack = getattr(_LOCAL, "stack", None)
    cache = stack.pop() if stack else None
    _set_view(stack)
    return cache


class ForwardStep:
    """What one forward pass of the model with a ``KVSinkCache`` shares between hooks."""

    def __init__(self, mask2d: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None,
                 checks=None):
        self.mask2d = mask2d
        self.position_ids = position_ids   # the forward's position_ids / cache_position (kvquant)
        self.n = None            # new tokens of the step
        self.valid = None        # bool (B, n)
        self.rope = None         # int (B, n): rotary positions of the new tokens (kvquant), or None
        self.flags = None        # bool (B, n): preservation status, once known
        self.waiting: List = []  # KVSinkLayers updated before the status was known
        self.qpos = {}           # device -> int64 (B, n): the slots of the step's tokens (queries)
        self.shared = {}         # visibility masks of the full-precision segments, shared by layers
        #: the value checks of every layer (an ``accelerated.cache.DeferredChecks``): the cache's
        #: open one, gathering the steps' checks until a flush (or ``eager_checks``) reads them
        self.checks = checks
        #: whether the step is captured (accelerated/hf/captured.py: one token per row, its cache
        #: work in the traced graph, its accounting in :meth:`StepState.end`)
        self.captured = False


class TokenHistory:
    """bool ``(B, T)`` per slot seen so far, the same for every kvsink layer (None before any),
    held in buffers with spare capacity that each step appends to in place (no copy of the
    history: amortised O(new tokens) per step), and the per-row counts the streaming preserved
    set needs (``accelerated.preserve.preserved_step``), kept on the device.

    ``valid`` covers the ``length`` slots seen; ``predicted`` and ``flags`` the ``resolved`` ones
    (``length`` once the step's statuses are known); ``valid_count`` / ``preserved_count``: int64
    ``(B,)``, the valid / preserved slots among the resolved ones.
    """

    _NAMES = ("valid", "predicted", "flags")

    def __init__(self):
        self.clear()

    def clear(self) -> None:
        self._buffers = {name: None for name in self._NAMES}   # bool (B, capacity) or None
        self.length = self.resolved = 0
        self.valid_count = self.preserved_count = None

    def _view(self, name: str, n: int) -> Optional[torch.Tensor]:
        buf = self._buffers[name]
        return None if buf is None else buf[:, :n]

    @property
    def valid(self) -> Optional[torch.Tensor]:
        """bool ``(B, length)``: False for padding slots."""
        return self._view("valid", self.length)

    @property
    def predicted(self) -> Optional[torch.Tensor]:
        """bool ``(B, resolved)``: the KVSink predictor's output (None without one)."""
        return self._view("predicted", self.resolved)

    @property
    def flags(self) -> Optional[torch.Tensor]:
        """bool ``(B, resolved)``: the preservation status."""
        return self._view("flags", self.resolved)

    @property
    def device(self):
        buf = self._buffers["valid"]
        return None if buf is None else buf.device

    def _write(self, name: str, at: int, x: torch.Tensor) -> None:
        """``x`` (bool ``(B, n)``) into buffer ``name`` at slots ``at .. at + n - 1``, the buffer
        grown x1.5 (amortised) when full."""
        buf, n = self._buffers[name], x.shape[1]
        if buf is None or at + n > buf.shape[1]:
            cap = max(at + n, 0 if buf is None else buf.shape[1] * 3 // 2, 16)
            new = torch.zeros((x.shape[0], cap), dtype=torch.bool, device=x.device if buf is None
                              else buf.device)
            if buf is not None and at:
                new[:, :at].copy_(buf[:, :at])
            self._buffers[name] = buf = new
        buf[:, at:at + n].copy_(x)

    def append_valid(self, valid: torch.Tensor) -> None:
        """The validity of the step's new slots (bool ``(B, n)``)."""
        self._write("valid", self.length, valid)
        self.length += valid.shape[1]

    def append_status(self, flags: torch.Tensor, predicted: Optional[torch.Tensor],
                      valid_count: torch.Tensor, preserved_count: torch.Tensor) -> None:
        """The statuses (and prediction) of the slots appended since the last call, with the counts
        after them (:func:`accelerated.preserve.preserved_step`)."""
        if self.resolved + flags.shape[1] != self.length:
            raise RuntimeError("KVSinkCache: preservation history out of step")
        if predicted is not None:
            self._write("predicted", self.resolved, predicted)
        self._write("flags", self.resolved, flags)
        self.resolved = self.length
        self.valid_count, self.preserved_count = valid_count, preserved_count

    def counts(self, batch: int, device):
        """``(valid_count, preserved_count)`` before the step's tokens (zeros before any)."""
        if self.valid_count is None:
            zero = torch.zeros(batch, dtype=torch.int64, device=device)
            return zero, zero
        return self.valid_count, self.preserved_count

    def transform(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every history held (reorder, select, repeat, crop the batch or slots);
        the counts are recounted from the result (these calls are not per-step work)."""
        views = {"valid": self.valid, "predicted": self.predicted, "flags": self.flags}
        self._buffers = {k: None if v is None else fn(v).contiguous() for k, v in views.items()}
        valid, flags = self._buffers["valid"], self._buffers["flags"]
        self.length = 0 if valid is None else valid.shape[1]
        self.resolved = 0 if flags is None else flags.shape[1]
        if flags is None:
            self.valid_count = self.preserved_count = None
        else:
            self.valid_count = valid[:, :self.resolved].sum(dim=1)
            self.preserved_count = flags.sum(dim=1)


def _new_checks():
    from ..cache import DeferredChecks
    return DeferredChecks()


def rope_positions(position_ids, batch: int, n: int, device) -> Optional[torch.Tensor]:
    """int64 ``(B, n)`` rotary positions of the step's tokens from the forward's ``position_ids``
    (``(B, n)`` or ``(1, n)``) or ``cache_position`` (``(n,)``); None = the slot positions (what the
    model computes itself when it receives neither)."""
    if position_ids is None:
        return None
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype.is_floating_point:
        raise TypeError(f"position_ids must be an integer tensor, got {type(position_ids).__name__}")
    p = position_ids
    if p.dim() == 1:
        p = p[None]
    if p.dim() != 2 or p.shape[-1] != n or p.shape[0] not in (1, batch):
        raise ValueError(f"KVSinkCache (quantizer='kvquant') needs position_ids of shape (B, n) = "
                         f"({batch}, {n}) or (1, {n}) to know each token's rotary position, got "
                         f"{tuple(position_ids.shape)} (multi-axis rotary positions are not supported)")
    return p.to(device=device, dtype=torch.int64).expand(batch, n)


def _check_mask2d(mask2d) -> Optional[torch.Tensor]:
    if mask2d is None:
        return None
    if not isinstance(mask2d, torch.Tensor) or mask2d.dim() != 2:
        shape = getattr(mask2d, "shape", None)
        raise ValueError(
            f"KVSinkCache needs a 2-D attention_mask (batch, past + new tokens) with 1 for "
            f"real tokens and 0 for padding, got shape {shape}; pass the tokenizer's mask")
    return mask2d                 # converted to bool per step, on the new columns only


class StepState:
    """The forward steps of one ``KVSinkCache``: the current :class:`ForwardStep`, the
    :class:`TokenHistory` and whether a failed forward left the cache unusable (``broken``).

    ``layers``: the cache's ``KVSinkLayer`` objects; ``predictor``: a
    ``reference.predictor.SinkPredictor`` or None; ``num_hidden_layers``: the model's;
    ``max_length``: None, or the most slots the cache may hold (``KVSinkCache(max_cache_len=)``).
    """

    def __init__(self, config: KVSinkConfig, predictor, layers: list, num_hidden_layers: int,
                 eager_checks: bool = False, max_length: Optional[int] = None,
                 query_heads: Optional[int] = None):
        from .captured import CapturedSteps, capture_spec
        self.config = config
        self.max_length = max_length
        self.eager_checks = eager_checks
        self.predictor = predictor
        self.layers = layers
        self.num_hidden_layers = num_hidden_layers
        self.current: Optional[ForwardStep] = None
        self.history = TokenHistory()
        #: set when a forward that appended tokens raised (or failed its deferred checks): the
        #: layers may hold unresolved or unchecked tokens, so the next forward raises until reset()
        self.broken = False
        self.checks = _new_checks()
        #: the captured decode steps (``max_length`` given; accelerated/hf/captured.py)
        self.captured = CapturedSteps(self, query_heads)
        self.capture_spec = capture_spec(config, predictor, num_hidden_layers)

    def reset(self) -> None:
        self.current = None
        self.history.clear()
        self.broken = False
        self.checks = _new_checks()
        self.captured.reset()

    def begin(self, mask2d, position_ids=None, tokens=None) -> None:
        """A forward with this cache begins (base-model pre-hook); ``tokens``: ``(batch, n)`` of its
        input when known, which decides whether the step is captured (``self.captured.begin``)."""
        if self.current is not None or self.broken or any(l.has_pending() for l in self.layers):
            raise RuntimeError("KVSinkCache: the previous forward pass did not finish (an exception, "
                               "e.g. NaN/Inf keys, values or queries), so some tokens were never "
                               "resolved or checked; call cache.reset() to start over")
        mask2d = _check_mask2d(mask2d)
        if self.config.quantizer != "kvquant":
            position_ids = None
        self.current = ForwardStep(mask2d, position_ids, self.checks)
        try:
            self.current.captured = self.captured.begin(tokens)
        except BaseException:
            if self.current.n is not None:    # the history took the step's tokens: out of step
                self.broken = True
            self.current = None
            raise

    def _new_valid(self, step: ForwardStep, n: int, batch: int, device) -> torch.Tensor:
        """bool ``(B, n)``: the validity of the step's new tokens (from the 2-D mask)."""
        past = self.history.length
        held = self.history.valid
        if held is not None and held.shape[0] != batch:
            raise ValueError(f"KVSinkCache holds a batch of {held.shape[0]} sequences, "
                             f"the forward has {batch}")
        if step.mask2d is None:
            return torch.ones(batch, n, dtype=torch.bool, device=device)
        if step.mask2d.shape != (batch, past + n):
            raise ValueError(
                f"attention_mask has shape {tuple(step.mask2d.shape)}; with {past} cached and {n} "
                f"new tokens it must be ({batch}, {past + n}) (cached + new slots)")
        return step.mask2d[:, past:].to(device=device, dtype=torch.bool)

    def begin_tokens(self, n: int, batch: int, device) -> None:
        """First sight of the step's tokens (first layer update, or the predictor hook)."""
        step = self.current
        if step.n is not None:
            if step.n != n:
                raise RuntimeError(f"KVSinkCache: a layer received {n} new tokens, another {step.n} "
                                   "in the same forward")
            return
        if self.max_length is not None and self.history.length + n > self.max_length:
            raise ValueError(f"KVSinkCache(max_cache_len={self.max_length}) holds "
                             f"{self.history.length} tokens and cannot take {n} more; build the "
                             f"cache with a larger max_cache_len (at least prompt + max_new_tokens)")
        valid = self._new_valid(step, n, batch, device)
        step.n, step.valid = n, valid
        if self.config.quantizer == "kvquant":
            step.rope = rope_positions(step.position_ids, batch, n, device)
        home = self.history.device or device
        self.history.append_valid(valid.to(home))
        if self.predictor is None:
            self.set_flags(None)

    def set_flags(self, predicted: Optional[torch.Tensor]) -> None:
        """The preservation status of the step's tokens is known: record it, resolve waiting layers.

        ``preserved_step`` (Proposition 3.7) from the history's per-row counts: a fixed number of
        operations on the step's tokens, whatever the history's length; no synchronisation."""
        from ..preserve import preserved_step
        step, hist = self.current, self.history
        valid = step.valid.to(hist.device)
        if predicted is not None:
            predicted = predicted.to(hist.device)
        before = hist.counts(valid.shape[0], hist.device)
        flags, valid_count, preserved_count = preserved_step(self.config, valid, *before,
                                                             predicted=predicted)
        hist.append_status(flags, predicted, valid_count, preserved_count)
        step.flags = flags
        waiting, step.waiting = step.waiting, []
        for layer in waiting:
            self._resolve(layer)
        self.flush_early(waiting)       # they have attended already (layers before the predictor's)

    def _resolve(self, layer) -> None:
        """Resolve ``layer``'s pending tokens with the step's flags (padding never flagged:
        ``preserved_step`` ANDs the validity, so the layer skips that test)."""
        layer.resolve(self.current.flags, self.current.checks, excludes_padding=True)

    def update_layer(self, layer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append the step's tokens to ``layer`` and resolve them when their status is known."""
        step = self.current
        self.begin_tokens(key_states.shape[-2], key_states.shape[0], key_states.device)
        self._renew_checks()          # read by a flush earlier in this forward: record in a new one
        layer.update(key_states, value_states, valid=step.valid, rope_positions=step.rope,
                     checks=step.checks)
        if step.flags is not None:
            self._resolve(layer)
        else:
            step.waiting.append(layer)

    def flush_early(self, layers: list) -> None:
        """Flush ``layers`` now -- each has attended the step's tokens, which are resolved -- when
        the step brought at least ``token_block`` tokens (a decode step keeps the flush for
        ``end``).  A layer that quantizes reads the open checks with its own values (one
        device->host read; a layer never stores unchecked tokens) and the layers after it record
        theirs in a fresh ``DeferredChecks`` (``_renew_checks``).  The layers' contents are those
        the flush at ``end`` would give: nothing reaches a layer after its attention."""
        step = self.current
        if step is None or step.n is None or step.n < self.config.token_block or step.flags is None:
            return
        for layer in layers:
            if layer.num_due():
                layer.flush()
        self._renew_checks()

    def query_positions(self, query: torch.Tensor) -> Optional[torch.Tensor]:
        """int64 ``(B, n)``: the slots of the step's ``n`` tokens, the attention's query positions;
        made once per forward (per device) and shared by every layer."""
        step = self.current
        if step is None or step.n is None or query.shape[-2] != step.n:
            return None
        pos = step.qpos.get(query.device)
        if pos is None:
            end = self.history.length
            pos = torch.arange(end - step.n, end, device=query.device).expand(query.shape[0], step.n)
            pos = pos.contiguous()        # the attention kernel reads it contiguous
            step.qpos[query.device] = pos
        return pos

    def _predict(self, hidden: torch.Tensor) -> torch.Tensor:
        from ..predictor import predict_sinks
        p = self.predictor
        return predict_sinks(hidden, p.channels, p.threshold, checks=self.current.checks)

    def on_predictor_input(self, hidden: torch.Tensor) -> None:
        """The predictor layer's input ``hidden_states[p]`` (B, n, C) is here (decoder-layer pre-hook)."""
        step = self.current
        if step is None or step.flags is not None:
            return
        if step.captured:
            from .captured import captured_layer_input
            captured_layer_input(hidden, self.capture_spec)
            return
        self.begin_tokens(hidden.shape[1], hidden.shape[0], hidden.device)
        self.set_flags(self._predict(hidden))

    def predict_last(self, last_hidden: Optional[torch.Tensor]) -> None:
        """The step's statuses from the last hidden state (a predictor after the last layer)."""
        if self.predictor is not None and self.predictor.layer == self.num_hidden_layers \
                and last_hidden is not None:
            self.set_flags(self._predict(last_hidden))
        else:
            raise RuntimeError("KVSinkCache: the forward ended before the predictor ran")

    def _finish(self, last_hidden: Optional[torch.Tensor]) -> None:
        step = self.current
        if step.captured:
            self.captured.finish(last_hidden)
        elif step.flags is None:
            self.predict_last(last_hidden)
        if self.eager_checks or any(layer.num_due() for layer in self.layers):
            self.captured.settle()    # the graph's flags join the checks read now
        self._check_or_defer()
        # every layer at once: one device->host read (the open checks, the quantize kernels' flags,
        # the preserved stores' sizes) for a step that flushes, none for one that does not
        flush_layers([layer.store for layer in self.layers if layer.store is not None])
        self._renew_checks()

    def _check_or_defer(self) -> None:
        """Read the open checks now with ``eager_checks``; else fold the step's into one tensor
        per device (one operation) and leave them for the next flush (docs/11 §11.3)."""
        if self.eager_checks:
            self.checks.check()       # ValueError naming the argument (keys, values, query, ...)
        else:
            self.checks.pack()

    def _renew_checks(self) -> None:
        """A fresh open ``DeferredChecks`` once the current one has been read (also for the rest
        of the current forward, should a layer have flushed, and so read them, during it)."""
        if self.checks.checked:
            self.checks = _new_checks()
            if self.current is not None:
                self.current.checks = self.checks

    def end(self, last_hidden: Optional[torch.Tensor]) -> None:
        """End of the forward: resolve what is left, read the deferred checks if this step
        flushes (or with ``eager_checks``), flush every layer.  A step that flushes nothing
        reads nothing from the device.  If anything raises, the step is abandoned and the cache
        refuses further forwards until ``reset()``."""
        step = self.current
        done = False
        try:
            if step is not None and step.n is not None:
                self._finish(last_hidden)
            done = True
        finally:
            self.current = None
            if not done:
                self.broken = True

    def read_checks(self) -> None:
        """Read the value checks of the steps since the last flush now (one synchronisation);
        a failure raises their ``ValueError`` and leaves the cache refusing forwards until
        ``reset()`` (it holds the offending tokens)."""
        if self.current is not None:
            raise RuntimeError("KVSinkCache: the checks are read between forwards, not during one")
        self.captured.settle()
        try:
            self.checks.check()
        except ValueError:
            self.broken = True
            raise
        self._renew_checks()

    def abandon(self) -> None:
        """The forward raised before its end (cleanup hook): a step that appended tokens leaves
        the cache unusable until ``reset()``."""
        step = self.current
        self.current = None
        if step is not None and step.n is not None:
            self.broken = True

