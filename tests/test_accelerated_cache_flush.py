"""accelerated/cache_flush.py: a flush of many layers reads the device once (issue 9).

The kernel path's reads are counted on CPU by standing in for the quantize kernel: the stand-in
quantizes through the torch path with its own reads hidden from the counter and returns the kernel's
device flag (zero, or set).  What is tested is the flush's structure: every value it needs (the
deferred checks, the preserved stores' sizes, the quantize flags) read in one transfer, whatever
the number of layers, and nothing changed when a check, a flag's exact check or a pending token
stops it.  The kernel's flag itself is tested against the exact checks in
tests/test_accelerated_ops.py (CUDA / Triton interpreter).
"""

from __future__ import annotations

import pytest
import torch

import accelerated.cache_store as cache_store
from accelerated.cache import DeferredChecks, QuantizedKVCache
from accelerated.cache_checks import read_values
from reference.config import KVSinkConfig
from tests.conftest import KERNEL_DEVICE, needs_cuda, needs_kernel

#: Tensor methods that read device data on the host (each a device->host sync on CUDA).
SYNC_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy",
                "nonzero")
CFG = KVSinkConfig(key_bits=2, value_bits=2, key_group_size=4, value_group_size=4, residual_length=4,
                   max_preserved=3)
B, H, D = 2, 2, 8


class Reads:
    """Counts host reads while ``on`` (the stand-in kernel turns it off for its torch path)."""

    def __init__(self, monkeypatch):
        self.n, self.on = 0, True
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)

            def counting(t, *args, _original=original, **kwargs):
                self.n += self.on
                return _original(t, *args, **kwargs)
            monkeypatch.setattr(torch.Tensor, name, counting)


def kernel_stand_in(monkeypatch, reads: Reads, flag: int = 0, overflow: bool = False):
    """Make the uniform store take the 'kernel path': quantize via the torch path (reads hidden)
    and return the device flag ``flag``; ``overflow``: the exact check behind the flag raises."""
    real = cache_store.quantize_packed_deferred

    def deferred(x, *args, **kwargs):
        reads.on = False
        try:                             # the kernel screens NaN/Inf into its flag, never raises
            finite = bool(torch.isfinite(x).all())
            pqt, _ = real(torch.nan_to_num(x), *args, use_kernel=False, **kwargs)
        finally:
            reads.on = True
        return pqt, torch.full((1,), flag or not finite, dtype=torch.int32, device=x.device)

    def exact(x, pqt):
        if overflow:
            raise ValueError("x: a group's range max - min overflows float32 (stand-in)")
    monkeypatch.setattr(cache_store, "quantize_packed_deferred", deferred)
    monkeypatch.setattr(cache_store, "quantize_defers_validation", lambda *a: True)
    monkeypatch.setattr(cache_store, "check_quantize_input", exact)


def filled(num_layers: int, n: int, *, checks=None, nan_layer=None, unresolved_layer=None,
           overflow_layer=None, device="cpu"):
    """A cache whose layers hold ``n`` tokens (their updates' checks recorded to ``checks``, or to
    ``checks[i]`` in layer ``i``), resolved (every third preserved) except in
    ``unresolved_layer``; ``nan_layer``: one NaN key there, at a token the next flush moves;
    ``overflow_layer``: a key group there whose max - min overflows float32."""
    g = torch.Generator().manual_seed(5)
    cache = QuantizedKVCache(CFG, num_layers, device=device)
    preserve = torch.zeros(B, n, dtype=torch.bool)
    preserve[:, ::3] = True
    for i, layer in enumerate(cache.layers):
        k, v = torch.randn(B, H, n, D, generator=g), torch.randn(B, H, n, D, generator=g)
        if i == nan_layer:
            k[1, 0, 2, 2] = float("nan")
        if i == overflow_layer:
            k[0, 1, 1, 3], k[0, 1, 2, 3] = 3e38, -3e38
        layer.update(k.to(device), v.to(device), checks=checks[i] if isinstance(checks, list) else checks)
        if i != unresolved_layer:
            layer.resolve(preserve.to(device))
    return cache


def snapshot(cache):
    return [(layer.num_quantized, layer.num_residual, [p.tolist() for p in layer.preserved_positions()])
            for layer in cache.layers]


@pytest.mark.parametrize("num_layers", [1, 3, 8])
def test_a_flush_of_every_layer_reads_once(monkeypatch, num_layers):
    """Kernel path: one host read for the whole flush, with the checks of the updates pending."""
    checks = DeferredChecks()
    cache = filled(num_layers, 13, checks=checks)
    reads = Reads(monkeypatch)
    kernel_stand_in(monkeypatch, reads)
    assert cache.flush() == 2 * num_layers           # 13 tokens, R = 4, blocks of 4: 8 due
    assert reads.n == 1
    monkeypatch.undo()
    assert checks.checked
    for layer in cache.layers:
        assert layer.num_quantized == 8 and layer.num_residual == 5
        assert [p.tolist() for p in layer.preserved_positions()] == [[0, 3, 6], [0, 3, 6]]


def test_a_flush_without_open_checks_reads_once(monkeypatch):
    cache = filled(4, 12)
    reads = Reads(monkeypatch)
    kernel_stand_in(monkeypatch, reads)
    assert cache.flush() == 8 and reads.n == 1


def test_a_layer_flush_matches_the_eager_path(monkeypatch):
    """The staged flush stores what the torch path stores (same words, scales, preserved tokens)."""
    eager, staged = filled(2, 17), filled(2, 17)
    eager.flush()
    kernel_stand_in(monkeypatch, Reads(monkeypatch))
    staged.flush()
    monkeypatch.undo()
    for a, b in zip(eager.layers, staged.layers):
        assert torch.equal(a.quantized_keys.words, b.quantized_keys.words)
        assert torch.equal(a.quantized_values.scale, b.quantized_values.scale)
        for x, y in zip(a.preserved, b.preserved):
            assert torch.equal(x, y)
        for x, y in zip(a.residual, b.residual):
            assert torch.equal(x, y)


def test_a_set_flag_whose_exact_check_passes_flushes(monkeypatch):
    """The kernel's screen may over-report: the exact checks then pass and the flush goes on."""
    cache = filled(3, 12)
    reads = Reads(monkeypatch)
    kernel_stand_in(monkeypatch, reads, flag=1)
    assert cache.flush() == 6 and reads.n == 1


def test_a_flag_whose_exact_check_fails_changes_no_layer(monkeypatch):
    cache = filled(3, 12)
    before = snapshot(cache)
    kernel_stand_in(monkeypatch, Reads(monkeypatch), flag=1, overflow=True)
    with pytest.raises(ValueError, match="overflows float32"):
        cache.flush()
    assert snapshot(cache) == before


def test_a_failed_deferred_check_changes_no_layer(monkeypatch):
    """NaN keys in the last layer: the flush of all layers raises the check's error (read with the
    sizes and flags) before any layer changes."""
    _flush_fails_in_one_read(monkeypatch, filled(3, 12, checks=DeferredChecks(), nan_layer=2))


def _flush_fails_in_one_read(monkeypatch, cache) -> None:
    """``cache.flush()`` raises the NaN keys' check error after one device read, no layer changed."""
    before = snapshot(cache)
    reads = Reads(monkeypatch)
    kernel_stand_in(monkeypatch, reads)
    with pytest.raises(ValueError, match="keys contains NaN or Inf"):
        cache.flush()
    assert reads.n == 1 and snapshot(cache) == before


def test_checks_of_many_objects_are_read_in_the_same_transfer(monkeypatch):
    """Each layer's updates recorded to their own DeferredChecks: still one read for the flush,
    every object read, the first failure in layer order raised and no layer changed."""
    per_layer = [DeferredChecks() for _ in range(3)]
    cache = filled(3, 12, checks=per_layer)
    reads = Reads(monkeypatch)
    kernel_stand_in(monkeypatch, reads)
    assert cache.flush() == 6 and reads.n == 1
    assert all(c.checked for c in per_layer)
    monkeypatch.undo()
    per_layer = [DeferredChecks() for _ in range(3)]
    _flush_fails_in_one_read(monkeypatch, filled(3, 12, checks=per_layer, nan_layer=1))
    assert all(c.checked for c in per_layer)


def test_a_failed_deferred_check_on_the_torch_path_precedes_quantization():
    """The torch path validates as it quantizes: the checks are read first, so the error is the
    check's (naming the keys), not the quantizer's."""
    checks = DeferredChecks()
    cache = filled(2, 12, checks=checks, nan_layer=1)
    before = snapshot(cache)
    with pytest.raises(ValueError, match="keys contains NaN or Inf"):
        cache.flush()
    assert snapshot(cache) == before


def test_a_pending_due_token_in_one_layer_changes_no_layer(monkeypatch):
    cache = filled(3, 12, unresolved_layer=2)
    before = snapshot(cache)
    kernel_stand_in(monkeypatch, Reads(monkeypatch))
    with pytest.raises(RuntimeError, match="resolve"):
        cache.flush()
    assert snapshot(cache) == before


def test_read_values_keeps_integers_and_non_finite_values():
    big = torch.tensor([2 ** 40 + 1], dtype=torch.int64)
    vals = read_values([big, torch.tensor([[1.5, float("nan")]]), torch.tensor(float("inf"),
                                                                                dtype=torch.bfloat16)])
    assert vals[0] == 2 ** 40 + 1 and vals[1] == 1.5 and vals[2] != vals[2] and vals[3] == float("inf")
    assert read_values([]) == []


@needs_kernel
def test_the_quantize_kernels_flush_equals_the_torch_path_and_raises_on_overflow():
    """The real kernel path (CUDA, or the Triton interpreter): the staged flush stores what the
    torch path stores; a key group whose float32 range overflows sets the kernel's flag, whose
    exact check raises the torch path's error with no layer changed."""
    eager, staged = filled(2, 17), filled(2, 17, device=KERNEL_DEVICE)
    assert staged.layers[0].quantized.defers_validation(staged.layers[0].residual[0])
    assert staged.flush() == eager.flush() == 6
    for a, b in zip(eager.layers, staged.layers):
        assert torch.equal(a.quantized_keys.words, b.quantized_keys.words.cpu())
        assert torch.equal(a.quantized_values.scale, b.quantized_values.scale.cpu())
        assert [p.tolist() for p in a.preserved_positions()] == \
            [p.cpu().tolist() for p in b.preserved_positions()]
    big = filled(3, 12, overflow_layer=2, device=KERNEL_DEVICE)
    before = snapshot(big)
    with pytest.raises(ValueError, match="overflows float32"):
        big.flush()
    assert snapshot(big) == before


@needs_cuda
def test_a_flush_of_every_layer_on_the_gpu_reads_once(monkeypatch):
    """On CUDA, the real kernels: one host read for the flush of 4 layers with open checks."""
    cache = filled(4, 12, checks=DeferredChecks(), device="cuda")
    reads = Reads(monkeypatch)
    assert cache.flush() == 8
    assert reads.n == 1
