"""A PaLI model's towers from a SigLIP and a T5 checkpoint: each gives torch's numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from omni_smola.checkpoints import (CheckpointMismatchError, load_hf,  # noqa: E402
                                    load_pali_pretrained, t5_config_from_hf, vit_config_from_hf)
from omni_smola.models.configs import PaliConfig  # noqa: E402
from omni_smola.models.pali import Pali  # noqa: E402
from omni_smola.models.vit import resample_position_embedding  # noqa: E402

SIGLIP = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              image_size=32, patch_size=8)
T5 = dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2, num_decoder_layers=2,
          vocab_size=64, feed_forward_proj="gated-gelu", tie_word_embeddings=False)
IMAGES = np.random.default_rng(0).uniform(-1, 1, size=(2, 32, 32, 3)).astype(np.float32)
PROMPT = np.array([[5, 9, 13, 1, 0], [3, 62, 8, 8, 1]])
TARGET = np.array([[0, 4, 17, 29], [0, 50, 2, 2]])


@pytest.fixture(scope="module")
def hf_towers(tmp_path_factory):
  torch.manual_seed(0)
  vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**SIGLIP)).eval()
  text = transformers.T5ForConditionalGeneration(transformers.T5Config(**T5)).eval()
  vision_dir = str(tmp_path_factory.mktemp("siglip"))
  text_dir = str(tmp_path_factory.mktemp("t5"))
  vision.save_pretrained(vision_dir)
  text.save_pretrained(text_dir)
  with torch.no_grad():
    patches = vision(pixel_values=torch.tensor(IMAGES.transpose(0, 3, 1, 2)))
    logits = text(input_ids=torch.tensor(PROMPT), attention_mask=torch.tensor(PROMPT > 0),
                  decoder_input_ids=torch.tensor(TARGET)).logits
  return vision_dir, text_dir, patches.last_hidden_state.numpy(), logits.numpy()


def _pali(vision_dir, text_dir, **vision_overrides):
  config = PaliConfig(text=t5_config_from_hf(text_dir),
                      vision=vit_config_from_hf(vision_dir, **vision_overrides))
  model = Pali(config)
  images = IMAGES[:, :config.vision.image_size, :config.vision.image_size]
  return model, jax.eval_shape(model.init, jax.random.PRNGKey(0), images, PROMPT, TARGET)


def _filled(abstract):
  """A cheap stand-in for `model.init`: what no checkpoint gives becomes 0.5."""
  return lambda: jax.tree.map(lambda s: jnp.full(s.shape, 0.5, s.dtype), abstract)


def _image_tower(model, variables):
  return model.apply(variables, IMAGES, method=lambda m, x: m.img(x))


def test_both_towers_from_hf_checkpoints_match_torch(hf_towers):
  vision_dir, text_dir, torch_patches, torch_logits = hf_towers
  model, abstract = _pali(vision_dir, text_dir)
  variables = load_pali_pretrained(abstract, text=text_dir, image=vision_dir,
                                   init_fn=_filled(abstract))
  np.testing.assert_allclose(_image_tower(model, variables), torch_patches, atol=1e-4,
                             rtol=1e-4)
  logits = model.apply(variables, PROMPT, TARGET, method=lambda m, e, d: m.text(e, d))
  np.testing.assert_allclose(logits, torch_logits, atol=1e-4, rtol=1e-4)
  # The image -> text projection is in neither backbone: it keeps its fresh value.
  np.testing.assert_array_equal(variables["params"]["img_projection"]["kernel"].value, 0.5)


def test_scanned_big_vision_npz_fills_the_image_tower_like_the_hf_file(hf_towers, tmp_path):
  vision_dir, text_dir, torch_patches, _ = hf_towers
  # The SigLIP weights as big_vision saves a scanned two-towers model.
  ours = load_hf(vision_dir)
  npz = {f"params/img/{k}": v for k, v in ours.items() if "encoderblock_" not in k}
  for name in {k.split("/", 2)[2] for k in ours if "encoderblock_" in k}:
    npz[f"params/img/Transformer/encoderblock/{name}"] = np.stack(
        [ours[f"Transformer/encoderblock_{i}/{name}"] for i in range(SIGLIP["num_hidden_layers"])])
  npz["params/img/MAPHead_0/probe"] = np.zeros((1, 1, 32), np.float32)
  npz["params/txt/Encoder_0/encoder_norm/scale"] = np.ones((32,), np.float32)
  np.savez(tmp_path / "siglip.npz", **npz)
  model, abstract = _pali(vision_dir, text_dir)
  variables = load_pali_pretrained(abstract, image=str(tmp_path / "siglip.npz"),
                                   init_fn=_filled(abstract))
  np.testing.assert_allclose(_image_tower(model, variables), torch_patches, atol=1e-4,
                             rtol=1e-4)


def test_lower_resolution_model_gets_resampled_position_embeddings(hf_towers):
  vision_dir, text_dir, _, _ = hf_towers
  _, abstract = _pali(vision_dir, text_dir, image_size=16)  # 2x2 patches, checkpoint 4x4
  variables = load_pali_pretrained(abstract, image=vision_dir, init_fn=_filled(abstract))
  posemb = variables["params"]["img"]["pos_embedding"].value
  expected = resample_position_embedding(load_hf(vision_dir)["pos_embedding"], 4)
  np.testing.assert_allclose(posemb, expected, atol=1e-6)


def test_vit_checkpoint_in_the_text_slot_is_rejected_with_paths(hf_towers):
  vision_dir, text_dir, _, _ = hf_towers
  _, abstract = _pali(vision_dir, text_dir)
  with pytest.raises(CheckpointMismatchError) as error:
    load_pali_pretrained(abstract, text=vision_dir)
  message = str(error.value)
  assert "no checkpoint array matches a model parameter" in message
  assert "missing: text/decoder/decoder_norm/scale (model shape (32,))" in message
  assert "unexpected: text/Transformer/encoder_norm/bias (32,)" in message
