"""Attention over a (partly quantized, partly preserved) KV cache: docs/05-attention.md.

This module is the specification of the attention that kvsink computes once
the cache has been dequantized.  Two forms are given:

* the *direct* form, :func:`attention` (Definition 5.3): one softmax over all
  keys of the cache;
* the *split* form, :func:`partial_attention` + :func:`merge_partials` =
  :func:`split_attention` (Definitions 5.4-5.6): each segment of the cache
  (quantized part, preserved store, full-precision residual) is attended
  separately and the pieces are merged with the log-sum-exp rule.  The split
  form equals the direct form up to float64 rounding (docs/05-attention.md
  §5.7 gives the proof).

Conventions (all functions)
---------------------------
* ``query``: ``(B, Hq, Tq, D)``; ``keys``, ``values``: ``(B, H, S, D)`` with
  ``Hq % H == 0``.  Query head ``h`` reads KV head ``h // (Hq // H)``
  (grouped-query attention, Definition 5.1).
* ``query_positions``: integer ``(B, Tq)``; ``key_positions``: integer
  ``(B, S)``.  Key ``s`` is visible to query ``t`` (Definition 5.2) iff
  ``key_positions[b, s] >= 0`` and ``key_valid[b, s]`` (when given) and
  ``key_positions[b, s] <= query_positions[b, t]``.  A negative key position
  marks an empty slot (padding, a preserved token removed from the quantized
  part, a cropped slot).
* ``scale`` defaults to ``1 / sqrt(D)``.
* Arithmetic is float64: inputs (float16/32/64) are converted exactly to
  float64 and every result is float64.
* A query that sees no key outputs the zero vector.
* NaN or +-Inf in ``query``, ``keys`` or ``values`` raises ``ValueError``.
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "kv_head_index",
    "visible_keys",
    "attention_scores",
    "attention",
    "partial_attention",
    "merge_partials",
    "split_attention",
    "check_scale",
]


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------

def _float_array(name: str, x, ndim: int) -> np.ndarray:
    """``x`` as a float64 array of rank ``ndim``; raises on bad dtype, rank or non-finite values."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), "
                        f"got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; pass finite values")
    return arr.astype(np.float64)


def _int_array(name: str, x, shape: Tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(x)
    if not (np.issubdtype(arr.dtype, np.integer) and arr.dtype != np.bool_):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {arr.shape}")
    return arr.astype(np.int64)


def check_scale(scale, head_dim: int) -> float:
    """The softmax scale: ``scale`` as a finite float > 0, or ``1/sqrt(head_dim)`` when None."""
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
        raise TypeError(f"scale must be a float or None, got {scale!r}")
    scale = float(scale)
    if not math.isfinite(scale) or scale <= 0:
        raise ValueError(f"scale must be a finite float > 0 (or None for 1/sqrt(D)), got {scale!r}")
    return scale


def _check_qkv(query, keys, values):
    q = _float_array("query", query, 4)
    k = _float_array("keys", keys, 4)
    v = _float_array("values", values, 4)
    if k.shape != v.shape:
        raise ValueError(f"keys and values must have the same shape (B, H, S, D), "
                         f"got {k.shape} and {v.shape}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"query and keys must have the same batch size, "
                         f"got {q.shape[0]} and {k.shape[0]}")
    hq, h = q.shape[1], k.shape[1]
    if h == 0 or hq % h != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of the number "
                         f"of keys heads ({h}) for grouped-query attention")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"query and keys must have the same head dimension D, "
                         f"got {q.shape[3]} and {k.shape[3]}")
    return q, k, v


# --------------------------------------------------------------------------
# Definitions 5.1 - 5.2
# --------------------------------------------------------------------------

def kv_head_index(num_query_heads: int, num_kv_heads: int) -> np.ndarray:
    """KV head read by each query head (Definition 5.1, grouped-query attention).

    ``kv_head_index(Hq, H)[h] = h // (Hq // H)``, an int64 array of shape ``(Hq,)``.
    ``Hq`` must be a positive multiple of ``H``.
    """
    if num_kv_heads <= 0 or num_query_heads <= 0 or num_query_heads % num_kv_heads != 0:
        raise ValueError(f"the number of query heads ({num_query_heads}) must be a positive "
                         f"multiple of the number of keys heads ({num_kv_heads})")
    group = num_query_heads // num_kv_heads
    return np.arange(num_query_heads, dtype=np.int64) // group


def visible_keys(query_positions, key_positions, key_valid=None) -> np.ndarray:
    """Visibility mask (Definition 5.2): bool ``(B, Tq, S)``.

    ``V[b, t, s] = (kp[b, s] >= 0) and key_valid[b, s] and (kp[b, s] <= qp[b, t])``.

    Parameters
    ----------
    query_positions : int array ``(B, Tq)``.
    key_positions : int array ``(B, S)``; a negative entry marks an empty slot.
    key_valid : None or bool array ``(B, S)``; ``False`` hides the key.
    """
    qp = np.asarray(query_positions)
    if qp.ndim != 2:
        raise ValueError(f"query_positions must have shape (B, Tq), got {qp.shape}")
    qp = _int_array("query_positions", qp, qp.shape)
    kp = np.asarray(key_positions)
    if kp.ndim != 2:
        raise ValueError(f"key_positions must have shape (B, S), got {kp.shape}")
    kp = _int_array("key_positions", kp, kp.shape)
    if kp.shape[0] != qp.shape[0]:
        raise ValueError(f"key_positions and query_positions must have the same batch size, "
                         f"got {kp.shape[0]} and {qp.shape[0]}")
    vis = (kp[:, None, :] >= 0) & (kp[:, None, :] <= qp[:, :, None])
    if key_valid is not None:
        kv = np.asarray(key_valid)
        if kv.dtype != np.bool_:
            raise TypeError(f"key_valid must be a bool array, got dtype {kv.dtype}")
        if kv.shape != kp.shape:
            raise ValueError(f"key_valid must have shape {kp.shape} (B, S), got {kv.shape}")
        vis &= kv[:, None, :]
    return vis


def attention_scores(query, keys, *, scale=None) -> np.ndarray:
    """Scaled dot products ``e[b, h, t, s] = scale * <q[b, h, t], k[b, h // (Hq // H), s]>``.

    float64 ``(B, Hq, Tq, S)``; no masking.  ``scale`` defaults to ``1 / sqrt(D)``.
    """
    q = _float_array("query", query, 4)
    k = _float_array("keys", keys, 4)
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"query and keys must have the same batch size, "
                         f"got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"query and keys must have the same head dimension D, "
                         f"got {q.shape[3]} and {k.shape[3]}")
    heads = kv_head_index(q.shape[1], k.shape[1])
    s = check_scale(scale, q.shape[3])
    k_rep = k[:, heads]                                   # (B, Hq, S, D)
    return np.einsum("bhtd,bhsd->bhts", q, k_rep) * s


# --------------------------------------------------------------------------
# Definition 5.3: direct attention
# --------------------------------------------------------------------------

def _masked_scores(query, keys, values, query_positions, key_positions, key_valid, scale):
    q, k, v = _check_qkv(query, keys, values)
    b, hq, tq, d = q.shape
    s = k.shape[2]
    qp = _int_array("query_positions", query_positions, (b, tq))
    kp = _int_array("key_positions", key_positions, (b, s))
    vis = visible_keys(qp, kp, key_valid)                 # (B, Tq, S)
    e = attention_scores(q, k, scale=scale)               # (B, Hq, Tq, S)
    e = np.where(vis[:, None, :, :], e, -np.inf)
    v_rep = v[:, kv_head_index(hq, k.shape[1])]           # (B, Hq, S, D)
    return e, v_rep


def attention(query, keys, values, *, query_positions, key_positions,
              key_valid=None, scale=None) -> np.ndarray:
    """Direct masked softmax attention (Definition 5.3), float64 ``(B, Hq, Tq, D)``.

    .. math::

        o_{b,h,t} = \\sum_{s \\in V(t)} \\frac{\\exp(e_{b,h,t,s} - m)}
                     {\\sum_{s' \\in V(t)} \\exp(e_{b,h,t,s'} - m)} \\, v_{b, h // g, s}

    with ``e`` the scaled scores of :func:`attention_scores`, ``V(t)`` the keys
    visible to query ``t`` (:func:`visible_keys`), ``g = Hq // H`` and ``m`` the
    maximum visible score (subtracting it changes nothing mathematically; it
    keeps ``exp`` from overflowing).  If ``V(t)`` is empty the output is 0.

    Parameters
    ----------
    query : float ``(B, Hq, Tq, D)``.
    keys, values : float ``(B, H, S, D)``, ``Hq % H == 0``.
    query_positions : int ``(B, Tq)``.
    key_positions : int ``(B, S)``; negative = empty slot.
    key_valid : None or bool ``(B, S)``.
    scale : None (``1 / sqrt(D)``) or float > 0.
    """
    e, v_rep = _masked_scores(query, keys, values, query_positions, key_positions,
                              key_valid, scale)
    m = np.max(e, axis=-1, keepdims=True, initial=-np.inf)           # (B, Hq, Tq, 1)
    seen = np.isfinite(m)
    p = np.where(seen, np.exp(e - np.where(seen, m, 0.0)), 0.0)      # exp(-inf) = 0
    denom = np.sum(p, axis=-1, keepdims=True)
    p = np.where(seen, p / np.where(seen, denom, 1.0), 0.0)
    return np.einsum("bhts,bhsd->bhtd", p, v_rep)


# --------------------------------------------------------------------------
# Definitions 5.4 - 5.6: split (flash-decoding style) attention
# --------------------------------------------------------------------------

def partial_attention(query, keys, values, *, query_positions, key_positions,
                      key_valid=None, scale=None):
    """Partial softmax statistics of one segment (Definition 5.4).

    Returns ``(m, l, acc)``:

    * ``m`` float64 ``(B, Hq, Tq)``: the largest visible score ``max_{s in V(t)} e_s``;
      ``-inf`` when the query sees no key of this segment;
    * ``l`` float64 ``(B, Hq, Tq)``: ``sum_{s in V(t)} exp(e_s - m)``; 0 when empty;
    * ``acc`` float64 ``(B, Hq, Tq, D)``: ``sum_{s in V(t)} exp(e_s - m) v_s``; 0 when empty.

    A segment with ``S = 0`` keys is allowed and gives ``(-inf, 0, 0)``.
    Arguments as in :func:`attention`.
    """
    e, v_rep = _masked_scores(query, keys, values, query_positions, key_positions,
                              key_valid, scale)
    m = np.max(e, axis=-1, initial=-np.inf)                          # (B, Hq, Tq)
    seen = np.isfinite(m)
    shifted = e - np.where(seen, m, 0.0)[..., None]
    p = np.where(seen[..., None], np.exp(shifted), 0.0)
    l = np.sum(p, axis=-1)
    acc = np.einsum("bhts,bhsd->bhtd", p, v_rep)
    return m, l, acc


def merge_partials(parts: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]]) -> np.ndarray:
    """Log-sum-exp merge of partial statistics (Definition 5.5), float64 ``(B, Hq, Tq, D)``.

    With ``M = max_i m_i`` and ``w_i = exp(m_i - M)`` (``w_i = 0`` when ``m_i = -inf``):

    .. math::

        o = \\frac{\\sum_i w_i \\, acc_i}{\\sum_i w_i \\, l_i}

    and ``o = 0`` where ``M = -inf`` (no segment has a visible key).

    Parameters
    ----------
    parts : non-empty sequence of ``(m, l, acc)`` triples from
        :func:`partial_attention`, all with the same shapes.
    """
    parts = list(parts)
    if len(parts) == 0:
        raise ValueError("parts must hold at least one (m, l, acc) triple")
    ms, ls, accs = [], [], []
    for i, part in enumerate(parts):
        if len(part) != 3:
            raise ValueError(f"parts[{i}] must be an (m, l, acc) triple, got {len(part)} items")
        m, l, acc = (np.asarray(a, dtype=np.float64) for a in part)
        if acc.ndim != 4 or m.shape != acc.shape[:3] or l.shape != m.shape:
            raise ValueError(f"parts[{i}] must have m, l of shape (B, Hq, Tq) and acc of shape "
                             f"(B, Hq, Tq, D); got {m.shape}, {l.shape}, {acc.shape}")
        if ms and (m.shape != ms[0].shape or acc.shape != accs[0].shape):
            raise ValueError(f"parts[{i}] has shapes {m.shape}/{acc.shape}, parts[0] has "
                             f"{ms[0].shape}/{accs[0].shape}; all parts must match")
        if np.any(np.isnan(m)) or np.any(m == np.inf):
            raise ValueError(f"parts[{i}] m contains NaN or +Inf; m must be finite or -inf")
        if not (np.all(np.isfinite(l)) and np.all(np.isfinite(acc))):
            raise ValueError(f"parts[{i}] l or acc contains NaN or Inf")
        ms.append(m); ls.append(l); accs.append(acc)
    m_all = np.stack(ms)                                  # (P, B, Hq, Tq)
    big_m = np.max(m_all, axis=0)                         # (B, Hq, Tq)
    seen = np.isfinite(big_m)
    w = np.where(np.isfinite(m_all), np.exp(m_all - np.where(seen, big_m, 0.0)), 0.0)
    num = np.sum(w[..., None] * np.stack(accs), axis=0)   # (B, Hq, Tq, D)
    den = np.sum(w * np.stack(ls), axis=0)                # (B, Hq, Tq)
    return np.where(seen[..., None], num / np.where(seen, den, 1.0)[..., None], 0.0)


def split_attention(query, segments: Sequence[Tuple[np.ndarray, np.ndarray, np.ndarray]], *,
                    query_positions, scale=None) -> np.ndarray:
    """Attention over a list of cache segments (Definition 5.6), float64 ``(B, Hq, Tq, D)``.

    ``segments`` is a sequence of ``(keys, values, key_positions)`` with
    ``keys, values`` of shape ``(B, H, S_i, D)`` (``S_i`` may be 0) and
    ``key_positions`` int ``(B, S_i)``.  The result is
    ``merge_partials([partial_attention(query, k_i, v_i, ...) for each segment])``
    and equals ``attention`` over the concatenation of the segments along the
    key axis, up to float64 rounding (docs/05-attention.md §5.7).  With no
    segment at all every query sees no key and the output is 0.
    """
    q = _float_array("query", query, 4)
    parts = []
    for i, seg in enumerate(segments):
        if len(seg) != 3:
            raise ValueError(f"segments[{i}] must be a (keys, values, key_positions) triple, "
                             f"got {len(seg)} items")
        k, v, kp = seg
        parts.append(partial_attention(q, k, v, query_positions=query_positions,
                                       key_positions=kp, scale=scale))
    if not parts:
        b, hq, tq, d = q.shape
        _int_array("query_positions", query_positions, (b, tq))
        check_scale(scale, d)
        return np.zeros((b, hq, tq, d), dtype=np.float64)
    return merge_partials(parts)
