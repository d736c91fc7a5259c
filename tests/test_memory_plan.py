"""The memory plan (`python -m omni_smola.params --plan`): the compiled train step's bytes
per device on simulated devices, the verdict against a device's memory, and bad flags.

One CLI run on the tiny config (a data 2 x model 2 mesh) is shared by the tests; the bad
inputs fail before anything is compiled, so they run in this process.
"""
import json
import os
import subprocess
import sys

from absl import flags
import gin
import pytest

from omni_smola import launching, memory_plan, params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 8, "targets": 4}
TINY = ["--gin_file=models/tiny.gin", "--gin_file=adapters/lora.gin",
        f"--gin.TASK_FEATURE_LENGTHS={LENGTHS!r}"]


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  output = tmp_path_factory.mktemp("plan") / "plan.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "omni_smola.params", *TINY, "--gin.BATCH_SIZE=4", "--plan",
       "--mesh=data:2,model:2", "--device_memory=1GiB", f"--output={output}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout, json.loads(output.read_text())


def test_the_plan_prints_each_devices_bytes_and_the_verdict(tiny_plan):
  stdout, plan = tiny_plan
  assert "mesh data 2 x model 2 (4 simulated cpu devices)" in stdout
  for row in ("parameters, frozen", "optimizer state (adafactor)", "temporaries", "total",
              "all devices"):
    assert row in stdout, row
  assert "fits: yes" in stdout and plan["fits"] is True
  assert plan["mesh"] == {"data": 2, "model": 2} and plan["num_devices"] == 4
  assert plan["xla_bytes"]["temp"] > 0
  assert isinstance(plan["compile_seconds"], float)  # reported, never judged: speed is benchmarks'/


def test_parameters_count_their_shard_and_the_batch_its_rows(tiny_plan):
  _, plan = tiny_plan
  mine, whole = plan["per_device_bytes"], plan["global_bytes"]
  # The model axis splits the wide kernels in two; norms and position tables replicate.
  assert whole["frozen_parameters"] / 2 < mine["frozen_parameters"] < whole["frozen_parameters"]
  assert whole["batch"] == 2 * mine["batch"]  # the data axis splits the rows
  # Two rows per device: image 16x16x3 float32, encoder tokens, three decoder features,
  # task_id.
  assert mine["batch"] == 2 * 4 * (16 * 16 * 3 + LENGTHS["inputs"] + 3 * LENGTHS["targets"]
                                   + 1)
  # XLA's arguments leave out what the step never reads (Adafactor's placeholders,
  # task_id), which still sits on the device.
  assert 0 < plan["input_bytes"] - plan["xla_bytes"]["argument"] < 0.01 * plan["input_bytes"]
  xla = plan["xla_bytes"]
  assert plan["total_bytes"] == (plan["input_bytes"] + xla["output"] - xla["alias"]
                                 + xla["temp"] + xla["generated_code"])


def test_the_step_fits_exactly_up_to_the_device_memory(tiny_plan):
  _, plan = tiny_plan
  total = plan["total_bytes"]
  assert memory_plan.with_verdict(plan, total)["fits"]
  short = memory_plan.with_verdict(plan, total - 1)
  assert not short["fits"]
  assert "fits: NO (1 B over)" in params.format_plan(short)


# --------------------------------------------------------------------- bad inputs


@pytest.fixture
def cli(tmp_path):
  """Runs params.main in this process; returns the --output path it was given."""
  output = tmp_path / "plan.json"
  gin.clear_config()

  def run(*args):
    flags.FLAGS(launching.rewrite_gin_args(["params", *args, f"--output={output}"]))
    params.main(["params"])

  yield run, output
  flags.FLAGS.unparse_flags()
  gin.clear_config()


@pytest.mark.parametrize("mesh,num_devices,named", [
    ("data:-1,model:3", 16, r"--mesh=data:-1,model:3 does not fit --num_devices=16: 16 "
                            r"devices are not divisible by model=3"),
    ("data:4,model:4", 8, r"--mesh=data:4,model:4 does not fit --num_devices=8: data=4 x "
                          r"model=4 x expert=1 != 8"),
    ("data:2,modle:2", None, r"--mesh=data:2,modle:2: .*'modle:2' is not AXIS:SIZE"),
])
def test_a_mesh_that_does_not_divide_the_devices_exits_naming_it(cli, mesh, num_devices,
                                                                 named):
  run, output = cli
  devices = [] if num_devices is None else [f"--num_devices={num_devices}"]
  with pytest.raises(SystemExit, match=named):
    run(*TINY, "--plan", f"--mesh={mesh}", *devices, "--device_memory=32GiB")
  assert not output.exists()


def test_a_device_memory_unit_not_understood_exits_naming_it(cli):
  run, output = cli
  with pytest.raises(SystemExit, match=r"--device_memory=32 gigs: '32 gigs' is not a "
                                       r"number of bytes with a unit of B, KB"):
    run(*TINY, "--plan", "--mesh=data:1", "--device_memory=32 gigs")
  assert not output.exists()


def test_microbatches_that_do_not_divide_the_hosts_batch_exit_naming_them(cli):
  run, output = cli
  with pytest.raises(SystemExit, match=r"NUM_MICROBATCHES=4 \(train.num_microbatches\) "
                                       r"does not divide the per-host batch of 6 rows"):
    run(*TINY, "--gin.BATCH_SIZE=6", "--gin.NUM_MICROBATCHES=4", "--plan",
        "--mesh=data:1", "--device_memory=32GiB")
  assert not output.exists()


def test_plan_flags_without_plan_are_an_error_not_a_no_op(cli):
  run, _ = cli
  with pytest.raises(SystemExit, match=r"--mesh, --device_memory only act with --plan"):
    run(*TINY, "--mesh=data:1", "--device_memory=32GiB")


def test_parse_bytes_units():
  assert [memory_plan.parse_bytes(t) for t in ("4096", "1KiB", "2 MB", "32GiB", "0.5TiB")] == [
      4096, 1024, 2_000_000, 32 * 2**30, 2**39]
  with pytest.raises(ValueError, match="'32gb'"):
    memory_plan.parse_bytes("32gb")
