"""Validation of KVSinkConfig (docs/07-config.md): every bad field raises ValueError naming it."""

import dataclasses
import math

import pytest

from reference.config import AXES, POLICIES, KVSinkConfig, parse_preserve


def raises_naming(field, **kwargs):
    with pytest.raises(ValueError) as info:
        KVSinkConfig(**kwargs)
    assert field in str(info.value), f"message does not name {field!r}: {info.value}"
    return str(info.value)


def test_defaults_are_valid_and_documented_values():
    c = KVSinkConfig()
    assert (c.key_bits, c.value_bits) == (2, 2)
    assert (c.key_group_size, c.value_group_size) == (32, 32)
    assert (c.key_axis, c.value_axis) == ("channel", "token")
    assert c.scheme == "asymmetric" and c.quantizer == "uniform"
    assert c.residual_length == 128
    assert c.preserve == ("kvsink",)
    assert c.preserve_first_n == 1 and c.max_preserved is None
    assert c.predictor_layer is None and c.predictor_channels == () and c.predictor_threshold is None
    assert c.oracle_ratio == 8.0 and c.outlier_fraction == 0.01 and c.kvquant_datatype == "nf"
    assert c.token_block == 32
    assert not c.predictor_ready


@pytest.mark.parametrize("field", ["key_bits", "value_bits"])
@pytest.mark.parametrize("bits", [0, 9, -1, 100])
def test_bits_out_of_range(field, bits):
    raises_naming(field, **{field: bits})


@pytest.mark.parametrize("field", ["key_bits", "value_bits"])
@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_bits_in_range_asymmetric(field, bits):
    assert getattr(KVSinkConfig(**{field: bits}), field) == bits


@pytest.mark.parametrize("field", ["key_bits", "value_bits"])
def test_symmetric_needs_two_bits(field):
    msg = raises_naming(field, **{field: 1, "scheme": "symmetric"})
    assert "symmetric" in msg
    assert getattr(KVSinkConfig(**{field: 2, "scheme": "symmetric"}), field) == 2


@pytest.mark.parametrize("field", ["key_bits", "value_bits", "key_group_size", "value_group_size",
                                   "residual_length", "preserve_first_n"])
@pytest.mark.parametrize("bad", [2.0, "4", True, None])
def test_int_fields_reject_non_int(field, bad):
    raises_naming(field, **{field: bad})


@pytest.mark.parametrize("field", ["key_group_size", "value_group_size"])
@pytest.mark.parametrize("size", [0, -4])
def test_group_size_positive(field, size):
    raises_naming(field, **{field: size})


def test_group_size_one_is_allowed():
    c = KVSinkConfig(key_group_size=1, value_group_size=1)
    assert c.token_block == 1


@pytest.mark.parametrize("field", ["key_axis", "value_axis"])
@pytest.mark.parametrize("bad", ["tokens", "head", "", None, "Channel"])
def test_unknown_axis(field, bad):
    raises_naming(field, **{field: bad})


def test_axes_accepted():
    for ka in AXES:
        for va in AXES:
            c = KVSinkConfig(key_axis=ka, value_axis=va)
            assert (c.key_axis, c.value_axis) == (ka, va)


def test_both_channel_axes_need_equal_group_sizes():
    msg = raises_naming("key_group_size", key_axis="channel", value_axis="channel",
                        key_group_size=32, value_group_size=16)
    assert "value_group_size" in msg
    c = KVSinkConfig(key_axis="channel", value_axis="channel", key_group_size=16,
                     value_group_size=16)
    assert c.token_block == 16


@pytest.mark.parametrize("kwargs,block", [
    (dict(key_axis="channel", key_group_size=32, value_axis="token", value_group_size=64), 32),
    (dict(key_axis="token", key_group_size=32, value_axis="channel", value_group_size=8), 8),
    (dict(key_axis="token", key_group_size=16, value_axis="token", value_group_size=64), 1),
    (dict(key_axis="channel", key_group_size=4, value_axis="channel", value_group_size=4), 4),
])
def test_token_block(kwargs, block):
    assert KVSinkConfig(**kwargs).token_block == block


@pytest.mark.parametrize("bad", ["sym", "", None, "Asymmetric"])
def test_unknown_scheme(bad):
    raises_naming("scheme", scheme=bad)


@pytest.mark.parametrize("bad", ["kivi", "", None])
def test_unknown_quantizer(bad):
    raises_naming("quantizer", quantizer=bad)


@pytest.mark.parametrize("bad", [-1, -128])
def test_residual_length_nonnegative(bad):
    raises_naming("residual_length", residual_length=bad)


def test_residual_length_zero_allowed():
    assert KVSinkConfig(residual_length=0).residual_length == 0


@pytest.mark.parametrize("text,parsed", [
    ("pfn+kvsink", ("kvsink", "pfn")),
    ("kvsink+pfn", ("kvsink", "pfn")),
    (" PFN + KVSink ", ("kvsink", "pfn")),
    ("none", ()),
    ("None", ()),
    ("", ()),
    (None, ()),
    ((), ()),
    ("oracle", ("oracle",)),
    (["oracle", "pfn"], ("oracle", "pfn")),
    ("pfn+kvsink+oracle", ("kvsink", "oracle", "pfn")),
])
def test_parse_preserve(text, parsed):
    assert parse_preserve(text) == parsed
    assert KVSinkConfig(preserve=text).preserve == parsed


@pytest.mark.parametrize("bad", ["sink", "pfn+", "pfn+sink", "pfn,kvsink", ["pfn", "h2o"], 5,
                                 "pfn+pfn", ("kvsink", "kvsink")])
def test_unknown_or_repeated_policy(bad):
    raises_naming("preserve", preserve=bad)


def test_policy_names_are_the_documented_ones():
    assert POLICIES == ("pfn", "kvsink", "oracle")


@pytest.mark.parametrize("bad", [-1, 1.0, True])
def test_preserve_first_n(bad):
    raises_naming("preserve_first_n", preserve_first_n=bad)


def test_pfn_with_zero_first_n_preserves_nothing():
    raises_naming("preserve_first_n", preserve="pfn", preserve_first_n=0)
    # Without the pfn policy, 0 is allowed (the field is unused).
    assert KVSinkConfig(preserve="kvsink", preserve_first_n=0).preserve_first_n == 0


@pytest.mark.parametrize("bad", [-1, 2.5, True, "3"])
def test_max_preserved(bad):
    raises_naming("max_preserved", max_preserved=bad)


@pytest.mark.parametrize("ok", [None, 0, 1, 1000])
def test_max_preserved_ok(ok):
    assert KVSinkConfig(max_preserved=ok).max_preserved == ok


@pytest.mark.parametrize("bad", [-1, 1.0, True])
def test_predictor_layer(bad):
    raises_naming("predictor_layer", predictor_layer=bad)


@pytest.mark.parametrize("bad", [5, "507", (1, 1), (-1,), (1.0,), (True,), {507}])
def test_predictor_channels(bad):
    raises_naming("predictor_channels", predictor_channels=bad)


def test_predictor_channels_list_becomes_tuple():
    c = KVSinkConfig(predictor_channels=[507, 3])
    assert c.predictor_channels == (507, 3)
    hash(c)  # frozen and hashable


@pytest.mark.parametrize("bad", [0, -1.0, 0.0, math.nan, math.inf, "100", True])
def test_predictor_threshold(bad):
    raises_naming("predictor_threshold", predictor_threshold=bad)


def test_predictor_threshold_int_becomes_float_and_ready():
    c = KVSinkConfig(predictor_layer=4, predictor_channels=(507,), predictor_threshold=200)
    assert isinstance(c.predictor_threshold, float) and c.predictor_threshold == 200.0
    assert c.predictor_ready
    assert not KVSinkConfig(predictor_layer=4, predictor_channels=(507,)).predictor_ready
    assert not KVSinkConfig(predictor_layer=4, predictor_threshold=1.0).predictor_ready
    assert not KVSinkConfig(predictor_channels=(507,), predictor_threshold=1.0).predictor_ready


@pytest.mark.parametrize("bad", [1.0, 0.5, 0, -2.0, math.nan, math.inf, "8", True])
def test_oracle_ratio(bad):
    raises_naming("oracle_ratio", oracle_ratio=bad)


@pytest.mark.parametrize("bad", [-0.01, 0.5, 0.9, math.nan, math.inf, "0.01", True])
def test_outlier_fraction(bad):
    raises_naming("outlier_fraction", outlier_fraction=bad)


def test_outlier_fraction_zero_allowed():
    assert KVSinkConfig(outlier_fraction=0.0).outlier_fraction == 0.0


@pytest.mark.parametrize("bad", ["NF", "kmean", "", None])
def test_kvquant_datatype(bad):
    raises_naming("kvquant_datatype", kvquant_datatype=bad)


def test_frozen():
    c = KVSinkConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.key_bits = 4
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.preserve = ("pfn",)


def test_equal_configs_hash_equal():
    a = KVSinkConfig(preserve="pfn+kvsink", predictor_channels=[507])
    b = KVSinkConfig(preserve=("kvsink", "pfn"), predictor_channels=(507,))
    assert a == b and hash(a) == hash(b)


def test_replace_validates_again():
    c = KVSinkConfig()
    d = c.replace(key_bits=4)
    assert d.key_bits == 4 and c.key_bits == 2
    with pytest.raises(ValueError, match="key_bits"):
        c.replace(key_bits=0)
    with pytest.raises(ValueError, match="value_bits"):
        c.replace(value_bits=1, key_bits=2, scheme="symmetric")


# --------------------------------------------------------------------------- sizes no model could use

@pytest.mark.parametrize("field", ["key_group_size", "value_group_size"])
@pytest.mark.parametrize("size", [(1 << 16) + 1, 10**12])
def test_group_size_above_the_limit_is_refused(field, size):
    kwargs = {field: size}
    if field == "value_group_size":
        kwargs["value_axis"] = "token"
    msg = raises_naming(field, **kwargs)
    assert "MAX_GROUP_SIZE" in msg and "65536" in msg, msg


@pytest.mark.parametrize("size", [(1 << 24) + 1, 10**18])
def test_residual_length_above_the_limit_is_refused(size):
    msg = raises_naming("residual_length", residual_length=size)
    assert "MAX_RESIDUAL_LENGTH" in msg and str(1 << 24) in msg, msg


def test_sizes_at_the_limits_are_allowed():
    from reference.config import MAX_GROUP_SIZE, MAX_RESIDUAL_LENGTH
    assert (MAX_GROUP_SIZE, MAX_RESIDUAL_LENGTH) == (1 << 16, 1 << 24)
    c = KVSinkConfig(key_group_size=MAX_GROUP_SIZE, value_group_size=MAX_GROUP_SIZE,
                     residual_length=MAX_RESIDUAL_LENGTH)
    assert (c.key_group_size, c.residual_length) == (MAX_GROUP_SIZE, MAX_RESIDUAL_LENGTH)


# --------------------------------------------------------------------------- messages that agree with themselves

@pytest.mark.parametrize("bad,says", [
    (["none"], "only on its own"),
    (("pfn", "none"), "only on its own"),
    ("pfn+none", "only on its own"),
    ([None], "NoneType"),
    ([b"pfn"], "bytes"),
    (b"pfn", "decode"),
    (bytearray(b"pfn"), "decode"),
])
def test_preserve_errors_do_not_contradict_themselves(bad, says):
    msg = raises_naming("preserve", preserve=bad)
    assert says in msg, msg
    assert "'112'" not in msg and "unknown policy 'none'" not in msg, msg
