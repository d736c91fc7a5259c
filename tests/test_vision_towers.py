"""MoME's vision towers (DINOv2, CLIP, Pix2Struct) from transformers checkpoints: torch's numbers."""
import dataclasses

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from omni_smola.checkpoints import hf_vision_towers as towers  # noqa: E402
from omni_smola.checkpoints.tree import unflatten  # noqa: E402
from omni_smola.models.clip_vision import ClipVision  # noqa: E402
from omni_smola.models.dinov2 import DinoV2  # noqa: E402
from omni_smola.models.pix2struct_patches import flatten_patches  # noqa: E402
from omni_smola.models.pix2struct_vision import Pix2StructVision  # noqa: E402

VIT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, image_size=32,
           patch_size=8)
PIX2STRUCT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, d_kv=8, d_ff=64,
                  patch_embed_hidden_size=8 * 8 * 3, seq_len=64)
# 3x5 patches: neither the checkpoints' 4x4 grid nor square, so position embeddings resize.
IMAGES = np.random.default_rng(0).uniform(-1, 1, size=(2, 24, 40, 3)).astype(np.float32)
# Resized to 4 rows x 8 columns of 8-pixel patches for a budget of 40 (8 of them padding).
DOCUMENT = np.random.default_rng(1).integers(0, 256, size=(24, 48, 3)).astype(np.uint8)
MAX_PATCHES = 40


def _randomized(model):
  """Non-trivial norms, biases and layer scales: their transformers inits are 1s and 0s."""
  with torch.no_grad():
    for name, param in model.named_parameters():
      if "norm" in name or "bias" in name or "lambda1" in name:
        param.add_(0.3 * torch.randn_like(param))
  return model.eval()


def _saved(model, tmp_path_factory, name):
  folder = str(tmp_path_factory.mktemp(name))
  model.save_pretrained(folder)
  return folder


@pytest.fixture(scope="module")
def vits(tmp_path_factory):
  """{name: (checkpoint dir, our config, torch output, our VisionFeatures, torch model)}."""
  torch.manual_seed(0)
  cases = {
      "dinov2": (transformers.Dinov2Model, transformers.Dinov2Config(**VIT),
                 towers.dinov2_config_from_hf, DinoV2, {}),
      "dinov2_registers": (transformers.Dinov2WithRegistersModel,
                           transformers.Dinov2WithRegistersConfig(**VIT, num_register_tokens=2),
                           towers.dinov2_config_from_hf, DinoV2, {}),
      "clip": (transformers.CLIPVisionModel,
               transformers.CLIPVisionConfig(**VIT, intermediate_size=64),
               towers.clip_vision_config_from_hf, ClipVision,
               dict(interpolate_pos_encoding=True)),
  }
  results = {}
  pixels = torch.tensor(IMAGES.transpose(0, 3, 1, 2))
  for name, (hf_class, hf_config, config_from_hf, tower, kwargs) in cases.items():
    model = _randomized(hf_class(hf_config))
    folder = _saved(model, tmp_path_factory, name)
    with torch.no_grad():
      out = model(pixel_values=pixels, output_hidden_states=True, **kwargs)
    config = config_from_hf(folder)
    params = unflatten(towers.load_vision_tower(folder, config))
    ours = jax.jit(tower(config).apply)({"params": params}, IMAGES)
    results[name] = (folder, config, out, ours, model)
  return results


@pytest.fixture(scope="module")
def pix2struct(tmp_path_factory):
  torch.manual_seed(0)
  model = _randomized(transformers.Pix2StructVisionModel(
      transformers.Pix2StructVisionConfig(**PIX2STRUCT)))
  folder = _saved(model, tmp_path_factory, "pix2struct")
  config = towers.pix2struct_vision_config_from_hf(folder, max_patches=60)
  params = {"params": unflatten(towers.load_vision_tower(folder, config))}
  return model, folder, config, params, jax.jit(Pix2StructVision(config).apply)


@pytest.mark.parametrize("name", ["dinov2", "dinov2_registers", "clip"])
def test_vit_tower_matches_torch_at_another_resolution(vits, name):
  _, _, torch_out, ours, _ = vits[name]
  np.testing.assert_allclose(ours.tokens, torch_out.last_hidden_state.numpy(), atol=1e-5)


def test_vit_feature_map_is_the_patch_tokens_on_their_grid(vits):
  _, config, _, ours, _ = vits["dinov2_registers"]
  assert config.num_register_tokens == 2 and config.antialias
  patches = ours.tokens[:, 1 + 2:]  # after the class token and the registers
  np.testing.assert_array_equal(ours.feature_map, patches.reshape(2, 3, 5, 32))
  assert ours.feature_mask.shape == (2, 3, 5) and ours.feature_mask.all()


def test_smaller_image_size_resizes_the_checkpoints_positions_at_import(vits):
  folder, config, _, _, model = vits["dinov2_registers"]
  small = dataclasses.replace(config, image_size=16)  # 2x2 patches, the checkpoint's 4x4
  params = unflatten(towers.load_vision_tower(folder, small))
  assert params["pos_embedding"].shape == (1, 1 + 4, 32)
  images = IMAGES[:, :16, :16]
  ours = jax.jit(DinoV2(small).apply)({"params": params}, images)
  with torch.no_grad():  # transformers resizes them on every call instead
    expected = model(pixel_values=torch.tensor(images.transpose(0, 3, 1, 2))).last_hidden_state
  np.testing.assert_allclose(ours.tokens, expected.numpy(), atol=1e-5)


def test_scanned_tower_gets_the_checkpoints_layers_stacked(vits):
  folder, config, _, _, _ = vits["dinov2"]
  per_layer = towers.load_vision_tower(folder, config)
  scanned = towers.load_vision_tower(folder, dataclasses.replace(config, scan_layers=True))
  name = "Transformer/encoderblock{}/LayerScale_1/scale"
  np.testing.assert_array_equal(scanned[name.format("")],
                                np.stack([per_layer[name.format(f"_{i}")] for i in range(2)]))


def test_clip_with_fewer_layers_keeps_the_checkpoints_first_ones(vits):
  folder, config, torch_out, _, _ = vits["clip"]
  shallow = dataclasses.replace(config, depth=1)  # MoME drops EVA-CLIP's last layer
  params = unflatten(towers.load_vision_tower(folder, shallow))
  ours = jax.jit(ClipVision(shallow).apply)({"params": params}, IMAGES)
  np.testing.assert_allclose(ours.tokens, torch_out.hidden_states[1].numpy(), atol=1e-5)


def test_patcher_matches_the_transformers_image_processor():
  processor = transformers.Pix2StructImageProcessor(patch_size={"height": 8, "width": 8})
  theirs = processor(images=DOCUMENT, max_patches=MAX_PATCHES,
                     return_tensors="np")["flattened_patches"][0]
  ours = flatten_patches(DOCUMENT, patch_size=8, max_patches=MAX_PATCHES, max_aspect_ratio=4)
  np.testing.assert_array_equal(ours.row_ids, theirs[:, 0])
  np.testing.assert_array_equal(ours.col_ids, theirs[:, 1])
  assert (ours.row_ids.max(), ours.col_ids.max()) == (4, 8)  # the 1:2 aspect ratio kept
  # Both resize with an antialiased bilinear filter (PIL's, jax's); the rest is exact.
  np.testing.assert_allclose(ours.patches, theirs[:, 2:], atol=1e-3)


def test_pix2struct_matches_torch_on_a_non_square_image(pix2struct):
  model, _, _, params, apply = pix2struct
  patches = flatten_patches(DOCUMENT, patch_size=8, max_patches=MAX_PATCHES, max_aspect_ratio=4)
  flattened = np.concatenate([patches.row_ids[:, None], patches.col_ids[:, None],
                              patches.patches], axis=-1)[None].astype(np.float32)
  with torch.no_grad():
    expected = model(flattened_patches=torch.tensor(flattened)).last_hidden_state.numpy()[0]
  ours = apply(params, patches.patches[None], patches.row_ids[None], patches.col_ids[None])
  valid = patches.row_ids > 0
  np.testing.assert_allclose(ours.tokens[0][valid], expected[valid], atol=1e-5)
  # The feature map holds each patch at (row, col), on the config's canvas, masked elsewhere.
  rows, cols = patches.row_ids[valid] - 1, patches.col_ids[valid] - 1
  np.testing.assert_array_equal(ours.feature_map[0, rows, cols], ours.tokens[0][valid])
  assert int(ours.feature_mask[0].sum()) == valid.sum() == 32
  assert ours.feature_mask[0, rows, cols].all()


def test_pix2struct_padding_does_not_change_valid_patches(pix2struct):
  _, _, config, params, apply = pix2struct
  short = flatten_patches(DOCUMENT, patch_size=8, max_patches=MAX_PATCHES, max_aspect_ratio=4)
  # The same patches padded to the config's budget, padding filled with noise.
  padding = config.max_patches - MAX_PATCHES
  noise = np.random.default_rng(2).normal(size=(padding, short.patches.shape[1]))
  long_patches = np.concatenate([short.patches, noise.astype(np.float32)])[None]
  long_rows, long_cols = (np.pad(ids, (0, padding))[None] for ids in (short.row_ids,
                                                                        short.col_ids))
  short_out = apply(params, short.patches[None], short.row_ids[None], short.col_ids[None])
  long_out = apply(params, long_patches, long_rows, long_cols)
  valid = short.row_ids > 0
  np.testing.assert_allclose(long_out.tokens[0, :MAX_PATCHES][valid], short_out.tokens[0][valid],
                             atol=1e-6)
  np.testing.assert_array_equal(long_out.feature_mask, short_out.feature_mask)


@pytest.mark.parametrize("field, value", [("width", 48), ("patch_size", 4)])
def test_tower_that_does_not_match_its_checkpoint_is_refused(vits, field, value):
  folder, config, _, _, _ = vits["dinov2"]
  with pytest.raises(ValueError, match=rf"DinoV2Config\.{field}={value} does not match the "
                                       rf"checkpoint .*: its {field} is {getattr(config, field)}"):
    towers.load_vision_tower(folder, dataclasses.replace(config, **{field: value}))


def test_pix2struct_tower_with_another_patch_size_is_refused(pix2struct):
  _, folder, config, _, _ = pix2struct
  with pytest.raises(ValueError, match=r"Pix2StructVisionConfig\.patch_size=16 .* is 8"):
    towers.load_vision_tower(folder, dataclasses.replace(config, patch_size=16))


def test_image_beyond_the_aspect_ratio_or_the_patch_budget_is_refused():
  wide = np.zeros((8, 400, 3), np.float32)
  with pytest.raises(ValueError, match=r"image 8x400 has aspect ratio 50.00 above "
                                       r"max_aspect_ratio=4"):
    flatten_patches(wide, patch_size=8, max_patches=MAX_PATCHES, max_aspect_ratio=4)
  # transformers would squash it into one row; we refuse instead.
  with pytest.raises(ValueError, match=r"image 8x400 .* does not fit a patch budget of "
                                       r"max_patches=16: it would get 0 rows"):
    flatten_patches(wide, patch_size=8, max_patches=16, max_aspect_ratio=100)


def test_checkpoint_variant_the_tower_lacks_is_refused():
  with pytest.raises(ValueError, match="use_swiglu_ffn=True; the tower implements "
                                       "use_swiglu_ffn=False only"):
    towers.dinov2_config_from_hf(dict(VIT, use_swiglu_ffn=True))
  with pytest.raises(ValueError, match=r"max_patches=64 must be below num_positions=64"):
    towers.pix2struct_vision_config_from_hf(dict(PIX2STRUCT, seq_len=64), max_patches=64)
