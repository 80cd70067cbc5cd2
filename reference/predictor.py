"""The KVSink sink predictor and its calibration: docs/04-predictor.md.

KVSink (Su & Yuan, COLM 2025) observes that attention sinks are the tokens
that carry *extreme activation outliers* in a few fixed hidden channels, and
that these "stable outliers" appear at an early layer and persist.  A token
is therefore predicted to be a sink from its own hidden state at one early
layer: ``max_c |h[t, c]| > threshold`` over the stable channels ``c``.  The
rule reads one token at a time, so it works while decoding.

Online part (used by the cache)
    :func:`outlier_scores`, :func:`predict_sinks`, :class:`SinkPredictor`.
Calibration (run once per model, offline)
    :func:`layer_outlier_channels`, :func:`stable_outlier_channels`,
    :func:`sink_threshold`, :func:`calibrate_predictor`.

Hidden states follow transformers' ``output_hidden_states`` convention:
``hidden_states[0]`` is the embedding output and ``hidden_states[l]`` the
output of decoder layer ``l - 1``; each is ``(T, C)`` or ``(B, T, C)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import numpy as np

from .config import KVSinkConfig

__all__ = [
    "outlier_scores",
    "predict_sinks",
    "SinkPredictor",
    "layer_outlier_channels",
    "sink_channels",
    "stable_outlier_channels",
    "settled_layer",
    "sink_threshold",
    "check_channels",
    "check_threshold",
    "calibrate_predictor",
    "DEFAULT_OUTLIER_RATIO",
    "DEFAULT_WINDOW",
    "DEFAULT_GROWTH",
    "DEFAULT_MAX_FRACTION",
]

#: Default of ``ratio`` in calibration: a channel is an outlier at a layer when
#: its peak |h| exceeds this many times the layer's median |h|; the same ratio
#: times the median is the sink threshold.  docs/04-predictor.md §4.8 gives the
#: range of ratios that yields the same result on SmolLM2-135M.
DEFAULT_OUTLIER_RATIO = 300.0
#: Default of ``window``: consecutive layers a channel must stay an outlier to be stable.
DEFAULT_WINDOW = 4
#: Default of ``growth``: the prediction layer moves on while the stable channels'
#: peak still grows by more than this factor at the next layer (Definition 4.4b).
DEFAULT_GROWTH = 2.0
#: Default of ``max_fraction``: a sink channel's outlier entries sit on at most this
#: fraction of the tokens (Definition 4.3b).  Sinks are rare: SmolLM2-135M's channel
#: 507 marks <= 2 % of the tokens; the dense early channels of Gemma-3-270M (400 at
#: layers 1-6, 163 at layers 4 and 6-11) mark >= 14 % (docs/04-predictor.md §4.10).
DEFAULT_MAX_FRACTION = 0.05


# --------------------------------------------------------------------------
# validation helpers
# --------------------------------------------------------------------------

def _hidden(name: str, x, min_ndim: int = 2, max_ndim: Optional[int] = None) -> np.ndarray:
    """``x`` cast to float32 (float64 is rounded), checked for rank and finiteness."""
    arr = np.asarray(x)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a floating-point array (float16/32/64), got dtype {arr.dtype}")
    if arr.ndim < min_ndim or (max_ndim is not None and arr.ndim > max_ndim):
        want = f"(..., T, C) with at least {min_ndim} dims" if max_ndim is None \
            else "(T, C) or (B, T, C)"
        raise ValueError(f"{name} must have shape {want}, got {arr.shape}")
    if not np.all(np.isfinite(arr)):
        raise ValueError(f"{name} contains NaN or Inf; pass finite hidden states")
    return arr.astype(np.float32)


def check_channels(channels, num_channels: Optional[int]) -> Tuple[int, ...]:
    """``channels`` as a tuple of distinct ints in ``[0, num_channels)`` (no upper bound for None)."""
    if isinstance(channels, (int, np.integer)) and not isinstance(channels, bool):
        channels = (channels,)
    try:
        items = tuple(channels)
    except TypeError:
        raise TypeError(f"channels must be a sequence of ints, got {channels!r}") from None
    if len(items) == 0:
        raise ValueError("channels must name at least one channel")
    out = []
    for c in items:
        if isinstance(c, bool) or not isinstance(c, (int, np.integer)):
            raise TypeError(f"channels must hold ints, got {c!r} in {items!r}")
        c = int(c)
        if c < 0 or (num_channels is not None and c >= num_channels):
            hi = "" if num_channels is None else f" and < C = {num_channels}"
            raise ValueError(f"channels: channel {c} is out of range; each must be >= 0{hi}")
        out.append(c)
    if len(set(out)) != len(out):
        raise ValueError(f"channels has repeated entries: {tuple(out)}")
    return tuple(out)


def check_threshold(threshold) -> float:
    """``threshold`` as a finite float > 0 (``TypeError`` / ``ValueError`` otherwise)."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.integer, np.floating)):
        raise TypeError(f"threshold must be a float, got {threshold!r}")
    t = float(threshold)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"threshold must be a finite float > 0, got {threshold!r}")
    return t


# --------------------------------------------------------------------------
# Definitions 4.1 - 4.2: the online rule
# --------------------------------------------------------------------------

def outlier_scores(hidden, channels) -> np.ndarray:
    """Outlier score of each token (Definition 4.1), float32 ``(..., T)``.

    .. math::  s_t = \\max_{c \\in channels} |h_{t,c}|

    ``hidden`` is ``(..., T, C)`` (any float dtype; cast to float32 first,
    float64 being rounded to nearest).  ``|.|`` and ``max`` are exact in
    float32, so the score is exactly an element of ``|float32(hidden)|``.

    Raises ``ValueError`` naming ``channels`` for an empty, repeated or
    out-of-range channel list, and naming ``hidden`` for a bad rank or NaN/Inf.
    """
    h = _hidden("hidden", hidden)
    ch = check_channels(channels, h.shape[-1])
    return np.max(np.abs(h[..., list(ch)]), axis=-1)


def predict_sinks(hidden, channels, threshold) -> np.ndarray:
    """Predicted sinks (Definition 4.2), bool ``(..., T)``: ``outlier_scores > threshold``.

    The comparison is strict and exact: the float32 score is compared with
    ``threshold`` as a float64 number (float32 -> float64 is exact).  An
    implementation comparing in float32 must round ``threshold`` *down*
    (toward -inf) to float32 first to get the same answer.

    Token ``t``'s prediction depends only on ``hidden[..., t, :]``: predicting
    on a prefix gives the prefix of the prediction on the full sequence, and
    a decoding step predicts its new token alone.
    """
    thr = check_threshold(threshold)
    scores = outlier_scores(hidden, channels)
    return scores.astype(np.float64) > thr


@dataclass(frozen=True)
class SinkPredictor:
    """A calibrated KVSink predictor (Definitions 4.1 - 4.2).

    Attributes
    ----------
    layer : int >= 0, index into the hidden states (0 = embeddings, ``l`` =
        output of decoder layer ``l - 1``).
    channels : tuple of distinct ints >= 0, the stable outlier channels.
    threshold : float > 0; token ``t`` is a sink iff ``max_c |h[t, c]| > threshold``.
    """

    layer: int
    channels: Tuple[int, ...]
    threshold: float

    def __post_init__(self):
        if isinstance(self.layer, bool) or not isinstance(self.layer, (int, np.integer)) \
                or self.layer < 0:
            raise ValueError(f"layer must be an int >= 0, got {self.layer!r}")
        object.__setattr__(self, "layer", int(self.layer))
        object.__setattr__(self, "channels", check_channels(self.channels, None))
        object.__setattr__(self, "threshold", check_threshold(self.threshold))

    def predict(self, hidden) -> np.ndarray:
        """``predict_sinks(hidden, self.channels, self.threshold)``; ``hidden`` is
        the hidden state at ``self.layer``, ``(..., T, C)``."""
        return predict_sinks(hidden, self.channels, self.threshold)

    def config_fields(self) -> dict:
        """The ``KVSinkConfig`` fields: ``predictor_layer``, ``predictor_channels``,
        ``predictor_threshold`` (use ``config.replace(**p.config_fields())``)."""
        return {"predictor_layer": self.layer,
                "predictor_channels": tuple(self.channels),
                "predictor_threshold": self.threshold}

    def apply_to(self, config: KVSinkConfig) -> KVSinkConfig:
        """A copy of ``config`` with the predictor fields set to this predictor."""
        return config.replace(**self.config_fields())

    @classmethod
    def from_config(cls, config: KVSinkConfig) -> "SinkPredictor":
        """The predictor stored in ``config``; raises if it is not fully specified."""
        if not config.predictor_ready:
            raise ValueError("config does not specify the predictor: set predictor_layer, "
                             "predictor_channels and predictor_threshold (or calibrate_predictor)")
        return cls(config.predictor_layer, config.predictor_channels, config.predictor_threshold)


# --------------------------------------------------------------------------
# Definitions 4.3 - 4.6: calibration
# --------------------------------------------------------------------------

def _tokens_by_channels(hidden, valid, name) -> np.ndarray:
    """``|hidden|`` as float32 ``(N, C)``: all valid tokens of all rows."""
    h = _hidden(name, hidden, 2, 3)
    if h.ndim == 2:
        h = h[None]
    if valid is not None:
        v = np.asarray(valid)
        if v.dtype != np.bool_:
            raise TypeError(f"valid must be a bool array, got dtype {v.dtype}")
        if v.ndim == 1:
            v = v[None]
        if v.shape != h.shape[:2]:
            raise ValueError(f"valid must have shape {h.shape[:2]} (B, T) to match {name}, "
                             f"got {np.asarray(valid).shape}")
        a = np.abs(h[v])
    else:
        a = np.abs(h.reshape(-1, h.shape[-1]))
    if a.shape[0] == 0:
        raise ValueError(f"{name} has no (valid) token")
    return a


def _ratio(ratio) -> float:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float, np.integer, np.floating)) \
            or not math.isfinite(float(ratio)) or ratio <= 1:
        raise ValueError(f"ratio must be a finite float > 1, got {ratio!r}")
    return float(ratio)


def layer_outlier_channels(hidden, ratio: float = DEFAULT_OUTLIER_RATIO, *, valid=None) -> np.ndarray:
    """Outlier channels of one layer (Definition 4.3), sorted int64 array.

    .. math::  O = \\{ c : \\max_t |h_{t,c}| > ratio \\cdot \\mathrm{median}_{t,c'} |h_{t,c'}| \\}

    ``hidden`` is ``(T, C)`` or ``(B, T, C)``; the max and the median run
    over all (valid) tokens of all rows (the median over all ``N * C``
    entries, numpy's median: mean of the two middle values for an even
    count, computed in float64).  If the median is 0, every channel with a
    non-zero entry is an outlier.

    Parameters
    ----------
    hidden : float ``(T, C)`` or ``(B, T, C)``.
    ratio : float > 1.
    valid : None or bool ``(T,)`` / ``(B, T)``; padding tokens are left out.
    """
    r = _ratio(ratio)
    return _outliers_of(_tokens_by_channels(hidden, valid, "hidden"), r)


def _outliers_of(a: np.ndarray, r: float) -> np.ndarray:
    """Definition 4.3 on ``a = |h|`` given as ``(N, C)``."""
    med = float(np.median(a.astype(np.float64)))
    peak = a.max(axis=0).astype(np.float64)
    return np.nonzero(peak > r * med)[0].astype(np.int64)


def _max_fraction(max_fraction) -> float:
    if isinstance(max_fraction, bool) or not isinstance(max_fraction, (int, float, np.integer, np.floating)) \
            or not 0 < float(max_fraction) <= 1:
        raise ValueError(f"max_fraction must be a float in (0, 1], got {max_fraction!r}")
    return float(max_fraction)


def sink_channels(hidden, ratio: float = DEFAULT_OUTLIER_RATIO,
                  max_fraction: float = DEFAULT_MAX_FRACTION, *, valid=None) -> np.ndarray:
    """Sink channels of one layer (Definition 4.3b), sorted int64 array.

    .. math::  O^*_\\ell = \\{ c \\in O_\\ell : \\#\\{t : |h_{t,c}| > ratio \\cdot \\mu_\\ell\\}
               \\le \\max(1, \\lfloor max\\_fraction \\cdot N \\rfloor) \\}

    the outlier channels of Definition 4.3 whose outlier entries sit on *few*
    tokens: the tokens the predictor would mark with this channel at this
    layer (``|h| > ratio * median``, Definition 4.5's threshold) are at most
    ``max_fraction`` of the ``N`` (valid) tokens (at least one token is always
    allowed).  A channel that is large on most tokens (a dense, bias-like
    channel) is an outlier by 4.3 but marks no sink.

    Parameters
    ----------
    hidden : float ``(T, C)`` or ``(B, T, C)``.
    ratio : float > 1.
    max_fraction : float in (0, 1]; 1 gives Definition 4.3 unchanged.
    valid : None or bool ``(T,)`` / ``(B, T)``.
    """
    r, f = _ratio(ratio), _max_fraction(max_fraction)
    return _sink_channels_of(_tokens_by_channels(hidden, valid, "hidden"), r, f)


def _sink_channels_of(a: np.ndarray, r: float, f: float) -> np.ndarray:
    """Definition 4.3b on ``a = |h|`` given as ``(N, C)``."""
    med = float(np.median(a.astype(np.float64)))
    counts = (a.astype(np.float64) > r * med).sum(axis=0)
    allowed = max(1, math.floor(f * a.shape[0]))
    return np.nonzero((counts >= 1) & (counts <= allowed))[0].astype(np.int64)


def _num_layers(hidden_states) -> int:
    try:
        n = len(hidden_states)
    except TypeError:
        raise TypeError("hidden_states must be a sequence of (T, C) or (B, T, C) arrays, "
                        "index 0 = embeddings") from None
    if n < 2:
        raise ValueError(f"hidden_states must hold the embeddings and at least one decoder "
                         f"layer output (len >= 2), got len {n}")
    return n - 1


def stable_outlier_channels(hidden_states: Sequence, ratio: float = DEFAULT_OUTLIER_RATIO, *,
                            window: int = DEFAULT_WINDOW, valid=None,
                            max_fraction: float = DEFAULT_MAX_FRACTION) -> Tuple[int, Tuple[int, ...]]:
    """Prediction layer and stable outlier channels (Definition 4.4).

    With ``O*_l = sink_channels(hidden_states[l], ratio, max_fraction)``
    (Definition 4.3b) and ``L = len(hidden_states) - 1`` decoder layers, the
    prediction layer is the smallest ``l`` with ``l + window - 1 <= L`` and

    .. math::  S_l = O^*_l \\cap O^*_{l+1} \\cap \\dots \\cap O^*_{l + window - 1} \\ne \\emptyset

    (a channel that marks few tokens with a massive activation for ``window``
    consecutive layers starting at ``l``); the stable channels are ``S_l``.

    Returns
    -------
    (layer, channels) : int, tuple of sorted ints.

    Raises
    ------
    ValueError when no layer qualifies (the model shows no stable, sparse
    outlier at this ``ratio``: lower it, raise ``max_fraction`` or configure
    the predictor by hand).
    """
    num_layers = _num_layers(hidden_states)
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1:
        raise ValueError(f"window must be an int >= 1, got {window!r}")
    if window > num_layers + 1:
        raise ValueError(f"window={window} is longer than the {num_layers + 1} hidden states")
    r, f = _ratio(ratio), _max_fraction(max_fraction)
    outliers = []
    for l in range(num_layers + 1):
        a = _tokens_by_channels(hidden_states[l], valid, f"hidden_states[{l}]")
        if l > 0 and a.shape[1] != c_prev:
            raise ValueError(f"hidden_states[{l}] has {a.shape[1]} channels, hidden_states[0] "
                             f"has {c_prev}; all layers must have the same C")
        c_prev = a.shape[1]
        outliers.append(set(_sink_channels_of(a, r, f).tolist()))
    for l in range(0, num_layers - window + 2):
        common = set.intersection(*outliers[l:l + window])
        if common:
            return l, tuple(sorted(common))
    raise ValueError(f"no channel is a sparse outlier (peak > ratio={ratio} x the layer median, on "
                     f"at most max_fraction={max_fraction} of the tokens) for window={window} "
                     f"consecutive layers; lower ratio or window, raise max_fraction, or set the "
                     f"predictor fields by hand")


def settled_layer(hidden_states: Sequence, layer: int, channels, growth: float = DEFAULT_GROWTH,
                  ratio: float = DEFAULT_OUTLIER_RATIO, *, valid=None,
                  max_fraction: float = DEFAULT_MAX_FRACTION) -> int:
    r"""The layer at which the stable outlier has settled (Definition 4.4b).

    With ``peak_l = max_{c in channels} max_t |h_l[t, c]|`` (float32, exact)
    and ``O_l`` the outlier channels of Definition 4.3, starting from
    ``l = layer``:

    .. math::  \text{while } l < L,\ channels \subseteq O_{l+1} \text{ and }
               peak_{l+1} > growth \cdot peak_l:\quad l \leftarrow l + 1

    An outlier that is still emerging (its peak grows several-fold at the next
    layer) gives a threshold that the same tokens miss on another text; the
    layer after the jump separates sinks from ordinary tokens by a wide margin.
    On SmolLM2-135M channel 507 peaks at ~180 at layer 2 and ~810 at layer 3,
    then stays: the settled layer is 3 on every text we tried (docs §4.8).

    Parameters
    ----------
    hidden_states : sequence of ``(T, C)`` / ``(B, T, C)`` float arrays (index 0 = embeddings).
    layer : int, the prediction layer of Definition 4.4.
    channels : the stable channels of Definition 4.4.
    growth : float > 1, or ``math.inf`` to keep ``layer`` unchanged.
    ratio : the outlier ratio of Definition 4.3.
    valid : None or bool ``(T,)`` / ``(B, T)``.
    max_fraction : of Definition 4.3b.

    Returns
    -------
    int, ``>= layer``.
    """
    if isinstance(growth, bool) or not isinstance(growth, (int, float)) or not growth > 1:
        raise ValueError(f"growth must be a float > 1 (or math.inf), got {growth!r}")
    r, f = _ratio(ratio), _max_fraction(max_fraction)
    num_layers = _num_layers(hidden_states)
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) \
            or not 0 <= layer <= num_layers:
        raise ValueError(f"layer must be an int in 0..{num_layers}, got {layer!r}")
    cols = list(check_channels(channels, None))

    def abs_layer(l):
        return _tokens_by_channels(hidden_states[l], valid, f"hidden_states[{l}]")

    l = int(layer)
    peak = float(abs_layer(l)[:, cols].max())
    while l < num_layers:
        a = abs_layer(l + 1)
        nxt = float(a[:, cols].max())
        if not (set(cols) <= set(_sink_channels_of(a, r, f).tolist()) and nxt > growth * peak):
            break
        l, peak = l + 1, nxt
    return l


def sink_threshold(hidden, ratio: float = DEFAULT_OUTLIER_RATIO, *, valid=None) -> float:
    """Sink threshold at the prediction layer (Definition 4.5), a Python float.

    .. math::  \\tau = ratio \\cdot \\mathrm{median}_{t,c} |h_{t,c}|

    the same statistic as Definition 4.3: a token is predicted a sink exactly
    when one of its stable-channel entries is an outlier entry of the
    calibration layer (a "massive activation").  The median is over all
    (valid) entries of ``hidden`` (``(T, C)`` or ``(B, T, C)``) in float64;
    the product is a float64 multiplication.  docs/04-predictor.md §4.8
    compares this rule with order-statistic rules on SmolLM2 (they transfer
    worse from one text to another).

    Raises ``ValueError`` when the median is 0 (the threshold must be > 0).
    """
    r = _ratio(ratio)
    a = _tokens_by_channels(hidden, valid, "hidden")
    med = float(np.median(a.astype(np.float64)))
    if not med > 0:
        raise ValueError("hidden: the median |h| is 0, so ratio * median gives no usable "
                         "threshold; calibrate on real hidden states or set the threshold by hand")
    return r * med


def calibrate_predictor(hidden_states: Sequence, *, ratio: float = DEFAULT_OUTLIER_RATIO,
                        window: int = DEFAULT_WINDOW, growth: float = DEFAULT_GROWTH,
                        valid=None, max_fraction: float = DEFAULT_MAX_FRACTION) -> SinkPredictor:
    """Calibrate the KVSink predictor on one forward pass (Definition 4.6).

    1. ``layer, channels = stable_outlier_channels(hidden_states, ratio, window=window,
       max_fraction=max_fraction)``;
    2. ``layer = settled_layer(hidden_states, layer, channels, growth, ratio, max_fraction=...)``;
    3. ``threshold = sink_threshold(hidden_states[layer], ratio)``.

    By construction the stable channels' peak exceeds the threshold at the
    prediction layer, so at least one calibration token is predicted.

    Parameters
    ----------
    hidden_states : sequence of float ``(T, C)`` or ``(B, T, C)`` arrays,
        index 0 = embeddings, index ``l`` = output of decoder layer ``l - 1``.
    ratio : float > 1, outlier ratio of :func:`layer_outlier_channels`.
    window : int >= 1, consecutive outlier layers required.
    growth : float > 1 of :func:`settled_layer` (``math.inf``: keep the earliest layer).
    valid : None or bool ``(T,)`` / ``(B, T)``; padding tokens are left out.
    max_fraction : float in (0, 1] of :func:`sink_channels` (1: no sparsity condition).

    Returns
    -------
    SinkPredictor.
    """
    layer, channels = stable_outlier_channels(hidden_states, ratio, window=window, valid=valid,
                                              max_fraction=max_fraction)
    layer = settled_layer(hidden_states, layer, channels, growth, ratio, valid=valid,
                          max_fraction=max_fraction)
    return SinkPredictor(layer, channels, sink_threshold(hidden_states[layer], ratio, valid=valid))
