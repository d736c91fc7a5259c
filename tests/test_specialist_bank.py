"""Serving many specialists in one batch: a `task_lora` bank filled from specialist runs.

The reference is what serving one task at a time does: the specialist run's own model (a
plain LoRA in `specialist_adapter`) restored from that task's checkpoint, run on that
task's examples alone. A mixed batch through the bank must give the same logits and the
same greedy (cached) decodes, row for row.
"""
import os
import sys

import flax.linen as nn
import gin
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import model_fixtures
import train_common
from omni_smola import eval as eval_lib
from omni_smola import infer as infer_lib
from omni_smola import launching
from omni_smola.checkpoints import flatten, run_config, specialist_bank, unflatten
from omni_smola.checkpoints.specialist_bank import SpecialistBankError
from omni_smola.data import task_id
from omni_smola.model import PaliModel
from omni_smola.models import configs
from omni_smola.nn import AdapterConfigError, AdapterPlan, AdapterSpec
from omni_smola.nn.accounting import adapter_param_count

TASKS = ("mini_photo_qa", "mini_shapes_count")  # sorted: the bank's row order
GENERALIST = AdapterSpec(kind="lora", rank=2)
SPECIALIST = AdapterSpec(kind="lora", rank=2)
BANK = AdapterSpec(kind="task_lora", rank=2, tasks=TASKS)


@pytest.fixture(scope="module")
def models():
  """(one specialist run's model, the serving model with the bank)."""
  return (PaliModel("tiny", AdapterPlan(adapter=GENERALIST, specialist_adapter=SPECIALIST)),
          PaliModel("tiny", AdapterPlan(adapter=GENERALIST, specialist_adapter=BANK)))


def _batch(model, task_names):
  batch = model_fixtures.make_batch(model, prompt_lengths=(3, 4, 5, 2),
                                    target_lengths=(4, 6, 3, 5))
  batch["task_id"] = np.array([task_id(name) for name in task_names], np.int32)
  return batch


def _rows(batch, rows):
  return {key: value[list(rows)] for key, value in batch.items()}


def _with_specialist(params, seed):
  """`params` with fresh noise in the specialist slot (B != 0: the LoRA does something)."""
  rng = np.random.RandomState(seed)
  return unflatten({name: (0.3 * rng.randn(*np.shape(value))).astype(value.dtype)
                    if "/specialist_adapter/" in name else value
                    for name, value in flatten(params).items()})


def _abstract(model):
  """The model's parameters as unboxed `ShapeDtypeStruct`s: a target that allocates nothing."""
  return nn.unbox(model_fixtures.param_shapes(model, _batch(model, TASKS * 2)))


def _save(path, params, recorded=True, **spec):
  """A specialist checkpoint, with its run's record (`_record`) unless not `recorded`."""
  ocp.PyTreeCheckpointer().save(str(path), {"params": params})
  if recorded:
    _record(path, **spec)
  return str(path)


def _record(path, rank=SPECIALIST.rank, alpha=None):
  """The run's config.gin as the trainer writes it (gin's operative config format)."""
  path.joinpath(run_config.RUN_CONFIG_FILE).write_text(
      f"SPECIALIST_ALPHA = {alpha!r}\n"
      "MODEL/AdapterPlan.specialist_adapter = \\\n"
      "    @specialist/omni_smola.nn.adapter_spec.AdapterSpec()\n"
      "MODEL/specialist/AdapterSpec.alpha = %SPECIALIST_ALPHA\n"
      "MODEL/specialist/AdapterSpec.kind = 'lora'\n"
      f"MODEL/specialist/AdapterSpec.rank = {rank}\n")


@pytest.fixture(scope="module")
def runs(models, tmp_path_factory):
  """{task: specialist params} saved as checkpoints of one generalist; and the table."""
  specialist_model, _ = models
  base = model_fixtures.random_params(specialist_model, _batch(specialist_model, TASKS * 2))
  params = {task: _with_specialist(base, seed) for seed, task in enumerate(TASKS, 1)}
  root = tmp_path_factory.mktemp("specialists")
  table = {task: _save(root / task, params[task]) for task in TASKS}
  return params, table


@pytest.fixture(scope="module")
def bank_target(models):
  return _abstract(models[1])


@pytest.fixture(scope="module")
def bank_params(models, runs, bank_target):
  return specialist_bank.load_bank(runs[1], bank_target, models[1].adapters)


@pytest.fixture(scope="module")
def compiled(models):
  """Jitted logits of both models, and the bank's greedy decodes with the KV cache."""
  specialist_model, bank_model = models
  logits = [jax.jit(lambda params, batch, model=model: model._logits(params, batch))  # pylint: disable=protected-access
            for model in models]
  decode = jax.jit(lambda params, batch: bank_model.predict_batch_with_aux(
      params, batch, decoder_params={"decoding": "greedy", "use_cache": True})[0])
  return logits[0], logits[1], decode


def _only(bank_params, task):
  """The bank with every row holding `task`'s specialist: that task's own adapter."""
  row = TASKS.index(task)
  return unflatten({k: np.repeat(np.asarray(v)[row:row + 1], len(TASKS), axis=0)
                    if "/specialist_adapter/" in k else v
                    for k, v in flatten(bank_params).items()})


def test_the_bank_stacks_each_tasks_lora_in_sorted_task_order(runs, bank_params):
  params, _ = runs
  site = "text/decoder/layers_0/mlp/wo/specialist_adapter"
  bank = flatten(bank_params)
  for factor in ("lora_a", "lora_b"):
    for row, task in enumerate(TASKS):
      np.testing.assert_array_equal(np.asarray(bank[f"{site}/{factor}"][row]),
                                    flatten(params[task])[f"{site}/{factor}"])
  generalist = flatten(params[TASKS[0]])
  for name in ("text/encoder/layers_0/mlp/wi_0/kernel",
               "text/encoder/layers_0/mlp/wi_0/adapter/lora_b"):
    np.testing.assert_array_equal(np.asarray(bank[name]), generalist[name])
  d_in, d_out = bank["text/decoder/layers_0/mlp/wo/kernel"].shape
  assert adapter_param_count(BANK, d_in, d_out) == sum(
      bank[f"{site}/{factor}"].size for factor in ("lora_a", "lora_b"))


def test_a_mixed_batch_equals_each_task_alone_with_its_own_specialist(
    models, runs, bank_params, compiled):
  alone_logits, bank_logits, bank_decode = compiled
  params, _ = runs
  order = (TASKS[0], TASKS[1], TASKS[1], TASKS[0])
  mixed = _batch(models[1], order)
  logits = np.asarray(bank_logits(bank_params, mixed))
  decodes = np.asarray(bank_decode(bank_params, mixed))
  specialist_logits = {}
  for task in TASKS:
    rows = [i for i, name in enumerate(order) if name == task]
    # Teacher-forced: the specialist run's own model (a plain LoRA) on the task's rows.
    expected = np.asarray(alone_logits(params[task], _rows(mixed, rows)))
    specialist_logits[task] = expected
    np.testing.assert_allclose(logits[rows], expected, rtol=1e-5, atol=1e-5)
    # Cached greedy decoding: a batch of the task's rows alone (twice over, so the shape
    # and the compiled decoder are the mixed batch's) with only its specialist.
    alone = np.asarray(bank_decode(_only(bank_params, task), _rows(mixed, rows * 2)))
    np.testing.assert_array_equal(decodes[rows], alone[:len(rows)])
  # The specialists differ, so a row served by the wrong one would fail.
  assert not np.allclose(specialist_logits[TASKS[0]], specialist_logits[TASKS[1]], atol=1e-3)


def test_an_example_whose_task_has_no_specialist_gets_the_generalist_alone(
    models, runs, bank_params, compiled):
  alone_logits, bank_logits, _ = compiled
  params, _ = runs
  order = (TASKS[1], "mini_text_read", TASKS[1], "mini_digits_qa")
  mixed = _batch(models[1], order)
  logits = np.asarray(bank_logits(bank_params, mixed))
  no_specialist = unflatten({k: np.zeros_like(v) if "/specialist_adapter/lora_b" in k else v
                             for k, v in flatten(params[TASKS[1]]).items()})
  np.testing.assert_allclose(logits[[1, 3]],
                             np.asarray(alone_logits(no_specialist, _rows(mixed, [1, 3]))),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(logits[[0, 2]],
                             np.asarray(alone_logits(params[TASKS[1]], _rows(mixed, [0, 2]))),
                             rtol=1e-5, atol=1e-5)


def test_the_bank_loads_into_a_scanned_model(models, runs, bank_params):
  scanned = configs.CONFIGS["tiny"]
  scanned = configs.PaliConfig(text=configs.T5Config(**{**scanned.text.__dict__,
                                                       "scan_layers": True}),
                               vision=scanned.vision)
  model = PaliModel(scanned, models[1].adapters)
  loaded = flatten(specialist_bank.load_bank(runs[1], _abstract(model), model.adapters))
  per_layer = flatten(bank_params)
  stacked = loaded["text/decoder/layers/mlp/wo/specialist_adapter/lora_b"]
  assert stacked.shape[:2] == (scanned.text.num_decoder_layers, len(TASKS))
  np.testing.assert_array_equal(np.asarray(stacked[1]), np.asarray(
      per_layer["text/decoder/layers_1/mlp/wo/specialist_adapter/lora_b"]))


def test_a_checkpoint_without_a_specialist_is_an_error_naming_task_and_checkpoint(
    models, runs, bank_target, tmp_path):
  params, table = runs
  generalist = unflatten({k: v for k, v in flatten(params[TASKS[0]]).items()
                          if "/specialist_adapter/" not in k})
  path = _save(tmp_path / "generalist", generalist)
  abstract = bank_target
  with pytest.raises(SpecialistBankError,
                     match=rf"SPECIALISTS\['{TASKS[1]}'\]: checkpoint .*generalist has no "
                           "specialist_adapter parameters"):
    specialist_bank.load_bank({**table, TASKS[1]: path}, abstract, models[1].adapters)


def test_specialists_of_different_generalists_are_an_error_naming_both_and_the_path(
    models, runs, bank_target, tmp_path):
  params, table = runs
  flat = flatten(params[TASKS[1]])
  name = "text/encoder/layers_1/attention/query/adapter/lora_a"
  flat[name] = flat[name] + 1e-3
  path = _save(tmp_path / "other", unflatten(flat))
  abstract = bank_target
  with pytest.raises(SpecialistBankError) as raised:
    specialist_bank.load_bank({**table, TASKS[1]: path}, abstract, models[1].adapters)
  message = str(raised.value)
  assert table[TASKS[0]] in message and path in message and name in message
  assert "different generalists" in message


def test_each_specialist_is_served_at_its_own_runs_alpha(models, runs, bank_target, compiled,
                                                         tmp_path):
  """A specialist trained at alpha 8 (scale 4) in a bank of scale 1: its rows compute what
  its own model (a LoRA of alpha 8) computes, read from its run's config, not the bank's."""
  params, table = runs
  task = TASKS[1]
  path = _save(tmp_path / "alpha8", params[task], alpha=8.0)
  bank = specialist_bank.load_bank({**table, task: path}, bank_target, models[1].adapters)
  own_model = PaliModel("tiny", AdapterPlan(adapter=GENERALIST, specialist_adapter=AdapterSpec(
      kind="lora", rank=SPECIALIST.rank, alpha=8.0)))
  order = (TASKS[0], task, task, TASKS[0])
  mixed = _batch(models[1], order)
  logits = np.asarray(compiled[1](bank, mixed))
  own = np.asarray(jax.jit(own_model._logits)(params[task], _rows(mixed, [1, 2])))  # pylint: disable=protected-access
  np.testing.assert_allclose(logits[[1, 2]], own, rtol=1e-5, atol=1e-5)
  # The other row is untouched: its run recorded the bank's own scale.
  site = "text/decoder/layers_0/mlp/wo/specialist_adapter/lora_b"
  np.testing.assert_array_equal(np.asarray(flatten(bank)[site][0]),
                                flatten(params[TASKS[0]])[site])


def test_a_specialist_of_another_rank_or_without_a_record_is_an_error_naming_it(
    models, runs, bank_target, bank_params, tmp_path):
  params, table = runs
  task = TASKS[1]
  path = _save(tmp_path / "rank3", params[task], rank=3)
  with pytest.raises(SpecialistBankError,
                     match=rf"SPECIALISTS\['{task}'\] was trained at LoRA rank 3 .*rank3.*, "
                           r"the bank serves rank 2 \(SPECIALIST_RANK\)"):
    specialist_bank.load_bank({**table, task: path}, bank_target, models[1].adapters)
  path = _save(tmp_path / "unrecorded", params[task], recorded=False)
  with pytest.raises(SpecialistBankError,
                     match=rf"SPECIALISTS\['{task}'\]: no config.gin beside checkpoint "
                           r".*unrecorded .*bank's alpha/rank = 1"):
    specialist_bank.load_bank({**table, task: path}, bank_target, models[1].adapters)
  # Told to, it serves the unrecorded one at the bank's scale: what the recorded one gets.
  told = specialist_bank.load_bank({**table, task: path}, bank_target, models[1].adapters,
                                   unrecorded_scale="bank")
  reference = flatten(bank_params)
  for name, value in flatten(told).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(reference[name]))


def test_the_run_record_is_read_from_the_trainers_operative_config(tmp_path):
  """What `omni_smola.train` writes (gin's operative config of experiments/mini_specialist.gin)
  gives back the specialist slot's spec, found from a step directory two levels down."""
  gin.clear_config()
  try:
    launching.parse_gin(["experiments/mini_specialist.gin"], [
        "MODEL_DIR = 'unused'", "INITIAL_CHECKPOINT_PATH = 'unused'",
        "specialist/omni_smola.nn.adapter_spec.AdapterSpec.alpha = 8.0"],
                        [launching.REPO_GIN_CONFIGS])
    built = gin.query_parameter("%MODEL").scoped_configurable_fn().adapters
    (tmp_path / run_config.RUN_CONFIG_FILE).write_text(gin.operative_config_str())
  finally:
    gin.clear_config()
  step_dir = tmp_path / "checkpoints" / "300"
  step_dir.mkdir(parents=True)
  record, spec = run_config.recorded_spec(str(step_dir), "specialist_adapter")
  assert record == str(tmp_path / run_config.RUN_CONFIG_FILE)
  assert spec == built.specialist_adapter and (spec.kind, spec.rank, spec.alpha) == (
      "lora", 4, 8.0)
  assert run_config.recorded_spec(str(step_dir), "adapter")[1] == built.adapter


def test_bad_tables_and_plans_are_errors_naming_them(models, runs, bank_target):
  _, table = runs
  abstract = bank_target
  with pytest.raises(SpecialistBankError, match=r"SPECIALISTS\['mini_photo_qa'\] = .*nowhere"):
    specialist_bank.load_bank({**table, TASKS[0]: "/nowhere"}, abstract, models[1].adapters)
  with pytest.raises(SpecialistBankError, match=r"not SPECIALISTS' tasks .*mini_text_read"):
    specialist_bank.load_bank({**table, "mini_text_read": table[TASKS[0]]}, abstract,
                              models[1].adapters)
  with pytest.raises(SpecialistBankError, match="specialist_adapter is 'lora', not a 'task_lora'"):
    specialist_bank.load_bank(table, abstract, models[0].adapters)
  with pytest.raises(SpecialistBankError, match="SPECIALISTS must map task names"):
    specialist_bank.specialist_tasks({})


def test_bank_specs_are_validated_and_a_bank_without_task_ids_refuses_to_run(models,
                                                                            bank_target):
  with pytest.raises(AdapterConfigError, match="task_lora.*needs tasks"):
    AdapterSpec(kind="task_lora")
  with pytest.raises(AdapterConfigError, match=r"tasks=\('a',\) is only read by kind='task_lora'"):
    AdapterSpec(kind="lora", tasks=("a",))
  with pytest.raises(AdapterConfigError, match=r"names \['a'\] more than once"):
    AdapterSpec(kind="task_lora", tasks=("a", "b", "a"))
  _, bank_model = models
  batch = _batch(bank_model, TASKS * 2)
  del batch["task_id"]
  with pytest.raises(ValueError, match="task_lora bank needs each example's task id"):
    jax.eval_shape(lambda p: bank_model._logits(p, batch), bank_target)  # pylint: disable=protected-access


def test_eval_through_gin_refuses_a_mixture_task_without_a_specialist_before_writing(
    runs, tmp_path):
  """runs/serve_specialists.gin: SPECIALISTS names the bank's rows and reaches eval."""
  _, table = runs
  output_dir = tmp_path / "eval"
  gin_files = train_common.EVAL_GIN_FILES + ("runs/serve_specialists.gin",)
  train_common.configure(None, str(tmp_path / "data"), gin_files, train_common.EVAL_BINDINGS,
                         SPECIALISTS=table, EVAL_OUTPUT_DIR=str(output_dir))
  try:
    plan = gin.query_parameter("%MODEL").scoped_configurable_fn().adapters
    assert plan.specialist_adapter.kind == "task_lora" and plan.specialist_adapter.tasks == TASKS
    with pytest.raises(ValueError,
                       match=r"no specialist for the tasks \['mini_shapes_caption_tiny', "):
      eval_lib.evaluate()
    with pytest.raises(ValueError, match="CHECKPOINT_PATH='x' and SPECIALISTS are both set"):
      eval_lib.evaluate(checkpoint_path="x")
  finally:
    gin.clear_config()
  assert not output_dir.exists()


def test_infer_refuses_a_task_without_a_specialist(models, runs, tmp_path):
  _, table = runs
  with pytest.raises(launching.FlagError,
                     match=r"--task='mini_shapes_caption' has no specialist in SPECIALISTS"):
    infer_lib.infer(model=models[1], checkpoint_path=None, images=["x.png"],
                    task="mini_shapes_caption", module="tasks", specialists=table,
                    output_dir=str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
