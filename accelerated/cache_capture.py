"""What a captured decode step needs of a streaming cache layer (docs/11-transformers.md §11.12).

A captured step is recorded once as a CUDA graph and replayed at every decode step, so the
tensors it reads must stay where they are and the launches it makes must not change between
steps (accelerated/hf/captured.py).  :class:`LayerCapture` is a base class of
:class:`accelerated.cache_layer.QuantizedKVCacheLayer` (it reads the layer's ``_dims``,
``_residual``, ``_preserved``, ``quantized`` and ``config``):

* :meth:`LayerCapture.pin` fixes the buffers: the residual window at the front of buffers of a
  fixed capacity that flushes keep (``ResidualWindow.pin``), the quantized store and the preserved
  store grown once to what the step may need;
* :meth:`LayerCapture.captured_tensors` are the tensors the step reads and writes, whole buffers
  (slots not held are masked: position -1, or not valid), so that the launch is the same at
  every step;
* :meth:`LayerCapture.note_appended` accounts, on the host, for the tokens the replayed step wrote
  into the window: they join it, their keys and values are recorded for the deferred slot checks
  (``DeferredChecks.finite_slots``), their statuses are set.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .cache_checks import NONFINITE_MESSAGE, DeferredChecks

__all__ = ["LayerCapture", "CAPTURED_TENSORS"]

#: The names of :meth:`LayerCapture.captured_tensors`, in order.
CAPTURED_TENSORS = ("keys", "values", "valid", "start", "key_words", "key_scale", "key_zero",
                    "value_words", "value_scale", "value_zero", "slot_positions",
                    "preserved_keys", "preserved_values", "preserved_positions")


class LayerCapture:
    """The captured decode step of :class:`accelerated.cache_layer.QuantizedKVCacheLayer` (its base)."""

    @property
    def capturable(self) -> bool:
        """Whether a captured step can read this layer: it holds tokens, in the uniform store that
        the fused decode kernel reads (not kvquant), without rotary positions."""
        return (self._dims is not None and self.quantized.fused_decode
                and self._residual.rope is None)

    @property
    def capture_slot(self) -> int:
        """The window buffer slot the next appended token takes."""
        return self._residual.end

    def pin(self, window: int, slots: int, preserved: int) -> None:
        """Fix the buffers a captured step reads: the residual window at the front of ``window``
        slots (kept there by later flushes), the quantized store room for ``slots`` slots and the
        preserved store for ``preserved`` tokens per row (each grows past that as before, which a
        captured step then sees as new buffers)."""
        self._residual.pin(window)
        self.quantized.reserve(slots)
        self._preserved.reserve(preserved)

    def captured_tensors(self) -> Tuple:
        """The tensors of :data:`CAPTURED_TENSORS`: the window's keys, values ``(B, H, W, D)``,
        validity ``(B, W)`` and start (int64 ``(1,)``), the packed store's words, scale, zero (None
        when symmetric) per side and slot positions ``(B, Qcap)``, the preserved store's keys,
        values ``(B, H, P + 1, D)`` and positions ``(B, P + 1)`` (whole buffers)."""
        res, pre, q = self._residual, self._preserved, self.quantized
        k, v = q.keys, q.values
        return (res.keys, res.values, res.valid, res.start_dev, k.words, k.scale, k.zero,
                v.words, v.scale, v.zero, q.slot_pos, pre.keys, pre.values, pre.positions)

    def captured_layout(self) -> Tuple[int, ...]:
        """``(key bits, key group, keys per channel, value bits, value group, values per channel,
        symmetric)``: what the captured step needs to read the packed words."""
        c = self.config
        return (c.key_bits, c.key_group_size, int(c.key_axis == "channel"), c.value_bits,
                c.value_group_size, int(c.value_axis == "channel"), int(c.scheme == "symmetric"))

    def note_appended(self, flags: torch.Tensor, checks: DeferredChecks) -> None:
        """The ``n`` tokens a captured step wrote after the window (keys, values, validity) join it
        with the statuses ``flags`` (bool ``(B, n)``, made by ``preserved_step``: padding never
        flagged); their finiteness is recorded in ``checks`` by slot, read from the window when
        the checks are (the eager update records it the same way)."""
        n = flags.shape[1]
        first = self.seq_length
        self._residual.claim(n)
        self._watch(checks)
        for side in ("keys", "values"):
            checks.finite_slots(self._residual, side, first, n, NONFINITE_MESSAGE[side])
        self._residual.resolve(flags)
