"""Programs shared between the runs of one process (omni_smola/training/program_cache.py):
shared only inside the scope, only for equal keys, never for parts without value identity;
and the fingerprints tell apart every setting the programs depend on."""
import collections
import os
import re

import gin
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from omni_smola import model as model_lib
from omni_smola.nn import AdapterSpec
from omni_smola.training import optimizers, partitioned_step, program_cache

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fingerprints_are_values_and_functions_have_none():
  assert program_cache.fingerprint(1, "a", {"b": 2.0}) == program_cache.fingerprint(
      1, "a", {"b": 2.0})
  assert program_cache.fingerprint(1, "a") != program_cache.fingerprint(1, "b")
  assert program_cache.fingerprint(1, lambda step: step) is None
  assert program_cache.fingerprint(object()) is None


def test_programs_are_shared_only_inside_the_scope_and_only_for_equal_keys():
  built = []

  def build(name):
    return lambda: built.append(name) or name

  assert program_cache.get_or_build(("k",), build("outside")) == "outside"
  assert program_cache.get_or_build(("k",), build("outside again")) == "outside again"
  with program_cache.shared_programs():
    assert program_cache.get_or_build(("k",), build("first")) == "first"
    with program_cache.shared_programs():  # nested: still the same scope
      assert program_cache.get_or_build(("k",), build("second")) == "first"
    assert program_cache.get_or_build(("other",), build("other")) == "other"
    assert program_cache.get_or_build(("k", None), build("no value")) == "no value"
    assert program_cache.get_or_build(("k", None), build("no value 2")) == "no value 2"
  with program_cache.shared_programs():  # the first scope's programs are gone
    assert program_cache.get_or_build(("k",), build("fresh")) == "fresh"
  assert built == ["outside", "outside again", "first", "other", "no value", "no value 2",
                   "fresh"]


def test_a_store_keeps_the_programs_from_one_scope_to_the_next_and_unshared_builds_anew():
  store, built = collections.OrderedDict(), []

  def build(name):
    return lambda: built.append(name) or name

  with program_cache.shared_programs(store):
    assert program_cache.get_or_build(("k",), build("first")) == "first"
    with program_cache.unshared():
      assert program_cache.get_or_build(("k",), build("unshared")) == "unshared"
      with program_cache.shared_programs():  # a scope of its own, which leaves `store` be
        assert program_cache.get_or_build(("k",), build("inner")) == "inner"
    assert program_cache.get_or_build(("k",), build("again")) == "first"
  assert not program_cache.sharing() and list(store) == [("k",)]
  assert program_cache.get_or_build(("k",), build("outside")) == "outside"
  with program_cache.shared_programs(store):
    assert program_cache.get_or_build(("k",), build("kept")) == "first"
  with program_cache.shared_programs():
    assert program_cache.get_or_build(("k",), build("without the store")) == "without the store"
  assert built == ["first", "unshared", "inner", "outside", "without the store"]
  with program_cache.shared_programs():
    with pytest.raises(ValueError, match=r"nested in another"):
      with program_cache.shared_programs(store):
        pass


def test_a_shared_jit_is_one_program_and_another_key_or_sharding_is_another():
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:1]), ("data",))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  with program_cache.shared_programs():
    double = program_cache.jit(("double",), lambda x: 2 * x, out_shardings=replicated)
    again = program_cache.jit(("double",), lambda x: 3 * x, out_shardings=replicated)
    triple = program_cache.jit(("triple",), lambda x: 3 * x, out_shardings=replicated)
    unsharded = program_cache.jit(("double",), lambda x: 4 * x)
  assert again is double and float(again(jnp.float32(1))) == 2.0
  assert float(triple(jnp.float32(1))) == 3.0
  assert float(unsharded(jnp.float32(1))) == 4.0


def test_optimizer_specs_differ_with_every_setting_and_a_custom_schedule_has_none():
  def spec(**kwargs):
    return optimizers.create_optimizer(**kwargs).spec

  schedule = optimizers.learning_rate_schedule
  base = dict(name="adafactor", learning_rate=schedule("rsqrt", 1e-2, 10))
  assert spec(**base) == spec(**dict(base, learning_rate=schedule("rsqrt", 1e-2, 10)))
  for change in (dict(learning_rate=schedule("rsqrt", 3e-3, 10)),
                 dict(learning_rate=schedule("rsqrt", 1e-2, 20)),
                 dict(learning_rate=schedule("cosine", 1e-2, 10, total_steps=100)),
                 dict(learning_rate=1e-2), dict(name="adamw"), dict(clip_gradient_norm=None),
                 dict(adafactor_multiply_by_parameter_scale=True)):
    assert spec(**dict(base, **change)) != spec(**base), change
  assert spec(name="sgd", learning_rate=lambda step: 0.1 * step) is None


def test_schedules_are_values_that_keep_their_numbers():
  cosine = optimizers.learning_rate_schedule("cosine", 1.0, warmup_steps=10, total_steps=110,
                                             final_fraction=0.1)
  assert cosine == optimizers.learning_rate_schedule("cosine", 1.0, 10, 110, 0.1)
  np.testing.assert_allclose([float(cosine(s)) for s in (0, 5, 10, 60, 110, 500)],
                             [0.0, 0.5, 1.0, 0.55, 0.1, 0.1], rtol=1e-6)
  assert cosine != optimizers.learning_rate_schedule("cosine", 1.0, 10, 120, 0.1)
  # rsqrt does not read the run's length: runs of 30 and 1000 steps share a train step.
  rsqrt = optimizers.learning_rate_schedule("rsqrt", 1.0, warmup_steps=10, total_steps=30)
  assert rsqrt == optimizers.learning_rate_schedule("rsqrt", 1.0, 10, total_steps=1000)
  np.testing.assert_allclose([float(rsqrt(s)) for s in (5, 10, 40)], [0.5, 1.0, 0.5],
                             rtol=1e-6)


@pytest.fixture
def clean_gin():
  yield
  gin.clear_config()


def test_model_fingerprints_differ_with_adapters_and_with_what_layers_read_from_gin(
    clean_gin):
  del clean_gin

  def fingerprint(**spec):
    return model_lib.PaliModel("tiny", AdapterSpec(kind="omni_smola", **spec)).fingerprint

  assert fingerprint() == fingerprint()
  assert fingerprint(alpha=2.0) != fingerprint()
  assert fingerprint(rank=2) != fingerprint()
  assert model_lib.PaliModel("tiny").fingerprint != fingerprint()
  assert model_lib.PaliModel("tiny", decoding="beam").fingerprint != model_lib.PaliModel(
      "tiny").fingerprint
  before = fingerprint()
  gin.parse_config("omni_smola.nn.omni_smola.input_fusion.sequence_routing = True")
  assert fingerprint() != before


def test_the_accounting_traces_its_model_inside_a_sharing_scope_too():
  """The accounting reads what tracing records: a study's second arm of one model, whose
  abstract variables the first arm's run had shared, was refused as having no traced
  projections."""
  from omni_smola import accounting  # pylint: disable=g-import-not-at-top
  model = model_lib.PaliModel("tiny", AdapterSpec(kind="lora"))
  alone = accounting.account_model(model)
  with program_cache.shared_programs():
    for _ in range(2):  # the first would share its trace with the second
      assert accounting.account_model(model) == alone


def test_train_step_keys_follow_the_model_the_optimizer_and_the_nonfinite_policy():
  model = model_lib.PaliModel("tiny", AdapterSpec(kind="lora"))
  optimizer = optimizers.create_optimizer(learning_rate=1e-2)
  key = partitioned_step.train_step_key(model, optimizer)
  assert key == partitioned_step.train_step_key(
      model_lib.PaliModel("tiny", AdapterSpec(kind="lora")),
      optimizers.create_optimizer(learning_rate=1e-2))
  assert key != partitioned_step.train_step_key(model, optimizers.create_optimizer(
      learning_rate=2e-2))
  assert key != partitioned_step.train_step_key(model, optimizer, "skip")
  assert key != partitioned_step.train_step_key(model, optimizer, num_microbatches=2)


def test_every_gin_setting_the_layers_read_is_in_the_model_fingerprint():
  """A gin configurable of omni_smola/nn or omni_smola/models that is not a config class
  is read while tracing: unless listed in TRACE_TIME_SETTINGS, two models that differ
  only in it would share programs."""
  listed = {name for name, _ in model_lib.TRACE_TIME_SETTINGS}
  fingerprinted_classes = set()
  unlisted = []
  for package in ("nn", "models"):
    root = os.path.join(REPO, "omni_smola", package)
    for name in sorted(os.listdir(root)):
      if not name.endswith(".py"):
        continue
      source = open(os.path.join(root, name)).read()
      for match in re.finditer(r"@gin\.configurable[^\n]*\n(?:@[^\n]*\n)*(class|def) (\w+)",
                               source):
        kind, configurable = match.groups()
        if kind == "class":
          fingerprinted_classes.add(configurable)
        elif configurable not in listed:
          unlisted.append(f"{package}/{name}: {configurable}")
  assert not unlisted, unlisted
  # The classes are dataclasses in the fingerprint's config or adapters.
  assert {"PaliConfig", "T5Config", "ViTConfig", "AdapterSpec", "AdapterPlan"} <= (
      fingerprinted_classes)
