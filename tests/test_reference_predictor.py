"""Unit tests of reference/predictor.py (docs/04-predictor.md)."""

import math
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from reference.config import KVSinkConfig
from reference.predictor import (
    DEFAULT_OUTLIER_RATIO,
    SinkPredictor,
    calibrate_predictor,
    layer_outlier_channels,
    outlier_scores,
    predict_sinks,
    sink_threshold,
    sink_channels,
    stable_outlier_channels,
    settled_layer,
)

REPO = Path(__file__).resolve().parents[1]
WIKITEXT = REPO.parent / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"
FALLBACK_TEXT = REPO / "accelerated" / "data" / "default_corpus.txt"


# ---------------------------------------------------------------- online rule

def test_outlier_scores_hand_example():
    h = np.array([[1.0, -5.0, 2.0],
                  [-7.0, 0.5, 3.0]], dtype=np.float32)
    np.testing.assert_array_equal(outlier_scores(h, (0, 2)), [2.0, 7.0])
    np.testing.assert_array_equal(outlier_scores(h, [1]), [5.0, 0.5])
    assert outlier_scores(h, [1]).dtype == np.float32


def test_outlier_scores_float64_rounded_to_float32():
    x = 1.0 + 2.0 ** -30                       # not representable in float32
    h = np.array([[x, 0.0]], dtype=np.float64)
    assert outlier_scores(h, [0])[0] == np.float32(1.0)


def test_planted_outlier_is_predicted_and_others_not():
    rng = np.random.default_rng(0)
    h = rng.standard_normal((2, 20, 16)).astype(np.float32)
    h[0, 7, 5] = -900.0
    h[1, 0, 5] = 800.0
    h[1, 3, 9] = 1000.0                        # huge, but not in a predictor channel
    pred = predict_sinks(h, (5,), 100.0)
    expected = np.zeros((2, 20), bool)
    expected[0, 7] = expected[1, 0] = True
    np.testing.assert_array_equal(pred, expected)


def test_threshold_is_strict():
    h = np.array([[3.0, 0.0], [3.5, 0.0]], dtype=np.float32)
    np.testing.assert_array_equal(predict_sinks(h, [0], 3.0), [False, True])


def test_threshold_compared_exactly_not_in_float32():
    # 1 + 2**-30 rounds to 1.0 in float32; the score 1.0 is NOT above it.
    h = np.array([[1.0]], dtype=np.float32)
    assert not predict_sinks(h, [0], 1.0 + 2.0 ** -30)[0]
    assert predict_sinks(h, [0], 1.0 - 2.0 ** -30)[0]


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 12), st.integers(0, 2**32 - 1))
def test_prediction_per_token_prefix_property(prefix, seed):
    rng = np.random.default_rng(seed)
    h = (rng.standard_normal((12, 8)) * rng.choice([1.0, 50.0], size=(12, 1))).astype(np.float32)
    full = predict_sinks(h, (1, 6), 30.0)
    np.testing.assert_array_equal(predict_sinks(h[:prefix], (1, 6), 30.0), full[:prefix])
    one_by_one = [predict_sinks(h[t:t + 1], (1, 6), 30.0)[0] for t in range(12)]
    np.testing.assert_array_equal(one_by_one, full)


def test_online_rule_bad_inputs():
    h = np.zeros((4, 8), np.float32)
    with pytest.raises(ValueError, match="channels"):
        outlier_scores(h, [8])
    with pytest.raises(ValueError, match="channels"):
        outlier_scores(h, [-1])
    with pytest.raises(ValueError, match="channels"):
        outlier_scores(h, [])
    with pytest.raises(ValueError, match="channels"):
        outlier_scores(h, [1, 1])
    with pytest.raises(ValueError, match="hidden"):
        outlier_scores(np.zeros(8, np.float32), [0])
    bad = h.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="hidden"):
        outlier_scores(bad, [0])
    with pytest.raises(TypeError, match="hidden"):
        outlier_scores(h.astype(int), [0])
    for t in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="threshold"):
            predict_sinks(h, [0], t)


# ---------------------------------------------------------------- SinkPredictor

def test_sink_predictor_roundtrip_through_config():
    p = SinkPredictor(3, [507, 12], 306.5)
    assert p.channels == (507, 12) and isinstance(p.threshold, float)
    cfg = p.apply_to(KVSinkConfig())
    assert cfg.predictor_ready
    assert (cfg.predictor_layer, cfg.predictor_channels, cfg.predictor_threshold) == (3, (507, 12), 306.5)
    assert SinkPredictor.from_config(cfg) == p
    assert KVSinkConfig(**p.config_fields()).predictor_layer == 3
    with pytest.raises(ValueError, match="predictor"):
        SinkPredictor.from_config(KVSinkConfig())


def test_sink_predictor_validates():
    with pytest.raises(ValueError, match="layer"):
        SinkPredictor(-1, (0,), 1.0)
    with pytest.raises(ValueError, match="channels"):
        SinkPredictor(1, (), 1.0)
    with pytest.raises(ValueError, match="threshold"):
        SinkPredictor(1, (0,), 0.0)
    p = SinkPredictor(1, (2,), 10.0)
    with pytest.raises(Exception):
        p.layer = 2                               # frozen
    h = np.zeros((3, 4), np.float32)
    h[1, 2] = 11.0
    np.testing.assert_array_equal(p.predict(h), [False, True, False])


# ---------------------------------------------------------------- calibration

def synthetic_hidden_states(num_layers=12, t=200, c=32, channels=(5, 17), start=3,
                            sinks=(0, 41, 97), seed=0):
    """Gaussian hidden states; from layer `start` on, the sink tokens carry
    |h| = 2000 in `channels`; one decoy channel spikes at a single layer."""
    rng = np.random.default_rng(seed)
    states = []
    for l in range(num_layers + 1):
        h = rng.standard_normal((t, c)).astype(np.float32)
        if l >= start:
            for ch in channels:
                h[list(sinks), ch] = 2000.0 * np.where(np.arange(len(sinks)) % 2, -1, 1)
        if l == 1:
            h[5, 9] = 5000.0                       # not stable: one layer only
        states.append(h)
    return states


def test_layer_outlier_channels():
    rng = np.random.default_rng(1)
    h = rng.standard_normal((50, 10)).astype(np.float32)
    med = np.median(np.abs(h).astype(np.float64))
    h[3, 4] = 1000.0 * med
    h[8, 7] = -20.0 * med
    np.testing.assert_array_equal(layer_outlier_channels(h, 100.0), [4])
    np.testing.assert_array_equal(layer_outlier_channels(h, 10.0), [4, 7])
    # a batch axis and a padding mask: the outlier sits on a padding token
    hb = np.stack([h, h])
    valid = np.ones((2, 50), bool)
    valid[:, 3] = False
    np.testing.assert_array_equal(layer_outlier_channels(hb, 100.0, valid=valid), [])
    with pytest.raises(ValueError, match="ratio"):
        layer_outlier_channels(h, 1.0)


def test_calibration_recovers_planted_channels_and_layer():
    states = synthetic_hidden_states()
    layer, channels = stable_outlier_channels(states, 300.0)
    assert (layer, channels) == (3, (5, 17))
    p = calibrate_predictor(states)
    assert p.layer == 3 and p.channels == (5, 17)
    np.testing.assert_array_equal(np.flatnonzero(p.predict(states[3])), [0, 41, 97])
    # ratio * median |h| of the layer (Definition 4.5)
    med = float(np.median(np.abs(states[3]).astype(np.float64)))
    assert p.threshold == DEFAULT_OUTLIER_RATIO * med


def test_calibration_batch_equals_concatenation():
    states = synthetic_hidden_states()
    batched = [np.stack([h[:100], h[100:]]) for h in states]
    assert calibrate_predictor(batched) == calibrate_predictor(states)


def test_calibration_needs_window_of_consecutive_layers():
    states = synthetic_hidden_states(start=3)
    # layer 1's decoy becomes stable only with window 1
    assert stable_outlier_channels(states, 300.0, window=1) == (1, (9,))
    assert stable_outlier_channels(states, 300.0, window=2)[0] == 3


def test_calibration_moves_to_the_layer_where_the_outlier_settles():
    # the planted channels emerge at layer 3 with |h| = 400 (already > 300 x median),
    # jump to 2000 at layer 4 and stay: the earliest layer is 3, the settled one 4
    states = synthetic_hidden_states(start=3)
    for ch in (5, 17):
        states[3][[0, 41, 97], ch] = 400.0
    assert stable_outlier_channels(states, 300.0)[0] == 3
    assert settled_layer(states, 3, (5, 17)) == 4
    assert settled_layer(states, 3, (5, 17), growth=10.0) == 3     # 2000 / 400 = 5 < 10
    assert settled_layer(states, 3, (5, 17), growth=math.inf) == 3
    p = calibrate_predictor(states)
    assert p.layer == 4
    med = float(np.median(np.abs(states[4]).astype(np.float64)))
    assert p.threshold == DEFAULT_OUTLIER_RATIO * med
    assert calibrate_predictor(states, growth=math.inf).layer == 3
    # a channel that stops being an outlier blocks the move, however large the jump
    states[4][[0, 41, 97], 5] = 0.5
    assert settled_layer(states, 3, (5, 17)) == 3
    with pytest.raises(ValueError, match="growth"):
        settled_layer(states, 3, (5, 17), growth=1.0)
    with pytest.raises(ValueError, match="layer"):
        settled_layer(states, 13, (5, 17))


def test_calibration_fails_without_stable_outlier():
    rng = np.random.default_rng(2)
    states = [rng.standard_normal((64, 16)).astype(np.float32) for _ in range(9)]
    with pytest.raises(ValueError, match="ratio"):
        calibrate_predictor(states)
    # an outlier run shorter than the window does not count; a late one that fits does
    for l in range(7, 9):
        states[l][0, 3] = 1e5
    with pytest.raises(ValueError, match="window=3"):
        calibrate_predictor(states, window=3)
    assert stable_outlier_channels(states, 300.0, window=2) == (7, (3,))


def test_sink_channels_leave_out_dense_channels():
    rng = np.random.default_rng(3)
    h = rng.standard_normal((100, 16)).astype(np.float32)
    med = float(np.median(np.abs(h).astype(np.float64)))
    h[:20, 2] = 1000.0 * med          # 20 % of the tokens: dense
    h[[0, 9, 50], 7] = 1000.0 * med   # 3 %: sparse
    np.testing.assert_array_equal(layer_outlier_channels(h, 300.0), [2, 7])
    np.testing.assert_array_equal(sink_channels(h, 300.0), [7])
    np.testing.assert_array_equal(sink_channels(h, 300.0, 1.0), [2, 7])
    np.testing.assert_array_equal(sink_channels(h, 300.0, 0.02), [])
    # one token is always allowed, however short the text
    np.testing.assert_array_equal(sink_channels(h[:5], 300.0, 0.05), [7])     # 1 of 5 tokens
    for bad in (0.0, 1.5, True, "x"):
        with pytest.raises(ValueError, match="max_fraction"):
            sink_channels(h, 300.0, bad)


def gemma_like_hidden_states(t=200, c=32, seed=4):
    """Gemma-3-270M's pattern (docs/04-predictor.md §4.10), 12 decoder layers: channel 3 is an
    outlier at layers 1-5 on 30 % of the tokens (dense); channel 11 carries |h| = 5000 on the
    sinks 0 and 120 only from layer 8 on, past the middle layer."""
    rng = np.random.default_rng(seed)
    states = []
    for l in range(13):
        h = rng.standard_normal((t, c)).astype(np.float32)
        if 1 <= l <= 5:
            h[::3, 3] = 2000.0
        if l >= 8:
            h[[0, 120], 11] = 5000.0
        states.append(h)
    return states


def test_calibration_skips_a_dense_early_outlier_channel():
    states = gemma_like_hidden_states()
    # Definition 4.4 without the sparsity condition takes the dense channel at layer 1
    assert stable_outlier_channels(states, 300.0, max_fraction=1.0) == (1, (3,))
    p = calibrate_predictor(states)
    assert (p.layer, p.channels) == (8, (11,))
    np.testing.assert_array_equal(np.flatnonzero(p.predict(states[8])), [0, 120])
    assert calibrate_predictor(states, max_fraction=1.0).predict(states[1]).sum() == 67


def test_sink_threshold_rule_and_errors():
    h = np.arange(1, 10, dtype=np.float32).reshape(3, 3)      # median 5
    assert sink_threshold(h, 10.0) == 50.0
    with pytest.raises(ValueError, match="median"):
        sink_threshold(np.zeros((4, 4), np.float32), 10.0)


def test_calibration_bad_inputs():
    states = synthetic_hidden_states(num_layers=4)
    with pytest.raises(ValueError, match="hidden_states"):
        calibrate_predictor(states[:1])
    bad = list(states)
    bad[2] = bad[2].copy()
    bad[2][0, 0] = np.nan
    with pytest.raises(ValueError, match=r"hidden_states\[2\]"):
        calibrate_predictor(bad)
    bad = list(states)
    bad[3] = bad[3][:, :10]
    with pytest.raises(ValueError, match="channels"):
        calibrate_predictor(bad)
    with pytest.raises(ValueError, match="window"):
        calibrate_predictor(states, window=0)
    with pytest.raises(ValueError, match="valid"):
        calibrate_predictor(states, valid=np.ones(7, bool))


# ---------------------------------------------------------------- the real model

@pytest.mark.model
@pytest.mark.slow
def test_calibration_on_smollm2():
    """docs/04-predictor.md §4.8: calibrated on WikiText-2 (or the fallback text)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from accelerated.models import load_model
    from reference.preserve import oracle_scores

    try:
        model, tok = load_model(attn_implementation="eager")
    except (FileNotFoundError, OSError) as exc:
        pytest.skip(f"SmolLM2-135M could not be loaded: {exc}")
    on_wikitext = WIKITEXT.exists()
    text = (WIKITEXT if on_wikitext else FALLBACK_TEXT).read_text(encoding="utf-8")
    ids = tok(text[:20000], return_tensors="pt").input_ids[:, :1024]
    assert ids.shape[1] == 1024
    with torch.no_grad():
        out = model(ids, output_hidden_states=True, output_attentions=True)
    hidden = [h[0].float().numpy() for h in out.hidden_states]

    p = calibrate_predictor(hidden)
    assert p.layer == 3
    assert 507 in p.channels
    pred = p.predict(hidden[p.layer])
    assert pred[0]
    # the oracle: attention of all 30 layers pooled (Definition 3.2), ratio 8
    scores = np.mean([oracle_scores(a.float().numpy())[0] for a in out.attentions], axis=0)
    oracle = scores >= 8.0
    assert np.all(pred[oracle]), "a sink of the attention oracle is not predicted (recall < 1)"
    assert pred.sum() <= 0.02 * pred.size          # measured: 10 of 1024 (WikiText-2)
    if on_wikitext:
        assert pred[[0, 31, 37]].all()
        np.testing.assert_array_equal(np.flatnonzero(oracle), [0, 31, 37])
