"""A transformers T5 checkpoint, imported, gives our T5 the logits torch computes."""
import flax.linen as nn
import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from omni_smola.checkpoints import (CheckpointMismatchError, detect_format,  # noqa: E402
                                    flatten, load_hf, load_pretrained)
from omni_smola.checkpoints.hf_safetensors import t5_config_from_hf  # noqa: E402
from omni_smola.models.configs import T5Config  # noqa: E402
from omni_smola.models.t5 import EncoderDecoder  # noqa: E402
from omni_smola.nn import AdapterPlan, AdapterSpec  # noqa: E402

HF_CONFIG = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
                 vocab_size=64, feed_forward_proj="gated-gelu")
ENCODER_TOKENS = np.array([[5, 9, 13, 2, 40, 7, 1, 0, 0], [3, 62, 8, 8, 19, 25, 33, 12, 1]])
DECODER_TOKENS = np.array([[0, 4, 17, 29, 6], [0, 50, 2, 2, 11]])


def _save_hf_t5(directory, tie_word_embeddings, **overrides):
  torch.manual_seed(0)
  config = transformers.T5Config(**{**HF_CONFIG, **overrides},
                                 tie_word_embeddings=tie_word_embeddings)
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.save_pretrained(directory)  # safetensors
  with torch.no_grad():
    outputs = model(input_ids=torch.tensor(ENCODER_TOKENS),
                    attention_mask=torch.tensor(ENCODER_TOKENS > 0),
                    decoder_input_ids=torch.tensor(DECODER_TOKENS))
  return outputs.logits.numpy(), outputs.encoder_last_hidden_state.numpy()


@pytest.fixture(scope="module")
def untied(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("hf_t5_untied"))
  return (directory,) + _save_hf_t5(directory, tie_word_embeddings=False)


def _ours(config, adapter=None):
  model = EncoderDecoder(config, adapters=AdapterPlan(adapter=adapter))
  variables = jax.eval_shape(model.init, jax.random.PRNGKey(0), ENCODER_TOKENS, DECODER_TOKENS)
  return model, variables


def _fresh_lora(abstract):
  """What a fresh init gives an adapter, cheaply (no compiled `init`): A != 0, B = 0."""
  def value(path, s):
    fill = 0.0 if "lora_b" in jax.tree_util.keystr(path) else 0.5
    return np.full(s.shape, fill, s.dtype)
  return jax.tree_util.tree_map_with_path(value, abstract)


def _run(model, variables):
  logits = model.apply(variables, ENCODER_TOKENS, DECODER_TOKENS)
  encoded = model.apply(variables, ENCODER_TOKENS, method=model.encode).encoded
  return np.asarray(logits), np.asarray(encoded)


def test_t5_safetensors_into_an_adapted_model_matches_torch_logits_and_encoder(untied):
  """Backbone from the checkpoint, adapters fresh (B = 0): torch's numbers, exactly."""
  directory, torch_logits, torch_encoded = untied
  assert detect_format(directory) == "hf"
  config = t5_config_from_hf(directory)
  assert config == T5Config(emb_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                            num_encoder_layers=2, num_decoder_layers=2, vocab_size=64)
  adapter = AdapterSpec(kind="lora", rank=2, sites=("mlp/wi_0", "attention/query"))
  model, abstract = _ours(config, adapter)
  variables = load_pretrained(abstract, directory, init_fn=lambda: _fresh_lora(abstract))
  params = flatten(nn.unbox(variables["params"]))
  np.testing.assert_array_equal(params["decoder/layers_0/self_attention/query/adapter/lora_a"],
                                0.5)
  logits, encoded = _run(model, variables)
  valid = ENCODER_TOKENS > 0
  np.testing.assert_allclose(encoded[valid], torch_encoded[valid], atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=1e-4)


def test_tied_t5_maps_to_logits_via_embedding(tmp_path):
  torch_logits, _ = _save_hf_t5(str(tmp_path), tie_word_embeddings=True)
  assert "decoder/logits_dense/kernel" not in load_hf(str(tmp_path))
  config = t5_config_from_hf(str(tmp_path))
  assert config.logits_via_embedding
  model, abstract = _ours(config)
  logits, _ = _run(model, load_pretrained(abstract, str(tmp_path)))
  np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=1e-4)
  # The same checkpoint in a model with its own output layer: that layer is missing.
  model, abstract = _ours(T5Config(**{**config.__dict__, "logits_via_embedding": False}))
  with pytest.raises(CheckpointMismatchError, match="missing: decoder/logits_dense/kernel"):
    load_pretrained(abstract, str(tmp_path))


def test_t5_checkpoint_into_a_wider_model_names_path_and_shapes(untied):
  directory = untied[0]
  config = T5Config(emb_dim=32, num_heads=4, head_dim=8, mlp_dim=96, num_encoder_layers=2,
                    num_decoder_layers=2, vocab_size=64)
  _, abstract = _ours(config)
  with pytest.raises(CheckpointMismatchError,
                     match=r"encoder/layers_0/mlp/wi_0/kernel: checkpoint \(32, 64\) "
                           r"vs model \(32, 96\)"):
    load_pretrained(abstract, directory)


def test_separate_lm_head_of_a_published_t5_v1_1_file(tmp_path):
  """Hub T5.1.1 / UL2 files (transformers 4) keep `lm_head` apart from `shared`, unscaled."""
  from safetensors.torch import save_file
  torch.manual_seed(1)
  config = transformers.T5Config(**HF_CONFIG, tie_word_embeddings=False)
  model = transformers.T5ForConditionalGeneration(config).eval()
  model.lm_head.weight = torch.nn.Parameter(torch.randn(64, 32))  # untie
  with torch.no_grad():
    torch_logits = model(input_ids=torch.tensor(ENCODER_TOKENS),
                         attention_mask=torch.tensor(ENCODER_TOKENS > 0),
                         decoder_input_ids=torch.tensor(DECODER_TOKENS)).logits.numpy()
  state = {k: v.contiguous() for k, v in model.state_dict().items()
           if not k.endswith("embed_tokens.weight")}
  save_file(state, str(tmp_path / "model.safetensors"))
  v4_config = {**{k: v for k, v in config.to_dict().items() if k != "scale_decoder_outputs"},
               "tie_word_embeddings": False}
  (tmp_path / "config.json").write_text(__import__("json").dumps(v4_config))
  config = t5_config_from_hf(str(tmp_path))
  assert not config.logits_via_embedding
  model, abstract = _ours(config)
  logits, _ = _run(model, load_pretrained(abstract, str(tmp_path / "model.safetensors")))
  np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=1e-4)


def test_unsupported_activation_is_refused_with_its_name():
  with pytest.raises(ValueError, match="'relu'"):
    t5_config_from_hf({**HF_CONFIG, "feed_forward_proj": "relu"})


def test_ul2_style_gated_silu_checkpoint_gives_torch_logits(tmp_path):
  torch_logits, torch_encoded = _save_hf_t5(str(tmp_path), tie_word_embeddings=False,
                                            feed_forward_proj="gated-silu")
  config = t5_config_from_hf(str(tmp_path))
  assert config.mlp_activation == "silu"
  model, abstract = _ours(config)
  logits, encoded = _run(model, load_pretrained(abstract, str(tmp_path)))
  np.testing.assert_allclose(encoded, torch_encoded, atol=1e-4, rtol=1e-4)
  np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=1e-4)


def test_t5x_legacy_and_orbax_copies_of_the_weights_give_torch_logits(untied, tmp_path):
  import orbax.checkpoint as ocp
  from test_checkpoint_formats import _nest, _write_t5x_legacy
  directory, torch_logits, _ = untied
  weights = load_hf(directory)
  legacy = str(tmp_path / "t5x" / "checkpoint_1000")
  _write_t5x_legacy(legacy, weights, inline=("encoder/encoder_norm/scale",
                                             "decoder/relpos_bias/rel_embedding"))
  checkpointer = ocp.StandardCheckpointer()
  checkpointer.save(str(tmp_path / "orbax"), {"target": _nest(weights), "state": {"step": 1}})
  checkpointer.wait_until_finished()
  model, abstract = _ours(t5_config_from_hf(directory))
  for path in (legacy, str(tmp_path / "orbax")):
    logits, _ = _run(model, load_pretrained(abstract, path))
    np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=1e-4, err_msg=path)
