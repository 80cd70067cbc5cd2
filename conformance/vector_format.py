"""The building blocks of the golden vectors (conformance/make_vectors.py, docs/13-conformance.md):
exact input generators, the :class:`Case` record and its manifest entry, config and KVQuant
arrays to and from a case.  Everything here uses exact arithmetic only (make_vectors' docstring)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Dict

import numpy as np

from reference import kvquant as rkv
from reference.config import KVSinkConfig

from .adapter import round_to_bfloat16


def sha256(a: np.ndarray) -> str:
    a = np.ascontiguousarray(a)
    if a.dtype.byteorder == ">":
        a = a.astype(a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.tobytes()).hexdigest()


def dtype_str(a: np.ndarray) -> str:
    return a.dtype.newbyteorder("<").str if a.dtype.itemsize > 1 else a.dtype.str


def normalish(rs: np.random.RandomState, shape) -> np.ndarray:
    """Near-normal float64 values, exactly: the sum of 4 uniform integers in [-256, 256) over 2^8
    (Irwin-Hall; mean 0, standard deviation 1.15), multiples of 2^-8 below 2^3 in magnitude.
    Integer draws and one exact division: the same bits on every numpy and CPU."""
    return rs.randint(-256, 256, size=(4,) + tuple(shape)).sum(axis=0) / 2.0**8


def kv(rs: np.random.RandomState, shape, *, outliers=True) -> np.ndarray:
    """Near-normal values (:func:`normalish`) with channel offsets and, like real models, 2 outlier
    channels x100-x1000 on 2 tokens; every value a multiple of 2^-8, exact in float32."""
    x = normalish(rs, shape) + normalish(rs, shape[-1:])
    if outliers and shape[-2] >= 2 and shape[-1] >= 2:
        ch = rs.choice(shape[-1], 2, replace=False)
        tok = rs.choice(shape[-2], 2, replace=False)
        x[..., tok[:, None], ch[None, :]] *= rs.choice([100.0, 300.0, 1000.0])
    return np.clip(x, -1e4, 1e4).astype(np.float32)


class Case:
    def __init__(self, name: str, function: str, params: dict):
        self.name, self.function, self.params = name, function, params
        self.arrays: Dict[str, np.ndarray] = {}
        self.roles: Dict[str, str] = {}

    def inp(self, name, a):
        self.arrays[name], self.roles[name] = np.array(a, order="C"), "input"
        return a

    def out(self, name, a):
        self.arrays[name], self.roles[name] = np.array(a, order="C"), "expected"
        return a

    def manifest(self) -> dict:
        return {"name": self.name, "function": self.function, "file": f"{self.name}.npz",
                "params": self.params,
                "arrays": {k: {"role": self.roles[k], "shape": list(v.shape), "dtype": dtype_str(v),
                               "sha256": sha256(v)} for k, v in self.arrays.items()}}


def config_dict(cfg: KVSinkConfig) -> dict:
    d = dataclasses.asdict(cfg)
    d["preserve"] = list(d["preserve"])
    d["predictor_channels"] = list(d["predictor_channels"])
    return d


def config_from_dict(d: dict) -> KVSinkConfig:
    d = dict(d)
    d["preserve"] = tuple(d["preserve"])
    d["predictor_channels"] = tuple(d["predictor_channels"])
    return KVSinkConfig(**d)



# --------------------------------------------------------------------------- kvquant (docs/08)

def kvquant_calibration(rs, cfg: KVSinkConfig, h: int, d: int, t: int = 24):
    """A layer calibration (definition 8.9) from calibration text drawn with ``rs``: 2 rows of
    ``t`` tokens, the first token of each excluded (its sink); random Fisher weights for k-means."""
    keys, values = kv(rs, (2, h, t, d)), kv(rs, (2, h, t, d))
    exclude = np.zeros((2, t), bool)
    exclude[:, 0] = True
    fisher = {}
    if cfg.kvquant_datatype == "kmeans":
        r_k, r_v = rs.rand(2, h, t, d), rs.rand(2, h, t, d)     # dyadic; IEEE products
        fisher = dict(key_fisher=r_k * r_k, value_fisher=r_v * r_v)
    return rkv.calibrate_kvquant(keys, values, cfg, exclude=exclude, **fisher)


def calibration_arrays(c: Case, cal) -> None:
    """A ``KVQuantCalibration`` as input arrays ``calibration_*`` (its settings are the config's)."""
    for name in ("key_lower", "key_upper", "key_levels", "value_levels"):
        c.inp(f"calibration_{name}", getattr(cal, name))


def calibration_from_arrays(cfg: KVSinkConfig, a: dict):
    """The ``reference.kvquant.KVQuantCalibration`` of a case's ``calibration_*`` arrays."""
    return rkv.KVQuantCalibration(
        key_lower=a["calibration_key_lower"], key_upper=a["calibration_key_upper"],
        key_levels=a["calibration_key_levels"], value_levels=a["calibration_value_levels"],
        datatype=cfg.kvquant_datatype, key_bits=cfg.key_bits, value_bits=cfg.value_bits,
        outlier_fraction=float(cfg.outlier_fraction), key_group_size=cfg.key_group_size,
        value_group_size=cfg.value_group_size)


def kvquant_tensor_arrays(c: Case, prefix: str, qt) -> None:
    """Expected arrays of a ``KVQuantTensor``: ``<prefix>_codes`` (uint8, unpacked), ``_scale``,
    ``_centre`` (float32), ``_outlier_index`` (int32), ``_outlier_value`` (float32 / float16),
    ``_words`` (uint32, packed along D)."""
    c.out(f"{prefix}_codes", qt.codes)
    c.out(f"{prefix}_scale", qt.scale)
    c.out(f"{prefix}_centre", qt.centre)
    c.out(f"{prefix}_outlier_index", qt.outlier_index)
    c.out(f"{prefix}_outlier_value", qt.outlier_value)
    c.out(f"{prefix}_words", qt.packed())


def kvquant_tensor_from_arrays(a: dict, prefix: str, levels, bits: int, group_size: int, axis: str):
    """The reference ``KVQuantTensor`` of a case's ``<prefix>_*`` arrays."""
    codes = a[f"{prefix}_codes"]
    return rkv.KVQuantTensor(codes=codes, scale=a[f"{prefix}_scale"], centre=a[f"{prefix}_centre"],
                             levels=levels, outlier_index=a[f"{prefix}_outlier_index"],
                             outlier_value=a[f"{prefix}_outlier_value"], bits=bits,
                             group_size=group_size, axis=axis, shape=tuple(codes.shape))


def cast_input(x32: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "float16":
        return x32.astype(np.float16)
    if dtype == "bfloat16":
        return round_to_bfloat16(x32)
    if dtype == "float64":
        return x32.astype(np.float64) * (1 + 2.0**-30)
    return x32


def geometric_inv_freq(head_dim: int, ratio: float) -> np.ndarray:
    """RoPE frequencies ``ratio**i``, ``i = 0 .. D/2 - 1``, float32 ``(D/2,)``, by repeated float64
    products of a literal ``ratio`` (a stand-in for ``base**(-2/D)``): IEEE products only, so the
    same bits everywhere, where ``base ** (-i / D)`` (a float power) differs across numpy versions
    and CPUs.  Stored as an input of every case that uses it."""
    out, f = [], 1.0
    for _ in range(head_dim // 2):
        out.append(f)
        f *= ratio
    return np.array(out, np.float64).astype(np.float32)


#: ``base**(-2/D)`` to 4 digits for (D, base) = (8, 1e4), (8, 5e5), (64, 5e5)
ROPE_RATIO = {(8, 10000.0): 0.1, (8, 500000.0): 0.03761, (64, 500000.0): 0.6636}
