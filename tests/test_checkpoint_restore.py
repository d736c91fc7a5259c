"""`load_pretrained`: what is taken from the checkpoint, what stays fresh, what is an error."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from omni_smola.checkpoints import CheckpointMismatchError, flatten, load_pretrained
from omni_smola.nn import AdaptedDense, AdapterPlan, AdapterSpec

LORA = AdapterSpec(kind="lora", rank=2)


class _Tower(nn.Module):
  """A stand-in for a backbone tower: a frozen projection with an adapter, a norm scale."""
  with_posemb: bool = False

  @nn.compact
  def __call__(self, x):
    if self.with_posemb:
      x = x + self.param("pos_embedding", nn.initializers.normal(0.02), (1, 4, 4))
    x = AdaptedDense(6, kernel_axes=("embed", "mlp"), adapters=AdapterPlan(adapter=LORA),
                     name="wi")(x)
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("mlp",)),
                       (6,))
    return x * scale


class _TwoTowers(nn.Module):
  @nn.compact
  def __call__(self, image_tokens, text_tokens):
    return (_Tower(with_posemb=True, name="img")(image_tokens),
            _Tower(name="txt")(text_tokens))


def _init(seed=0):
  x = jnp.ones((1, 4, 4))
  return _TwoTowers().init(jax.random.PRNGKey(seed), x, x)


def _tower_checkpoint(seed, with_posemb=False):
  rng = np.random.default_rng(seed)
  ckpt = {"wi/kernel": rng.normal(size=(4, 6)).astype(np.float32),
          "scale": rng.normal(size=(6,)).astype(np.float32)}
  if with_posemb:
    ckpt["pos_embedding"] = rng.normal(size=(1, 4, 4)).astype(np.float32)
  return ckpt


def _params(variables):
  return flatten(nn.unbox(variables)["params"])


def test_checkpoint_fills_backbone_and_adapters_keep_their_fresh_init():
  variables = _init()
  ckpt = {f"txt/{k}": v for k, v in _tower_checkpoint(1).items()}
  ckpt.update({f"img/{k}": v for k, v in _tower_checkpoint(2, with_posemb=True).items()})
  merged = load_pretrained(variables, ckpt)
  # Structure and partitioning boxes are kept, so the result drops into the trainer.
  assert jax.tree.structure(merged) == jax.tree.structure(variables)
  assert isinstance(merged["params"]["txt"]["scale"], nn.LogicallyPartitioned)
  before, after = _params(variables), _params(merged)
  for name, value in ckpt.items():
    np.testing.assert_array_equal(after[name], value, err_msg=name)
  adapters = [name for name in before if "/adapter/" in name]
  assert adapters
  for name in adapters:
    np.testing.assert_array_equal(after[name], before[name], err_msg=name)


def test_shape_mismatch_names_the_parameter_and_both_shapes():
  ckpt = _tower_checkpoint(1)
  ckpt["wi/kernel"] = np.zeros((5, 6), np.float32)
  with pytest.raises(CheckpointMismatchError) as error:
    load_pretrained(_init(), ckpt, prefix="txt")
  assert "txt/wi/kernel" in str(error.value)
  assert "(5, 6)" in str(error.value) and "(4, 6)" in str(error.value)


def test_missing_backbone_parameter_is_an_error_unless_allowed():
  ckpt = _tower_checkpoint(1)
  del ckpt["scale"]
  with pytest.raises(CheckpointMismatchError, match=r"missing: txt/scale \(model shape \(6,\)\)"):
    load_pretrained(_init(), ckpt, prefix="txt")
  merged = load_pretrained(_init(), ckpt, prefix="txt", allow_missing=(r"txt/scale$",))
  np.testing.assert_array_equal(_params(merged)["txt/wi/kernel"], ckpt["wi/kernel"])


def test_unexpected_checkpoint_arrays_raise_unless_ignored():
  ckpt = _tower_checkpoint(1)
  ckpt["decoder/logits_dense/kernel"] = np.zeros((6, 3), np.float32)
  with pytest.raises(CheckpointMismatchError, match=r"txt/decoder/logits_dense/kernel \(6, 3\)"):
    load_pretrained(_init(), ckpt, prefix="txt")
  merged = load_pretrained(_init(), ckpt, prefix="txt", ignore_unexpected=True)
  np.testing.assert_array_equal(_params(merged)["txt/scale"], ckpt["scale"])


def test_prefix_fills_one_tower_and_leaves_the_other_untouched():
  variables = _init()
  merged = load_pretrained(variables, _tower_checkpoint(3), prefix="txt")
  before, after = _params(variables), _params(merged)
  for name in before:
    if name.startswith("img/"):
      np.testing.assert_array_equal(after[name], before[name], err_msg=name)
  np.testing.assert_array_equal(after["txt/scale"], _tower_checkpoint(3)["scale"])


def test_params_only_target_and_dtype_cast_from_bfloat16():
  params = nn.unbox(_init())["params"]
  ckpt = {k: v.astype(ml_dtypes.bfloat16) for k, v in _tower_checkpoint(4).items()}
  merged = load_pretrained(params, ckpt, prefix="txt")
  assert set(merged) == {"img", "txt"}
  assert merged["txt"]["wi"]["kernel"].dtype == jnp.float32
  np.testing.assert_array_equal(merged["txt"]["wi"]["kernel"],
                                ckpt["wi/kernel"].astype(np.float32))


def test_position_embeddings_of_another_grid_are_resampled():
  ckpt = _tower_checkpoint(5, with_posemb=True)
  ckpt["pos_embedding"] = np.ones((1, 16, 4), np.float32)  # a 4x4 grid for a 2x2 model
  merged = load_pretrained(_init(), ckpt, prefix="img")
  np.testing.assert_allclose(_params(merged)["img/pos_embedding"], np.ones((1, 4, 4)),
                             atol=1e-6)
  with pytest.raises(CheckpointMismatchError, match="img/pos_embedding"):
    load_pretrained(_init(), ckpt, prefix="img", resample_position_embeddings=False)


def test_abstract_sharded_target_gets_placed_arrays_and_init_fn_fills_adapters():
  abstract = jax.eval_shape(_init)
  mesh = Mesh(np.array(jax.devices()[:1]), ("model",))
  sharding = NamedSharding(mesh, PartitionSpec())
  abstract = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          abstract)
  ckpt = {f"txt/{k}": v for k, v in _tower_checkpoint(1).items()}
  ckpt.update({f"img/{k}": v for k, v in _tower_checkpoint(2, with_posemb=True).items()})
  with pytest.raises(ValueError, match="init_fn"):
    load_pretrained(abstract, ckpt)
  calls = []

  def init_fn():
    calls.append(1)
    return _init(seed=9)

  merged = load_pretrained(abstract, ckpt, init_fn=init_fn)
  assert calls == [1]
  after, fresh = _params(merged), _params(_init(seed=9))
  assert after["txt/scale"].sharding == sharding
  np.testing.assert_array_equal(after["txt/scale"], ckpt["txt/scale"])
  for name in fresh:
    if "/adapter/" in name:
      np.testing.assert_array_equal(after[name], fresh[name], err_msg=name)


_SHARDED_CHECK = """
import jax, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from omni_smola.checkpoints import load_pretrained
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
shardings = {"wi": NamedSharding(mesh, P(None, "model")), "emb": NamedSharding(mesh, P("model"))}
abstract = {"wi": {"kernel": jax.ShapeDtypeStruct((8, 12), np.float32, sharding=shardings["wi"])},
            "emb": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=shardings["emb"])}
ckpt = {"wi/kernel": np.arange(96.0).reshape(8, 12), "emb": np.arange(128.0).reshape(16, 8)}
out = load_pretrained(abstract, ckpt)
for value, name in ((out["wi"]["kernel"], "wi/kernel"), (out["emb"], "emb")):
  assert value.sharding == shardings[name.split("/")[0]], value.sharding
  assert value.dtype == np.float32
  np.testing.assert_array_equal(np.asarray(value), ckpt[name])
assert out["wi"]["kernel"].addressable_shards[0].data.shape == (8, 3)
print("ok")
"""


def test_checkpoint_lands_sharded_over_an_8_device_mesh(tmp_path):
  from multidevice import run_with_devices
  script = tmp_path / "sharded_restore.py"
  script.write_text(_SHARDED_CHECK)
  assert run_with_devices(str(script), 8).strip().endswith("ok")
