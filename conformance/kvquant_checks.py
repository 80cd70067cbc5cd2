"""Checks of a kvquant cache's state against the reference's, shared by the state machine
(test_kvquant_cache.py) and the golden vectors (test_vectors.py).

The rules are those of ``tolerances.py`` (docs/08-kvquant.md §8.11, docs/09-tolerances.md
§9.6); this module only applies them to a cache's blocks, segments and byte count.  The
reference side of a block is given as ``reference.kvquant.KVQuantTensor`` objects (the
reference cache's own, or rebuilt from vector arrays) plus the arrays the reference
quantized.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from reference import kvquant as rkv

from . import tolerances as tol
from .impls import ReferenceCache


class ReferenceKVQuantCache(ReferenceCache):
    """The reference kvquant cache that also keeps, per block (aligned with ``layer.blocks``),
    the stored keys and values it quantized and the reference's pre-RoPE keys:
    ``inputs[i] = (keys, values, keys_pre_rope)`` float32 ``(B, H, n, D)``."""

    def __init__(self, config, dtype, **kw):
        super().__init__(config, dtype, **kw)
        self.inputs = []

    def flush(self):
        layer = self.layer
        if layer.batch_size is None:
            layer.flush()
            return
        rk, rv = (np.asarray(a, np.float32) for a in layer.residual[:2])
        rope = layer.residual_rope_positions.copy()
        before = len(layer.blocks)
        layer.flush()                          # raises (and changes nothing) if a token is pending
        n = self.layer.config.token_block
        inv = layer.rope_inv_freq
        for j in range(len(layer.blocks) - before):
            k, v = rk[:, :, j * n:(j + 1) * n], rv[:, :, j * n:(j + 1) * n]
            pre = k if inv is None else rkv.unapply_rope(k, rope[:, None, j * n:(j + 1) * n], inv)
            self.inputs.append((k, v, pre))

    def crop(self, max_length):
        super().crop(max_length)
        del self.inputs[len(self.layer.blocks):]

    def _rows(self, idx):
        idx = np.asarray(idx)
        self.inputs = [tuple(a[idx] for a in rec) for rec in self.inputs]

    def reorder(self, beam_idx):
        super().reorder(beam_idx)
        self._rows(beam_idx)

    def select_batch(self, indices):
        super().select_batch(indices)
        self._rows(indices)

    def reset(self):
        super().reset()
        self.inputs = []


def check_kvquant_block(got, want_keys, want_values, *, start: int, num_slots: int, coded,
                        rope_positions, keys, values, keys_pre_rope, calibration,
                        inv_freq: Optional[np.ndarray], what: str) -> None:
    """One block of the port (``adapter.KVQuantCacheBlock``) against the reference's.

    want_keys, want_values : ``reference.kvquant.KVQuantTensor`` of the block (keys pre-RoPE).
    start, num_slots, coded, rope_positions : the reference block's.
    keys, values : float32 ``(B, H, n, D)``, the stored keys (post-RoPE when ``inv_freq`` is
        given) and values the reference quantized; ``keys_pre_rope`` the reference's
        un-rotated keys (``keys`` itself without RoPE).
    calibration : the layer's ``reference.kvquant.KVQuantCalibration``.

    Exact: start, num_slots, coded, rotary positions.  Values, and keys without RoPE:
    docs/08-kvquant.md §8.11 (same input).  Keys with RoPE: the port un-rotates with its own
    RoPE (8.11: within ``7u(|a| + |b|) + 8 eta`` of the reference's), rules (9.5)-(9.7).
    """
    assert int(got.start) == int(start), f"{what}: start {got.start} != reference {start}"
    assert int(got.num_slots) == int(num_slots), f"{what}: num_slots {got.num_slots} != {num_slots}"
    tol.assert_identical(got.coded, coded, f"{what} coded mask")
    tol.assert_identical(np.asarray(got.rope_positions).astype(np.int64),
                         np.asarray(rope_positions).astype(np.int64),
                         f"{what} rotary positions (0 at padding, docs/06-cache.md 6.21)")
    tol.check_kvquant_side(got.values, want_values, values, calibration.value_levels_for(), coded,
                           f"{what} values")
    if inv_freq is None:
        tol.check_kvquant_side(got.keys, want_keys, keys, calibration.key_levels_for(), coded,
                               f"{what} keys")
    else:
        tol.check_kvquant_side(got.keys, want_keys, keys_pre_rope, calibration.key_levels_for(), coded,
                               f"{what} keys (pre-RoPE)", input_error=tol.rope_port_error(keys),
                               thresholds=(calibration.key_lower, calibration.key_upper))


def kvquant_segment_bounds(got_blocks, want_blocks: Sequence[Tuple[object, object]], calibration,
                           config, inv_freq) -> Tuple[np.ndarray, np.ndarray]:
    """Per-element bounds ``(keys, values)`` ``(B, H, Q, D)`` of the quantized segment
    (docs/06-cache.md 6.12, segment 1): rule (9.8) for each block side, and (9.9) for keys
    rotated back.  ``want_blocks``: ``(keys, values)`` reference ``KVQuantTensor`` per block."""
    bk, bv = [], []
    for g, (wk, wv) in zip(got_blocks, want_blocks):
        k_pre, v_hat = rkv.dequantize_nonuniform(wk), rkv.dequantize_nonuniform(wv)
        bv.append(tol.kvquant_dequantized_bound(g.values, wv, calibration.value_levels_for(),
                                                config.value_group_size, "token", v_hat))
        dk = tol.kvquant_dequantized_bound(g.keys, wk, calibration.key_levels_for(),
                                           config.key_group_size, "channel", k_pre)
        bk.append(dk if inv_freq is None else tol.rope_propagated_bound(dk, k_pre))
    return np.concatenate(bk, axis=2), np.concatenate(bv, axis=2)


def check_kvquant_quantized_segment(got_seg, want_seg, got_blocks, want_blocks, calibration, config,
                                    inv_freq, what: str = "quantized segment") -> None:
    """The dequantized segment of the port against the reference's, at live slots (position >= 0)."""
    got_k, got_v = np.asarray(got_seg[0]), np.asarray(got_seg[1])
    want_k, want_v, pos = want_seg
    assert got_k.shape == np.shape(want_k) and got_v.shape == np.shape(want_v), \
        f"{what}: shapes {got_k.shape}, {got_v.shape} != reference {np.shape(want_k)}"
    if np.shape(want_k)[2] == 0:
        return
    bound_k, bound_v = kvquant_segment_bounds(got_blocks, want_blocks, calibration, config, inv_freq)
    live = (np.asarray(pos) >= 0)[:, None, :, None]
    tol.check_within(got_v, want_v, bound_v, live, f"{what} values (dequantized)",
                     "docs/09-tolerances.md (9.8)")
    tol.check_within(got_k, want_k, bound_k, live,
                     f"{what} keys (dequantized" + (")" if inv_freq is None else ", RoPE re-applied)"),
                     "docs/09-tolerances.md (9.8)" + ("" if inv_freq is None else ", (9.9)"))


def expected_nbytes(ref_nbytes: int, got_blocks, want_key_outliers: Sequence[int],
                    sparse_itemsize: int = 4) -> int:
    """Definition 6.22 with the port's key outlier counts: the reference's count, moved by one
    sparse entry (int32 index + value) for each key outlier decision that rule (9.5) lets flip."""
    extra = sum(np.asarray(g.keys.outlier_index).size - int(k) for g, k in zip(got_blocks, want_key_outliers))
    return int(ref_nbytes) + extra * (4 + sparse_itemsize)
