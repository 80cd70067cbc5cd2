"""Sets of preserved tokens: docs/03-preservation.md.

A *preserved* token keeps its keys and values at full precision while the
rest of the cache is quantized.  This module defines the candidate sets
(Preserve-First-N, the attention oracle; the KVSink prediction itself is in
``reference/predictor.py``), how they are combined (union, then a per-row cap)
and the one entry point used by the cache, :func:`preserved_set`.

Every mask is a bool array ``(B, T)``: row ``b`` is one sequence, column ``t``
one cache slot in position order.  ``valid[b, t]`` is ``False`` for padding
(left padding in a batch of prompts of unequal length); a padding slot is
never preserved.
"""

from __future__ import annotations

import math
from typing import Optional

import numpy as np

from .config import KVSinkConfig

__all__ = [
    "preserve_first_n",
    "oracle_scores",
    "attention_oracle",
    "union",
    "cap_preserved",
    "preserved_set",
    "preserved_step",
    "check_count",
]


def _bool_mask(name: str, x, shape=None) -> np.ndarray:
    arr = np.asarray(x)
    if arr.dtype != np.bool_:
        raise TypeError(f"{name} must be a bool array, got dtype {arr.dtype}")
    if shape is None:
        if arr.ndim != 2:
            raise ValueError(f"{name} must have shape (B, T), got {arr.shape}")
    elif arr.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)} (B, T), got {arr.shape}")
    return arr


def check_count(name: str, n) -> int:
    """``n`` as an int >= 0 (``TypeError`` / ``ValueError`` naming ``name`` otherwise)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {n!r}")
    if n < 0:
        raise ValueError(f"{name} must be >= 0, got {n}")
    return int(n)


# --------------------------------------------------------------------------
# Definition 3.1: Preserve-First-N
# --------------------------------------------------------------------------

def preserve_first_n(valid, n: int) -> np.ndarray:
    """The first ``n`` valid tokens of each row (Definition 3.1).

    .. math::  P_{b,t} = valid_{b,t} \\wedge \\#\\{t' \\le t : valid_{b,t'}\\} \\le n

    Padding is skipped: with left padding the preserved tokens are the first
    ``n`` real tokens, not the first ``n`` slots.  A row with fewer than ``n``
    valid tokens has all of them preserved.

    Parameters
    ----------
    valid : bool ``(B, T)``.
    n : int >= 0.

    Returns
    -------
    bool ``(B, T)``.
    """
    valid = _bool_mask("valid", valid)
    n = check_count("n", n)
    rank = np.cumsum(valid, axis=1)          # 1-based rank among valid tokens
    return valid & (rank <= n)


# --------------------------------------------------------------------------
# Definition 3.2: attention oracle
# --------------------------------------------------------------------------

def _check_probs(probs, valid):
    p = np.asarray(probs)
    if not np.issubdtype(p.dtype, np.floating):
        raise TypeError(f"probs must be a floating-point array, got dtype {p.dtype}")
    if p.ndim != 4:
        raise ValueError(f"probs must have shape (B, Hq, Tq, T), got {p.shape}")
    b, hq, tq, t = p.shape
    if tq > t:
        raise ValueError(f"probs has more queries (Tq={tq}) than keys (T={t}); the queries "
                         f"must be the last Tq of the T tokens")
    if hq == 0:
        raise ValueError("probs must have at least one head (Hq >= 1)")
    if not np.all(np.isfinite(p)):
        raise ValueError("probs contains NaN or Inf; pass finite attention probabilities")
    if np.any(p < 0):
        raise ValueError("probs contains negative values; pass softmax probabilities")
    if valid is None:
        valid = np.ones((b, t), dtype=bool)
    else:
        valid = _bool_mask("valid", valid, (b, t))
    return p.astype(np.float64), valid


def oracle_scores(probs, valid=None) -> np.ndarray:
    """Relative attention received by each token (Definition 3.2), float64 ``(B, T)``.

    ``probs[b, h, j, i]`` is the attention probability from query ``j`` to key
    ``i``; the ``Tq`` queries are the *last* ``Tq`` of the ``T`` tokens, so
    query ``j`` sits at slot ``t_j = T - Tq + j`` (``Tq == T`` for a prefill).
    With

    * ``vis(j, i) = valid[b, i] and i <= t_j`` (key ``i`` visible to query ``j``),
    * ``n_j = #{i : vis(j, i)}`` (keys visible to query ``j``, so ``1 / n_j``
      is uniform attention),
    * ``Q = {j : valid[b, t_j]}`` (the real queries; a padding query's row is
      ignored),

    the score of token ``i`` is

    .. math::

        s_{b,i} = \\frac{1}{H_q |Q|} \\sum_{h} \\sum_{j \\in Q,\\, vis(j,i)} p_{b,h,j,i} \\, n_j

    i.e. the attention ``i`` receives in multiples of uniform attention,
    averaged over heads and over **all** real queries, a query that cannot see
    ``i`` contributing 0.  (Averaging only over the queries that see ``i``
    would let the last few tokens, seen by a handful of queries that attend
    locally, look like sinks; docs/03-preservation.md §3.2 shows the numbers.)

    Edge cases: padding tokens and tokens no real query sees get score 0; a
    row with no real query has all scores 0.  Probabilities on invisible
    keys are ignored (not required to be 0).  To pool several layers, stack
    them along the head axis: ``probs.reshape(B, layers * Hq, Tq, T)``.
    """
    p, valid = _check_probs(probs, valid)
    b, hq, tq, t = p.shape
    slots = np.arange(t - tq, t)                                  # slot of query j
    vis = valid[:, None, :] & (np.arange(t)[None, None, :] <= slots[None, :, None])  # (B, Tq, T)
    n = vis.sum(axis=2).astype(np.float64)                        # (B, Tq)
    q_real = valid[:, t - tq:]                                    # (B, Tq)
    weight = np.where(vis & q_real[:, :, None], n[:, :, None], 0.0)   # (B, Tq, T)
    total = np.einsum("bhji,bji->bi", p, weight)                  # (B, T)
    n_queries = q_real.sum(axis=1).astype(np.float64)             # (B,)
    denom = hq * np.maximum(n_queries, 1.0)
    return np.where(valid, total / denom[:, None], 0.0)


def attention_oracle(probs, ratio: float, valid=None) -> np.ndarray:
    """Attention-oracle sinks (Definition 3.2): ``oracle_scores(probs, valid) >= ratio``.

    A token is a sink when, averaged over heads and real queries, it receives
    at least ``ratio`` times uniform attention.  Padding is never a sink.

    Parameters
    ----------
    probs : float ``(B, Hq, Tq, T)`` attention probabilities (see :func:`oracle_scores`).
    ratio : finite float > 0 (``KVSinkConfig.oracle_ratio``, default 8).
    valid : None (all valid) or bool ``(B, T)``.

    Returns
    -------
    bool ``(B, T)``.
    """
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(ratio)) or ratio <= 0:
        raise ValueError(f"ratio must be a finite float > 0, got {ratio!r}")
    scores = oracle_scores(probs, valid)
    return scores >= float(ratio)


# --------------------------------------------------------------------------
# Definitions 3.4 - 3.5: union and cap
# --------------------------------------------------------------------------

def union(*masks) -> np.ndarray:
    """Element-wise OR of one or more bool masks of the same shape (Definition 3.4)."""
    if len(masks) == 0:
        raise ValueError("union needs at least one mask")
    out = None
    for i, m in enumerate(masks):
        arr = np.asarray(m)
        if arr.dtype != np.bool_:
            raise TypeError(f"masks[{i}] must be a bool array, got dtype {arr.dtype}")
        if out is None:
            out = arr.copy()
        elif arr.shape != out.shape:
            raise ValueError(f"masks[{i}] has shape {arr.shape}, masks[0] has {out.shape}; "
                             "all masks must have the same shape")
        else:
            out |= arr
    return out


def cap_preserved(flags, max_count: Optional[int]) -> np.ndarray:
    """Keep the earliest ``max_count`` ``True`` entries of each row (Definition 3.5).

    .. math::  C_{b,t} = F_{b,t} \\wedge \\#\\{t' \\le t : F_{b,t'}\\} \\le max\\_count

    This is what a streaming cache produces: tokens are resolved in position
    order and the preserved store fills up first come, first served.
    ``max_count=None`` means no cap (a copy of ``flags``); ``0`` preserves nothing.
    """
    flags = _bool_mask("flags", flags)
    if max_count is None:
        return flags.copy()
    max_count = check_count("max_count", max_count)
    return flags & (np.cumsum(flags, axis=1) <= max_count)


# --------------------------------------------------------------------------
# Definition 3.6: the preserved set of a configuration
# --------------------------------------------------------------------------

def preserved_set(config: KVSinkConfig, valid, predicted=None, oracle=None) -> np.ndarray:
    """The tokens kept at full precision under ``config`` (Definition 3.6).

    .. math::  P = cap\\Big(valid \\wedge \\bigvee_{\\pi \\in config.preserve} P_\\pi,\\;
               config.max\\_preserved\\Big)

    with ``P_pfn = preserve_first_n(valid, config.preserve_first_n)``,
    ``P_kvsink = predicted`` and ``P_oracle = oracle``.  An empty
    ``config.preserve`` gives an all-False mask.  Inputs for policies that are
    not configured are ignored.

    Parameters
    ----------
    config : KVSinkConfig.
    valid : bool ``(B, T)``.
    predicted : bool ``(B, T)``, required when ``"kvsink"`` is configured
        (``predictor.predict_sinks`` at the prediction layer).
    oracle : bool ``(B, T)``, required when ``"oracle"`` is configured
        (:func:`attention_oracle`).

    Raises
    ------
    ValueError if a configured policy's input is missing or has the wrong shape.
    """
    if not isinstance(config, KVSinkConfig):
        raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
    valid = _bool_mask("valid", valid)
    sets = [np.zeros_like(valid)]
    for policy in config.preserve:
        if policy == "pfn":
            sets.append(preserve_first_n(valid, config.preserve_first_n))
        elif policy == "kvsink":
            if predicted is None:
                raise ValueError("config.preserve includes 'kvsink' but predicted is None; pass "
                                 "predicted=predict_sinks(hidden, channels, threshold) (B, T)")
            sets.append(_bool_mask("predicted", predicted, valid.shape))
        elif policy == "oracle":
            if oracle is None:
                raise ValueError("config.preserve includes 'oracle' but oracle is None; pass "
                                 "oracle=attention_oracle(probs, config.oracle_ratio, valid) (B, T)")
            sets.append(_bool_mask("oracle", oracle, valid.shape))
        else:  # pragma: no cover - KVSinkConfig validates the names
            raise ValueError(f"unknown policy {policy!r}")
    flags = union(*sets) & valid
    return cap_preserved(flags, config.max_preserved)


def _count(name: str, x, b: int) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != (b,) or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must be an integer array of shape ({b},) (one count per row), "
                         f"got {arr.dtype} {arr.shape}")
    return arr.astype(np.int64)


def preserved_step(config: KVSinkConfig, valid, valid_before, preserved_before, predicted=None):
    """The preserved set of the ``n`` newest tokens from per-row counts of the earlier ones
    (Proposition 3.7, the streaming form of Definition 3.6).

    With ``V_b`` = ``valid_before[b]`` (valid tokens before the new ones) and ``P_b`` =
    ``preserved_before[b]`` (preserved tokens before them):

    .. math::  F_{bj} = valid_{bj} \\wedge \\big( [pfn]\\,(V_b + \\textstyle\\sum_{j' \\le j} valid_{bj'} \\le N)
               \\vee [kvsink]\\, predicted_{bj} \\big), \\quad
               P^{new}_{bj} = F_{bj} \\wedge P_b + \\textstyle\\sum_{j' \\le j} F_{bj'} \\le M

    (no cap when ``M = config.max_preserved`` is None).  Equals
    ``preserved_set(config, [hist_valid, valid], [hist_predicted, predicted])[:, T:]`` when ``V`` and
    ``P`` are the valid and preserved counts of the ``T``-token history: PFN, the prediction and
    the earliest-first cap decide token ``t`` from tokens ``<= t`` only.

    Parameters
    ----------
    config : KVSinkConfig; ``"oracle"`` is refused (its scores depend on later queries).
    valid : bool ``(B, n)``, the new tokens' validity.
    valid_before, preserved_before : int ``(B,)``.
    predicted : bool ``(B, n)``, required when ``"kvsink"`` is configured.

    Returns
    -------
    ``(flags bool (B, n), valid_before + valid.sum(1), preserved_before + flags.sum(1))``.
    """
    if not isinstance(config, KVSinkConfig):
        raise TypeError(f"config must be a KVSinkConfig, got {type(config).__name__}")
    if "oracle" in config.preserve:
        raise ValueError("preserved_step cannot apply preserve='oracle' (its scores depend on "
                         "later queries); use preserved_set over the whole sequence")
    valid = _bool_mask("valid", valid)
    b = valid.shape[0]
    v0, p0 = _count("valid_before", valid_before, b), _count("preserved_before", preserved_before, b)
    flags = np.zeros_like(valid)
    if "pfn" in config.preserve:
        flags |= valid & (v0[:, None] + np.cumsum(valid, axis=1) <= config.preserve_first_n)
    if "kvsink" in config.preserve:
        if predicted is None:
            raise ValueError("config.preserve includes 'kvsink' but predicted is None; pass "
                             "predicted=predict_sinks(hidden, channels, threshold) (B, n)")
        flags |= _bool_mask("predicted", predicted, valid.shape) & valid
    if config.max_preserved is not None:
        flags &= p0[:, None] + np.cumsum(flags, axis=1) <= config.max_preserved
    return flags, v0 + valid.sum(axis=1), p0 + flags.sum(axis=1)
