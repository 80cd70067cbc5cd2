"""The per-forward state of a :class:`~accelerated.hf.KVSinkCache`: what one forward pass shares
between the hooks, the layers and the attention function (docs/11-transformers.md §11.3).

A forward with a ``KVSinkCache`` goes through these steps (the hooks of :mod:`accelerated.hf.hooks`
call them; :class:`StepState` holds them):

1. ``begin(attention_mask, position_ids)`` (base-model pre-hook): a fresh :class:`ForwardStep`.
2. ``begin_tokens`` (first layer update, or the predictor hook): the step's ``n`` new tokens, their
   validity (from the 2-D mask: padding is invalid) and, for kvquant, their rotary positions.
3. ``set_flags`` (once the predictor has read ``hidden_states[p]``, or at once without a predictor):
   the preservation status of the new tokens (``accelerated.preserve.preserved_set`` over the
   whole :class:`TokenHistory`); layers updated before that are resolved then.
4. ``flush_early`` (after a layer's attention, and for the layers resolved by ``set_flags``): in a
   step of at least ``token_block`` new tokens (a prefill or a chunk of one), a layer that has
   attended and whose tokens are resolved is flushed at once -- the deferred checks recorded so far
   read first -- so that one or a few layers hold the prompt at full precision at a time.
5. ``end`` (base-model forward hook): the deferred value checks are read (the one host
   synchronisation of a step that flushes nothing) and every layer is flushed.
   ``abandon`` (always-called hook) marks the cache broken if the forward raised after appending.

The stack of active caches (one per nested forward, per thread) lives here too: the attention
function of :mod:`accelerated.hf.attention` reads the innermost one.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, List, Optional

import torch

from reference.config import KVSinkConfig

__all__ = [
    "ForwardStep",
    "TokenHistory",
    "StepState",
    "rope_positions",
    "active_cache",
    "push_active",
    "pop_active",
]

_LOCAL = threading.local()


def active_cache():
    """The ``KVSinkCache`` of the innermost forward running in this thread (None: none or no cache)."""
    stack = getattr(_LOCAL, "stack", None)
    return stack[-1] if stack else None


def push_active(cache) -> None:
    """A forward begins with ``cache`` (or None: a forward without a ``KVSinkCache``)."""
    _LOCAL.__dict__.setdefault("stack", []).append(cache)


def pop_active():
    """The innermost forward ended: its cache (None if none was pushed)."""
    stack = getattr(_LOCAL, "stack", None)
    return stack.pop() if stack else None


class ForwardStep:
    """What one forward pass of the model with a ``KVSinkCache`` shares between hooks."""

    def __init__(self, mask2d: Optional[torch.Tensor], position_ids: Optional[torch.Tensor] = None):
        self.mask2d = mask2d
        self.position_ids = position_ids   # the forward's position_ids / cache_position (kvquant)
        self.n = None            # new tokens of the step
        self.valid = None        # bool (B, n)
        self.rope = None         # int (B, n): rotary positions of the new tokens (kvquant), or None
        self.flags = None        # bool (B, n): preservation status, once known
        self.waiting: List = []  # KVSinkLayers updated before the status was known
        self.qpos = {}           # device -> int64 (B, n): the slots of the step's tokens (queries)
        self.shared = {}         # visibility masks of the full-precision segments, shared by layers
        from ..cache import DeferredChecks
        self.checks = DeferredChecks()   # value checks of every layer, read at the end (and
        #                                  before each early flush of a prefill: flush_early)


def _cat(a: Optional[torch.Tensor], b: torch.Tensor) -> torch.Tensor:
    return b.clone() if a is None else torch.cat([a, b], dim=1)


@dataclass
class TokenHistory:
    """bool ``(B, T)`` per slot seen so far, the same for every kvsink layer (None before any)."""

    valid: Optional[torch.Tensor] = None       # False for padding slots
    predicted: Optional[torch.Tensor] = None   # the KVSink predictor's output (kvsink only)
    flags: Optional[torch.Tensor] = None       # the preservation status

    @property
    def length(self) -> int:
        return 0 if self.valid is None else self.valid.shape[1]

    def transform(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply ``fn`` to every history held (reorder, select, repeat, crop the batch or slots)."""
        self.valid, self.predicted, self.flags = (
            None if h is None else fn(h) for h in (self.valid, self.predicted, self.flags))

    def clear(self) -> None:
        self.valid = self.predicted = self.flags = None


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
    return mask2d.bool()


class StepState:
    """The forward steps of one ``KVSinkCache``: the current :class:`ForwardStep`, the
    :class:`TokenHistory` and whether a failed forward left the cache unusable (``broken``).

    ``layers``: the cache's ``KVSinkLayer`` objects; ``predictor``: a
    ``reference.predictor.SinkPredictor`` or None; ``num_hidden_layers``: the model's.
    """

    def __init__(self, config: KVSinkConfig, predictor, layers: list, num_hidden_layers: int):
        self.config = config
        self.predictor = predictor
        self.layers = layers
        self.num_hidden_layers = num_hidden_layers
        self.current: Optional[ForwardStep] = None
        self.history = TokenHistory()
        #: set when a forward that appended tokens raised (or failed its deferred checks): the
        #: layers may hold unresolved or unchecked tokens, so the next forward raises until reset()
        self.broken = False

    def reset(self) -> None:
        self.current = None
        self.history.clear()
        self.broken = False

    def begin(self, mask2d, position_ids=None) -> None:
        """A forward with this cache begins (base-model pre-hook)."""
        if self.current is not None or self.broken or any(l.has_pending() for l in self.layers):
            raise RuntimeError("KVSinkCache: the previous forward pass did not finish (an exception, "
                               "e.g. NaN/Inf keys, values or queries), so some tokens were never "
                               "resolved or checked; call cache.reset() to start over")
        mask2d = _check_mask2d(mask2d)
        if self.config.quantizer != "kvquant":
            position_ids = None
        self.current = ForwardStep(mask2d, position_ids)

    def _new_valid(self, step: ForwardStep, n: int, batch: int, device) -> torch.Tensor:
        """bool ``(B, n)``: the validity of the step's new tokens (from the 2-D mask)."""
        past = self.history.length
        if self.history.valid is not None and self.history.valid.shape[0] != batch:
            raise ValueError(f"KVSinkCache holds a batch of {self.history.valid.shape[0]} sequences, "
                             f"the forward has {batch}")
        if step.mask2d is None:
            return torch.ones(batch, n, dtype=torch.bool, device=device)
        if step.mask2d.shape != (batch, past + n):
            raise ValueError(
                f"attention_mask has shape {tuple(step.mask2d.shape)}; with {past} cached and {n} "
                f"new tokens it must be ({batch}, {past + n}) (cached + new slots)")
        return step.mask2d[:, past:].to(device)

    def begin_tokens(self, n: int, batch: int, device) -> None:
        """First sight of the step's tokens (first layer update, or the predictor hook)."""
        step = self.current
        if step.n is not None:
            if step.n != n:
                raise RuntimeError(f"KVSinkCache: a layer received {n} new tokens, another {step.n} "
                                   "in the same forward")
            return
        valid = self._new_valid(step, n, batch, device)
        step.n, step.valid = n, valid
        if self.config.quantizer == "kvquant":
            step.rope = rope_positions(step.position_ids, batch, n, device)
        home = device if self.history.valid is None else self.history.valid.device
        self.history.valid = _cat(self.history.valid, valid.to(home))
        if self.predictor is None:
            self.set_flags(None)

    def set_flags(self, predicted: Optional[torch.Tensor]) -> None:
        """The preservation status of the step's tokens is known: record it, resolve waiting layers."""
        from ..preserve import preserved_set
        step, hist = self.current, self.history
        if predicted is not None:
            hist.predicted = _cat(hist.predicted, predicted.to(hist.valid.device))
        flags = preserved_set(self.config, hist.valid, predicted=hist.predicted)
        if flags.shape != hist.valid.shape:
            raise RuntimeError(f"preserved_set returned shape {tuple(flags.shape)}, expected "
                               f"{tuple(hist.valid.shape)}")
        n = step.n
        step.flags = flags[:, -n:] if n else flags[:, :0]
        prev = 0 if hist.flags is None else hist.flags.shape[1]
        if prev + n != flags.shape[1]:
            raise RuntimeError("KVSinkCache: preservation history out of step")
        hist.flags = flags
        waiting, step.waiting = step.waiting, []
        for layer in waiting:
            layer.resolve(step.flags, step.checks)
        self.flush_early(waiting)       # they have attended already (layers before the predictor's)

    def update_layer(self, layer, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        """Append the step's tokens to ``layer`` and resolve them when their status is known."""
        step = self.current
        self.begin_tokens(key_states.shape[-2], key_states.shape[0], key_states.device)
        layer.update(key_states, value_states, valid=step.valid, rope_positions=step.rope,
                     checks=step.checks)
        if step.flags is not None:
            layer.resolve(step.flags, step.checks)
        else:
            step.waiting.append(layer)

    def flush_early(self, layers: list) -> None:
        """Flush ``layers`` now -- each has attended the step's tokens, which are resolved -- when
        the step brought at least ``token_block`` tokens (a decode step keeps the flush for
        ``end``: one read of the checks for every layer).  The checks recorded so far are read
        first (one device->host read; a layer never quantizes unchecked tokens) and the step
        records the next ones in a fresh ``DeferredChecks``.  The layers' contents are those the
        flush at ``end`` would give: nothing reaches a layer after its attention."""
        step = self.current
        if step is None or step.n is None or step.n < self.config.token_block or step.flags is None:
            return
        due = [layer for layer in layers if layer.num_due()]
        if not due:
            return
        from ..cache import DeferredChecks
        step.checks.check()
        step.checks = DeferredChecks()
        for layer in due:
            layer.flush()

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
        self.begin_tokens(hidden.shape[1], hidden.shape[0], hidden.device)
        self.set_flags(self._predict(hidden))

    def _finish(self, last_hidden: Optional[torch.Tensor]) -> None:
        step = self.current
        if step.flags is None:
            if self.predictor is not None and self.predictor.layer == self.num_hidden_layers \
                    and last_hidden is not None:
                self.set_flags(self._predict(last_hidden))
            else:
                raise RuntimeError("KVSinkCache: the forward ended before the predictor ran")
        step.checks.check()           # ValueError naming the argument (keys, values, query, ...)
        for layer in self.layers:
            layer.flush()

    def end(self, last_hidden: Optional[torch.Tensor]) -> None:
        """End of the forward: read the step's deferred checks (the one device->host
        synchronisation of a step that flushes nothing), resolve what is left, flush every
        layer.  If anything raises, the step is abandoned and the cache refuses further
        forwards until ``reset()``."""
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

    def abandon(self) -> None:
        """The forward raised before its end (cleanup hook): a step that appended tokens leaves
        the cache unusable until ``reset()``."""
        step = self.current
        self.current = None
        if step is not None and step.n is not None:
            self.broken = True

