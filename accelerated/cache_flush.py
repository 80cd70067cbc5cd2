"""A flush of one or many cache layers with one device->host read (accelerated only).

A layer's flush (definition 6.3) needs three things from the device before it may change the
layer: the deferred value checks of its updates (they must pass before anything is quantized into
the store: docs/11-transformers.md §11.3 "Validation"), the quantize kernels' validation flags
(non-zero: the exact checks run, and raise; ``accelerated.quantize.quantize_packed_deferred``) and
the preserved store's new size (its buffer grows to what it holds, on the host's word:
``PreservedStore.sizes``).  Read one after another, that is three synchronisations per layer, and a
decode step flushes every layer at once.  :func:`flush_layers` reads them all together:

1. plan (:meth:`QuantizedKVCacheLayer.plan_flush`): each layer's due tokens, the ones admitted to
   the preserved store and that store's sizes, on the device; nothing changes;
2. stage (:meth:`QuantizedStore.stage`): each store quantizes its due tokens into new tensors,
   still changing nothing, its validation left in device flags (the kernel path);
3. read: the checks, the sizes and the flags, one synchronisation per device
   (``accelerated.cache_checks.check_all``); a failed check raises here, no layer changed;
4. verify: the exact quantize checks of a layer whose flag is set (raise: no layer changed);
5. commit (:meth:`QuantizedKVCacheLayer.commit_flush`): every layer.

A store that validates as it quantizes (the torch path, the kvquant store: host reads of their
own) is staged after step 3, so that its tokens are checked before it sees them, as before.
"""

from __future__ import annotations

from typing import Iterator, List, Optional, Sequence

import torch

from .cache_checks import DeferredChecks, check_all, read_values

__all__ = ["FlushPlan", "flush_layers"]


class FlushPlan:
    """What one layer's flush will do, computed on the device before anything changes.

    ``layer``: the :class:`~accelerated.cache_layer.QuantizedKVCacheLayer`; ``m``: tokens due
    (whole blocks); ``checks``: the :class:`DeferredChecks` its updates recorded (read first);
    ``sizes``: int64 ``(2,)``, the preserved store's :meth:`~PreservedStore.sizes`; ``store_args``
    ``(start, keys, values, coded, rope)`` of :meth:`QuantizedStore.stage`; ``preserved_args``
    ``(positions, keys, values, admitted, n_new)`` of :meth:`PreservedStore.commit`; ``defers``: whether
    the store validates through device flags (:meth:`QuantizedStore.defers_validation`);
    ``staged``: the store's :class:`StagedBlocks` once :meth:`stage` ran.
    """

    __slots__ = ("layer", "m", "checks", "sizes", "store_args", "preserved_args", "defers", "staged")

    def __init__(self, layer, m: int, checks: List[DeferredChecks], sizes: torch.Tensor,
                 store_args: tuple, preserved_args: tuple, defers: bool):
        self.layer, self.m, self.checks, self.sizes = layer, m, checks, sizes
        self.store_args, self.preserved_args, self.defers = store_args, preserved_args, defers
        self.staged = None

    def stage(self) -> None:
        """Step 2: the store quantizes the due tokens (changing nothing)."""
        self.staged = self.layer.quantized.stage(*self.store_args)

    def reads(self) -> List[torch.Tensor]:
        """The device values this plan needs on the host: the sizes, then the staged flags."""
        return [self.sizes] + ([] if self.staged is None else self.staged.flags)


def _take(values: Iterator[float], n: int) -> List[float]:
    return [next(values) for _ in range(n)]


def flush_layers(layers: Sequence) -> int:
    """Flush ``layers`` (definition 6.3 each) reading the device once (module doc); returns the
    blocks flushed.  Raises (``RuntimeError`` for a pending due token, ``ValueError`` for a failed
    check) before any layer changes."""
    plans: List[FlushPlan] = []
    for layer in layers:
        plan: Optional[FlushPlan] = layer.plan_flush()
        if plan is not None:
            plans.append(plan)
    if not plans:
        return 0
    deferred = all(p.defers for p in plans)
    if deferred:
        for p in plans:
            p.stage()
    reads = [p.reads() for p in plans]
    values = iter(check_all([c for p in plans for c in p.checks], [t for r in reads for t in r]))
    sizes = []
    for p, r in zip(plans, reads):
        sizes.append([int(v) for v in _take(values, 2)])
        if deferred:
            p.staged.verify(_take(values, sum(t.numel() for t in r[1:])))
    if not deferred:
        for p in plans:                 # the checks passed: stores that validate as they go
            p.stage()
            p.staged.verify(read_values(p.staged.flags))
    for p, (need, added) in zip(plans, sizes):
        p.layer.commit_flush(p, need, added)
    return sum(p.m // p.layer.block for p in plans)
