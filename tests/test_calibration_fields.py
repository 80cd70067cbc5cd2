"""accelerated.calibration.calibrate_config fills only the predictor fields a config leaves open."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from accelerated.calibration import calibrate_config  # noqa: E402
from reference import predictor as RP  # noqa: E402
from reference.config import KVSinkConfig  # noqa: E402


@pytest.fixture(scope="module")
def tiny():
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2))
    ids = torch.randint(1, 128, (1, 48), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hidden = model(input_ids=ids, output_hidden_states=True).hidden_states
    return model.eval(), ids, [h[0].float().numpy() for h in hidden]


def test_layer_and_channels_given_threshold_is_definition_4_5(tiny):
    """Layer and channels set by hand, threshold open: tau = ratio x median |h| of that layer."""
    model, ids, hidden = tiny
    cfg = calibrate_config(model, KVSinkConfig(predictor_layer=2, predictor_channels=(5, 9)), ids)
    assert (cfg.predictor_layer, cfg.predictor_channels) == (2, (5, 9))
    assert cfg.predictor_threshold == RP.sink_threshold(hidden[2])      # the same float32 forward


def test_fields_given_are_kept(tiny):
    model, ids, _ = tiny
    cfg = KVSinkConfig(predictor_layer=1, predictor_channels=(3,), predictor_threshold=2.5)
    assert calibrate_config(model, cfg, ids) == cfg
