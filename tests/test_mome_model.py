"""A MoME-style PaLI (PaliConfig.move, vision_towers, T5Config.mome_mole): trains, decodes,
routes on the prompt alone, stays causal, is counted in closed form, refuses bad configs.

One tiny model (`tiny_mome`: the tiny ViT + a Pix2Struct-like tower, ADT, the instruction
router, MoLE beside every FFN), initialised once; each jitted function is compiled once and
reused by the tests that need it. The DINOv2 and CLIP towers (in `mini_mome`, `pali3_mome`)
are checked here in closed form on their own traced trees, which costs no compile.
"""
import dataclasses
import itertools
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from omni_smola import accounting, mome_accounting, param_layout
from omni_smola.model import PaliModel
from omni_smola.models import configs, move, pix2struct_patches, vision_towers
from omni_smola.models.adt import adaptive_average_pool
from omni_smola.models.vit import ViT
from omni_smola.nn import TokenContext
from omni_smola.nn.mome_mole import BottleneckMoLE
from omni_smola.training.train_state import merge_params, split_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
from contractions import dot_generals, product_flops  # noqa: E402

CONFIG = configs.CONFIGS["tiny_mome"]


@pytest.fixture(scope="module")
def mome():
  model = PaliModel("tiny_mome")
  shapes = {"encoder_input_tokens": (2, 5), "decoder_input_tokens": (2, 4)}
  boxed = jax.jit(lambda rng: model.get_initial_variables(rng, shapes))(
      jax.random.PRNGKey(0))["params"]
  params = param_layout.unbox(boxed)
  # Untrained, the MoLE's `up` is zero and adds nothing: give it weights so that routing and
  # causality are tested on a MoLE that changes the output.
  flat = traverse_util.flatten_dict(params)
  keys = jax.random.split(jax.random.PRNGKey(1), len(flat))
  for key, name in zip(keys, sorted(flat)):
    if name[-1] == "up_kernel":
      flat[name] = 0.3 * jax.random.normal(key, flat[name].shape)
  params = traverse_util.unflatten_dict(flat)
  rng = np.random.default_rng(0)
  batch = {
      "image": jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)), jnp.float32),
      "encoder_input_tokens": jnp.array([[5, 6, 7, 1, 0], [8, 9, 1, 0, 0]], jnp.int32),
      "decoder_input_tokens": jnp.array([[0, 3, 4, 5], [0, 6, 7, 1]], jnp.int32),
      "decoder_target_tokens": jnp.array([[3, 4, 5, 1], [6, 7, 1, 9]], jnp.int32),
  }
  score = jax.jit(lambda p, b: model.score_batch(p, b, return_intermediates=True))
  return model, boxed, params, batch, score


def _routing(intermediates):
  """(tower weights [b, towers], {MoLE layer: expert_load [b, experts]})."""
  flat = traverse_util.flatten_dict(intermediates)
  mole = {"/".join(k[:-1]): np.asarray(v[0]) for k, v in flat.items()
          if "mome_mole" in k and k[-1] == "expert_load"}
  assert len(mole) == 4, sorted(mole)  # 2 encoder + 2 decoder layers sowed their choice
  return np.asarray(intermediates["tower_weights"][0]), mole


def test_adapters_mode_trains_move_and_mole_and_freezes_towers_and_backbone(mome):
  model, boxed, *_ = mome
  mask = traverse_util.flatten_dict(param_layout.unbox(model.trainable_mask(boxed)))
  trained = {"/".join(k) for k, v in mask.items() if v}
  assert trained and all(k.startswith("move/") or "/mome_mole/" in k for k in trained)
  assert {k.split("/")[0] for k in trained} == {"move", "text"}
  for name in ("move/transform_pix2struct/layers_0/cross_attention/offset_kernel",
               "move/tower_router/logits/kernel", "text/decoder/layers_1/mome_mole/up_kernel",
               "text/encoder/layers_0/mome_mole/router/hidden/kernel"):
    assert name in trained
  frozen = {"/".join(k) for k, v in mask.items() if not v}
  assert {k.split("/")[0] for k in frozen} == {"img", "vision_towers", "img_projection", "text"}


def test_the_backbone_paths_are_the_single_vit_models_so_its_checkpoint_fills_them():
  shapes = {"encoder_input_tokens": (1, 3), "decoder_input_tokens": (1, 2)}

  def tree(name):
    model = PaliModel(name)
    abstract = jax.eval_shape(lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))
    flat = traverse_util.flatten_dict(param_layout.unbox(abstract["params"]))
    return {"/".join(k): v.shape for k, v in flat.items()}
  tiny, mome_tree = tree("tiny"), tree("tiny_mome")
  added = {k for k in mome_tree if param_layout.is_adapter_path(k)
           or k.startswith("vision_towers/")}
  assert {k: v for k, v in mome_tree.items() if k not in added} == tiny


def test_a_tiny_mome_model_trains_its_move_and_mole(mome):
  model, boxed, params, batch, _ = mome
  trainable, frozen = split_params(params, param_layout.unbox(model.trainable_mask(boxed)))
  tx = optax.adam(3e-2)

  @jax.jit
  def step(trainable, opt_state):
    loss, grads = jax.value_and_grad(
        lambda t: model.loss_fn(merge_params(t, frozen), batch, None)[0])(trainable)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(trainable, updates), opt_state, loss, grads

  opt_state = tx.init(trainable)
  losses = []
  for _ in range(4):
    trainable, opt_state, loss, grads = step(trainable, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.1, losses
  flat = traverse_util.flatten_dict(grads)
  for part in ("tower_router", "transform_img", "transform_pix2struct"):
    assert any(part in k and np.abs(v).sum() > 0 for k, v in flat.items()), part
  # MoLE's hard gate passes a straight-through gradient to its routers.
  assert any("mome_mole" in k and "router" in k and np.abs(v).sum() > 0 for k, v in flat.items())


def test_routers_read_the_prompt_only(mome):
  _, _, params, batch, score = mome
  _, inter = score(params, batch)
  weights, mole = _routing(inter)
  np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
  other = dict(batch, image=-batch["image"][::-1],
               decoder_target_tokens=batch["decoder_target_tokens"][::-1],
               decoder_input_tokens=batch["decoder_input_tokens"][::-1])
  _, other_inter = score(params, other)
  other_weights, other_mole = _routing(other_inter)
  np.testing.assert_array_equal(weights, other_weights)
  for layer, load in mole.items():
    # One expert per example takes every token; the image and the targets move none.
    np.testing.assert_array_equal((load > 0).sum(axis=-1), 1, layer)
    np.testing.assert_array_equal(load.argmax(-1), other_mole[layer].argmax(-1), layer)
  prompts = dict(batch, encoder_input_tokens=batch["encoder_input_tokens"][::-1])
  _, prompt_inter = score(params, prompts)
  np.testing.assert_allclose(_routing(prompt_inter)[0], weights[::-1], rtol=1e-6)
  assert not np.allclose(weights[0], weights[1])


def test_the_decoder_with_mole_stays_causal(mome):
  _, _, params, batch, score = mome
  changed = dict(batch, decoder_input_tokens=batch["decoder_input_tokens"].at[:, 3].set(42))
  pre_logits = [np.asarray(score(params, b)[1]["text"]["decoder"]["pre_logits"][0])
                for b in (batch, changed)]
  np.testing.assert_array_equal(pre_logits[0][:, :3], pre_logits[1][:, :3])
  assert not np.allclose(pre_logits[0][:, 3], pre_logits[1][:, 3])


def test_cached_decoding_equals_recomputing_the_decoder(mome):
  model, _, params, batch, _ = mome

  @jax.jit
  def both(params, batch):
    return tuple(model.predict_batch_with_aux(params, batch, decoder_params={"use_cache": cache})
                 for cache in (True, False))
  (cached, cached_aux), (recomputed, recomputed_aux) = both(params, batch)
  np.testing.assert_array_equal(np.asarray(cached), np.asarray(recomputed))
  np.testing.assert_allclose(np.asarray(cached_aux["scores"]),
                             np.asarray(recomputed_aux["scores"]), rtol=1e-5, atol=1e-5)
  assert len(np.unique(np.asarray(cached))) > 3  # really decoded, not a constant


def _host_cut(shapes, seed=3):
  """The batch features `data.pix2struct_inputs` gives images of these shapes."""
  tower = dict(CONFIG.vision_towers)["pix2struct"]
  rng = np.random.default_rng(seed)
  cuts = [pix2struct_patches.flatten_patches(
      rng.uniform(0, 255, shape + (3,)), patch_size=tower.patch_size,
      max_patches=tower.max_patches, max_aspect_ratio=tower.max_aspect_ratio) for shape in shapes]
  return {"flattened_patches": jnp.stack([c.patches for c in cuts]),
          "patch_row_ids": jnp.stack([c.row_ids for c in cuts]),
          "patch_col_ids": jnp.stack([c.col_ids for c in cuts])}


def test_the_pix2struct_tower_reads_each_examples_host_cut_patches(mome):
  model, _, params, batch, score = mome
  # A wide and a tall image, each on its own grid (2 x 6 and 5 x 2 of its 16 patches ...
  cut = _host_cut([(12, 36), (32, 16)])
  rows, cols = cut["patch_row_ids"].max(-1), cut["patch_col_ids"].max(-1)
  assert cols[0] > rows[0] and rows[1] > cols[1], (rows, cols)
  # ... where the squashed 16 x 16 PaLI image, cut in the model, is 4 x 4 for both).
  squashed = np.asarray(score(params, batch)[0])
  host = np.asarray(score(params, dict(batch, **cut))[0])
  assert not np.allclose(host, squashed, atol=1e-4)
  # Swapping the two examples' patches changes both examples: each reads its own row.
  swapped = np.asarray(score(params, dict(batch, **{k: v[::-1] for k, v in cut.items()}))[0])
  for row in range(2):
    assert not np.allclose(swapped[row], host[row], atol=1e-4), row


def test_patches_the_model_cannot_read_are_refused_naming_the_feature_and_the_tower(mome):
  model, _, params, batch, _ = mome
  tower = dict(CONFIG.vision_towers)["pix2struct"]
  other = dict(batch, **_host_cut([(16, 16), (16, 16)]))
  other["flattened_patches"] = other["flattened_patches"][:, :-2]
  with pytest.raises(ValueError, match=r"'flattened_patches' has shape \(2, 14, 48\); "
                     rf"Pix2Struct tower 'pix2struct' .*max_patches={tower.max_patches}"):
    jax.eval_shape(lambda p: model.score_batch(p, other), params)
  with pytest.raises(ValueError, match="carries Pix2Struct patches .* no Pix2Struct tower"):
    PaliModel("tiny").encode({}, dict(batch, **_host_cut([(16, 16), (16, 16)])))


def test_accounting_counts_towers_adt_and_mole_in_closed_form():
  account = accounting.account_model(PaliModel("tiny_mome"), {"inputs": 5, "targets": 4})
  parts = account["mome"]
  assert set(parts) == {"tower/img", "tower/pix2struct", "move/transform_img",
                        "move/transform_pix2struct", "move/tower_router", "mome_mole"}
  for part, counts in parts.items():
    assert counts["parameters"] == counts["closed_form"] > 0, part
  assert account["closed_form_mismatches"] == []
  by_group = account["parameters"]["by_group"]
  assert by_group["move"] == sum(c["parameters"] for p, c in parts.items()
                                 if p.startswith("move/"))
  assert by_group["mome_mole"] == parts["mome_mole"]["parameters"]
  assert account["parameters"]["trainable"] == by_group["move"] + by_group["mome_mole"]


def _move_inputs(mome):
  """The shapes of what the tiny MoME model hands MoVE: (feature maps, instruction, masks)."""
  model, _, params, batch, _ = mome
  seen = []

  def grab(call, args, kwargs, context):
    if isinstance(context.module, move.MoVE) and context.method_name == "__call__":
      seen.append(jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                         args))
    return call(*args, **kwargs)

  with nn.intercept_methods(grab):
    jax.eval_shape(lambda p: model.module.apply(
        {"params": p}, batch["image"], batch["encoder_input_tokens"],
        batch["decoder_input_tokens"]), params)
  assert len(seen) == 1
  return seen[0]


@pytest.mark.parametrize("transform,fusion",
                         list(itertools.product(configs.MOVE_TRANSFORMS, configs.MOVE_FUSIONS)))
def test_move_flops_equal_the_products_the_model_traces(mome, transform, fusion):
  maps, instruction, masks = _move_inputs(mome)
  batch = instruction.shape[0]
  towers = mome_accounting.towers(CONFIG)
  for name, feature_map in zip(CONFIG.move.tower_names, maps):
    assert feature_map.shape[1:3] == mome_accounting.feature_grid(
        towers[name], CONFIG.vision.image_size), name
  cfg = dataclasses.replace(CONFIG.move, transform=transform, fusion=fusion)
  module = move.MoVE(cfg)
  inputs = (maps, instruction, masks)
  variables = jax.eval_shape(lambda *a: module.init(jax.random.PRNGKey(0), *a), *inputs)
  traced = product_flops(dot_generals(lambda v, *a: module.apply(v, *a), variables, *inputs))
  # The pooling is a mean (free in the accounting) that jnp writes as two products.
  side = cfg.adt.grid_side
  pooling = sum(product_flops(dot_generals(lambda f, m: adaptive_average_pool(f, side, m),
                                           f, m)) for f, m in zip(maps, masks))
  config = dataclasses.replace(CONFIG, move=cfg)
  closed_form = mome_accounting.mome_flops(config, {"encoder": 9, "decoder": 4})["vision"]
  assert set(closed_form) == ({f"move/transform_{t}" for t in cfg.tower_names}
                              | {"move/tower_router"})
  assert traced - pooling == batch * sum(closed_form.values())


@pytest.mark.parametrize("num_experts", [1, 4])
def test_mole_flops_equal_the_products_it_traces(num_experts):
  batch, tokens, width, bottleneck = 2, 7, 12, 5
  mole = BottleneckMoLE(num_experts=num_experts, bottleneck_dim=bottleneck)
  x = jax.ShapeDtypeStruct((batch, tokens, width), jnp.float32)
  context = TokenContext(instance_features=jnp.ones((batch, width)))
  variables = jax.eval_shape(lambda x: mole.init(jax.random.PRNGKey(0), x, context), x)
  traced = product_flops(dot_generals(lambda v, x: mole.apply(v, x, context), variables, x))
  assert traced == batch * mome_accounting.bottleneck_mole_flops(
      num_experts, bottleneck, None, width, tokens)


def test_the_account_files_move_and_mole_flops_under_their_stacks():
  account = accounting.account_model(PaliModel("tiny_mome"), {"inputs": 5, "targets": 4})
  flops, parts = account["flops"], account["mome_flops"]
  mole = CONFIG.text.mome_mole
  assert set(parts) == {"vision", "encoder", "decoder"}
  assert flops["vision"]["adapters_by_group"]["move"] == sum(parts["vision"].values()) > 0
  for stack in ("encoder", "decoder"):
    layers = getattr(CONFIG.text, f"num_{stack}_layers")
    tokens = flops[stack]["tokens"]
    assert tokens == {"encoder": CONFIG.move.adt.num_queries + 5, "decoder": 4}[stack]
    assert flops[stack]["adapters_by_group"]["mome_mole"] == parts[stack]["mome_mole"] == (
        layers * mome_accounting.bottleneck_mole_flops(
            mole.num_experts, mole.bottleneck_dim, mole.router_hidden_dim,
            CONFIG.text.emb_dim, tokens))
  assert flops["total"]["adapters"] == sum(f for p in parts.values() for f in p.values())


@pytest.mark.parametrize("tower", [
    configs.DinoV2Config(width=16, depth=2, mlp_dim=40, num_heads=2, patch_size=4, image_size=16,
                         num_register_tokens=3),
    configs.ClipVisionConfig(width=12, depth=2, mlp_dim=20, num_heads=3, patch_size=4,
                             image_size=12),
    configs.Pix2StructVisionConfig(width=20, depth=2, mlp_dim=36, num_heads=2, head_dim=6,
                                   patch_size=4, num_positions=32, max_patches=16),
    configs.ViTConfig(width=24, depth=2, mlp_dim=48, num_heads=4, patch_size=8, image_size=16),
], ids=lambda tower: type(tower).__name__)
def test_every_tower_and_transform_matches_its_closed_form(tower):
  image = jnp.zeros((1, 16, 16, 3))
  if isinstance(tower, configs.ViTConfig):  # the PaLI ViT, tower 'img'
    module, args = ViT(tower), (image,)
  else:
    module, inputs = vision_towers.TOWERS[type(tower)]
    module, args = module(tower), inputs(image, tower)
  abstract = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), *args))
  counted = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(abstract["params"]))
  assert counted == mome_accounting.TOWERS[type(tower)](tower)
  features = jax.ShapeDtypeStruct((1, 4, 4, tower.width), jnp.float32)
  for transform in configs.MOVE_TRANSFORMS:
    cfg = dataclasses.replace(CONFIG.move, transform=transform)
    adt = move.TRANSFORMS[transform](cfg.adt, cfg.width)
    params = jax.eval_shape(lambda f: adt.init(jax.random.PRNGKey(0), f), features)["params"]
    counted = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params))
    assert counted == mome_accounting.TRANSFORMS[transform](cfg, tower.width), transform


def test_the_ablation_tables_are_the_configs_names():
  assert tuple(move.TRANSFORMS) == configs.MOVE_TRANSFORMS
  assert tuple(move.FUSIONS) == configs.MOVE_FUSIONS


@pytest.mark.parametrize("shape", [(16, 16), (12, 24)])
def test_in_model_pix2struct_patches_equal_the_host_processor(shape):
  tower = dict(CONFIG.vision_towers)["pix2struct"]
  image = np.random.default_rng(1).uniform(-1, 1, shape + (3,)).astype(np.float32)
  host = pix2struct_patches.flatten_patches(
      image, patch_size=tower.patch_size, max_patches=tower.max_patches,
      max_aspect_ratio=tower.max_aspect_ratio)
  patches, rows, cols = vision_towers.image_patches(jnp.asarray(image)[None], tower)
  np.testing.assert_allclose(np.asarray(patches[0]), host.patches, atol=1e-5)
  np.testing.assert_array_equal(np.asarray(rows[0]), host.row_ids)
  np.testing.assert_array_equal(np.asarray(cols[0]), host.col_ids)


def test_bad_mome_configs_fail_naming_the_field():
  with pytest.raises(ValueError, match=r"BottleneckMoLEConfig.num_experts=0 must be >= 1"):
    configs.BottleneckMoLEConfig(num_experts=0)
  with pytest.raises(ValueError, match=r"MoVEConfig.fusion='router' over one tower \('img',\)"):
    configs.MoVEConfig(tower_names=("img",), width=24)
  with pytest.raises(ValueError, match=r"tower_names=\(\)"):
    configs.MoVEConfig(tower_names=(), width=24)
  with pytest.raises(ValueError, match=r"unused \['pix2struct'\], unknown \['clip'\]"):
    dataclasses.replace(CONFIG, move=dataclasses.replace(CONFIG.move, tower_names=("img", "clip")))
  with pytest.raises(ValueError, match=r"vision_towers names \['pix2struct'\] but "
                                       r"PaliConfig.move is None"):
    dataclasses.replace(CONFIG, move=None)
  with pytest.raises(ValueError, match=r"vision_towers\['dinov2'\] is a ViTConfig"):
    dataclasses.replace(CONFIG, vision_towers=(("dinov2", CONFIG.vision),))
  with pytest.raises(ValueError, match=r"T5Config.mome_mole must be a BottleneckMoLEConfig"):
    dataclasses.replace(CONFIG.text, mome_mole=4)
  tower = dict(CONFIG.vision_towers)["pix2struct"]
  with pytest.raises(ValueError, match=r"aspect ratio 5.00 above "
                                       r"Pix2StructVisionConfig.max_aspect_ratio=4.0"):
    vision_towers.image_patches(jnp.zeros((1, 8, 40, 3)), tower)
  # L = 9 queries: a 3x3 grid, larger than the ViT's 2x2 patch grid.
  big_l = dataclasses.replace(CONFIG, move=dataclasses.replace(
      CONFIG.move, adt=dataclasses.replace(CONFIG.move.adt, num_queries=9)))
  model = PaliModel(big_l)
  with pytest.raises(ValueError, match=r"ADTConfig.num_queries=9 \(a 3x3 query grid\) is "
                                       r"larger than transform_img's feature grid 2x2"):
    jax.eval_shape(lambda: model.get_initial_variables(
        jax.random.PRNGKey(0), {"encoder_input_tokens": (1, 3), "decoder_input_tokens": (1, 2)}))
