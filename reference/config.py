"""The one configuration of kvsink, shared by ``reference`` and ``accelerated``.

``KVSinkConfig`` is a frozen dataclass validated at construction: every
invalid field raises ``ValueError`` naming the field, the value given and the
values allowed.  The spec of each field is docs/07-config.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Tuple, Union

__all__ = ["KVSinkConfig", "parse_preserve", "QUANTIZERS", "POLICIES", "AXES", "SCHEMES",
           "MAX_GROUP_SIZE", "MAX_RESIDUAL_LENGTH"]

#: Names of the quantizer kinds (docs/02-quantization.md and, for "kvquant", docs/08-kvquant.md).
QUANTIZERS = ("uniform", "kvquant")
#: Names of the preservation policies that may be combined (docs/03-preservation.md).
POLICIES = ("pfn", "kvsink", "oracle")
#: Axis names: "token" = groups along the head dimension of one token
#: (KIVI's values); "channel" = groups of consecutive tokens of one channel
#: (KIVI's keys).
AXES = ("token", "channel")
SCHEMES = ("asymmetric", "symmetric")
#: Largest group size accepted (docs/07-config.md 7.1): 65,536 elements along ``D`` or tokens along
#: ``T``.  Head dimensions are at most a few hundred and KIVI-style token groups 32..128; a larger
#: value is a typo (``10**12`` would make a cache allocate terabytes), refused at construction.
MAX_GROUP_SIZE = 1 << 16
#: Largest residual window accepted: 2**24 tokens, the longest sequence the spec's positions cover
#: (``reference.kvquant.MAX_POSITION``: float32 holds every integer position below it exactly).
MAX_RESIDUAL_LENGTH = 1 << 24


def _check_int(name, value, lo, hi=None, limit=""):
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    if value < lo or (hi is not None and value > hi):
        allowed = f"{lo}..{hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{name}={value} is out of range; allowed: {allowed}{limit}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not allowed; choose one of {choices}")


def parse_preserve(preserve) -> Tuple[str, ...]:
    """Normalise a preservation policy to a sorted tuple of policy names.

    Accepts ``None``/``"none"``/``""``/``()`` (no preservation), one name such
    as ``"kvsink"``, a ``"+"``-joined union such as ``"pfn+kvsink"``, or an
    iterable of name strings (``"none"`` and ``None`` are not names: an empty
    tuple means no preservation).
    """
    if preserve is None:
        return ()
    if isinstance(preserve, (bytes, bytearray)):
        raise ValueError(f"preserve must be a str, not {type(preserve).__name__} ({preserve!r}); "
                         "decode it first, e.g. preserve=value.decode()")
    if isinstance(preserve, str):
        text = preserve.strip().lower()
        if text in ("", "none"):
            return ()
        names = [p.strip() for p in text.split("+")]
    else:
        try:
            items = list(preserve)
        except TypeError:
            raise ValueError(
                f"preserve must be 'none', a policy name, a '+'-joined union such as "
                f"'pfn+kvsink' or a tuple of names from {POLICIES}; got {preserve!r}") from None
        for p in items:
            if not isinstance(p, str):
                raise ValueError(f"preserve: a tuple of policies holds names (str) from {POLICIES}; "
                                 f"got {p!r} ({type(p).__name__}) in {preserve!r}; use () for none")
        names = [p.strip().lower() for p in items]
    if "none" in names:
        raise ValueError(f"preserve: 'none' means no preservation only on its own, not inside "
                         f"{preserve!r}; use preserve='none' or (), or names from {POLICIES}")
    for name in names:
        if name not in POLICIES:
            raise ValueError(
                f"preserve: unknown policy {name!r}; allowed: 'none' or a '+'-joined "
                f"union of {POLICIES}, e.g. 'pfn+kvsink'")
    if len(set(names)) != len(names):
        raise ValueError(f"preserve: policy named twice in {preserve!r}")
    return tuple(sorted(names))


@dataclass(frozen=True)
class KVSinkConfig:
    """Quantization and preservation settings of a KV cache (docs/07-config.md).

    Quantization
        key_bits, value_bits : int in 1..8 (symmetric scheme: 2..8).
        key_group_size, value_group_size : int in 1..MAX_GROUP_SIZE (2**16).  Elements per group: along
            the head dimension for axis "token", consecutive tokens for axis
            "channel".
        key_axis, value_axis : "channel" or "token" (KIVI: keys per channel,
            values per token).
        scheme : "asymmetric" (min/max with zero point) or "symmetric" (absmax).
        quantizer : "uniform" (KIVI-style) or "kvquant" (KVQuant-style).
        residual_length : int in 0..MAX_RESIDUAL_LENGTH (2**24), the R most recent tokens kept at full
            precision; older tokens are quantized ``token_block`` at a time.

    Preservation
        preserve : tuple of policy names from ("pfn", "kvsink", "oracle"); the
            union of their sets is kept at full precision.  A string such as
            "pfn+kvsink" or "none" is accepted and normalised.
        preserve_first_n : int >= 0, N of Preserve-First-N.
        max_preserved : None or int >= 0, cap on preserved tokens per sequence
            (earliest positions win).
        predictor_layer : None or int >= 0, index into the model's hidden
            states (0 = embeddings, l = output of decoder layer l-1) read by the
            KVSink predictor.  None = calibrate from the model.
        predictor_channels : tuple of int >= 0, the stable outlier channels.
        predictor_threshold : None or float > 0, a token is a sink when
            max over channels |h[t, c]| > threshold.
        oracle_ratio : float > 1, attention-oracle threshold in multiples of
            uniform attention.

    KVQuant-style (used when quantizer == "kvquant", docs/08-kvquant.md)
        outlier_fraction : float in [0, 0.5), share of entries kept sparse.
        kvquant_datatype : "nf" (fixed normal-float grid) or "kmeans".
    """

    key_bits: int = 2
    value_bits: int = 2
    key_group_size: int = 32
    value_group_size: int = 32
    key_axis: str = "channel"
    value_axis: str = "token"
    scheme: str = "asymmetric"
    quantizer: str = "uniform"
    residual_length: int = 128
    preserve: Union[str, Tuple[str, ...]] = ("kvsink",)
    preserve_first_n: int = 1
    max_preserved: Optional[int] = None
    predictor_layer: Optional[int] = None
    predictor_channels: Tuple[int, ...] = ()
    predictor_threshold: Optional[float] = None
    oracle_ratio: float = 8.0
    outlier_fraction: float = 0.01
    kvquant_datatype: str = "nf"

    def __post_init__(self):
        """Validate (and normalise) every field, one group at a time, in field order."""
        self._check_quantization()
        self._check_window()
        self._check_preservation()
        self._check_predictor()
        self._check_oracle()
        self._check_kvquant()
        self._check_token_block()

    def _check_quantization(self):
        """scheme, bits, group sizes, axes and quantizer kind (docs/07-config.md 7.1)."""
        _check_choice("scheme", self.scheme, SCHEMES)
        for name in ("key_bits", "value_bits"):
            bits = getattr(self, name)
            _check_int(name, bits, 1, 8)
            if self.scheme == "symmetric" and bits < 2:
                raise ValueError(
                    f"{name}={bits} is not allowed with scheme='symmetric': the symmetric "
                    "grid (q - M) * s with M = 2**(bits-1) - 1 needs bits >= 2 (M = 0 at 1 bit); "
                    "use bits 2..8 or scheme='asymmetric'")
        for name in ("key_group_size", "value_group_size"):
            _check_int(name, getattr(self, name), 1, MAX_GROUP_SIZE,
                       " (MAX_GROUP_SIZE = 2**16; a group of the whole axis needs only the axis' length)")
        _check_choice("key_axis", self.key_axis, AXES)
        _check_choice("value_axis", self.value_axis, AXES)
        _check_choice("quantizer", self.quantizer, QUANTIZERS)

    def _check_window(self):
        """residual_length: 0..MAX_RESIDUAL_LENGTH."""
        _check_int("residual_length", self.residual_length, 0, MAX_RESIDUAL_LENGTH,
                   " (MAX_RESIDUAL_LENGTH = 2**24 tokens, the longest sequence the spec covers)")

    def _check_preservation(self):
        """preserve (normalised by :func:`parse_preserve`), preserve_first_n, max_preserved."""
        object.__setattr__(self, "preserve", parse_preserve(self.preserve))
        _check_int("preserve_first_n", self.preserve_first_n, 0)
        if "pfn" in self.preserve and self.preserve_first_n == 0:
            raise ValueError("preserve_first_n=0 with policy 'pfn' preserves nothing; "
                             "set preserve_first_n >= 1 or drop 'pfn' from preserve")
        if self.max_preserved is not None:
            _check_int("max_preserved", self.max_preserved, 0)

    def _check_predictor(self):
        """predictor_layer, predictor_channels (normalised to a tuple), predictor_threshold."""
        if self.predictor_layer is not None:
            _check_int("predictor_layer", self.predictor_layer, 0)
        if not isinstance(self.predictor_channels, (tuple, list)):
            raise ValueError("predictor_channels must be a tuple of ints, got "
                             f"{self.predictor_channels!r}")
        channels = tuple(self.predictor_channels)
        for c in channels:
            _check_int("predictor_channels[i]", c, 0)
        if len(set(channels)) != len(channels):
            raise ValueError(f"predictor_channels has repeated channels: {channels}")
        object.__setattr__(self, "predictor_channels", channels)
        if self.predictor_threshold is not None:
            t = self.predictor_threshold
            if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or t <= 0:
                raise ValueError(f"predictor_threshold must be a finite float > 0, got {t!r}")
            object.__setattr__(self, "predictor_threshold", float(t))

    def _check_oracle(self):
        """oracle_ratio: a finite float > 1."""
        r = self.oracle_ratio
        if isinstance(r, bool) or not isinstance(r, (int, float)) or not math.isfinite(r) or r <= 1:
            raise ValueError(f"oracle_ratio must be a finite float > 1, got {r!r}")

    def _check_kvquant(self):
        """outlier_fraction in [0, 0.5) and kvquant_datatype (docs/08-kvquant.md)."""
        f = self.outlier_fraction
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (0 <= f < 0.5):
            raise ValueError(f"outlier_fraction must be a float in [0, 0.5), got {f!r}")
        _check_choice("kvquant_datatype", self.kvquant_datatype, ("nf", "kmeans"))

    def _check_token_block(self):
        """Both sides grouped per channel share one token block: equal group sizes."""
        if self.key_axis == "channel" and self.value_axis == "channel" \
                and self.key_group_size != self.value_group_size:
            raise ValueError(
                "key_group_size and value_group_size must be equal when both key_axis and "
                f"value_axis are 'channel' (got {self.key_group_size} and "
                f"{self.value_group_size}): both are the token block that is flushed at once")

    @property
    def token_block(self) -> int:
        """Tokens quantized at once when the residual window is flushed.

        The group size of whichever side is grouped per channel (along tokens);
        1 when both sides are grouped per token.
        """
        if self.key_axis == "channel":
            return self.key_group_size
        if self.value_axis == "channel":
            return self.value_group_size
        return 1

    @property
    def predictor_ready(self) -> bool:
        """True when the KVSink predictor is fully specified (no calibration needed)."""
        return (self.predictor_layer is not None and len(self.predictor_channels) > 0
                and self.predictor_threshold is not None)

    def replace(self, **changes) -> "KVSinkConfig":
        """A copy with some fields changed, validated again."""
        from dataclasses import replace
        return replace(self, **changes)
