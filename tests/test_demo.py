"""`make demo` end to end, as a new user runs it: from the repository root, into runs/.

The command is the Makefile's own recipe (`make -n demo`), with the tiny data config and a
few steps per phase passed through DEMO_FLAGS, run from the repository root where the
demo's `runs/` folder sits on the import path (`python -m`), which is what once broke
gin's include resolution.
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid

import pytest

import tasks.mini

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The mini mixture's three-task part (a caption, a count, a reading; every metric kind):
# a third of the input pipelines the nine tasks build in each of the eight phases.
TASKS = tasks.mini.TRIO_SUBTASKS
COLUMNS = ("backbone", "backbone + FT", "LoRA-{rank}", "Omni-SMoLA")
# `mini` with one layer per stack (--gin_bindings), which halves what the demo traces and
# compiles: Omni-SMoLA with 2 experts per group on its every projection trains 120,365
# parameters; a LoRA on the same projections 5,376 per rank: the demo's LoRA gets rank 22.
MATCHED_LORA_RANK = 22
ONE_LAYER_PER_STACK = tuple(f"{field}={value}"
                            for field, value in train_common.ONE_LAYER_PER_STACK.items())
TRIO = f"MIXTURE_OR_TASK_NAME='{tasks.mini.trio_name('tiny')}'"
DEMO_FLAGS = " ".join(["--data_config=tiny --pretrain_steps=2 --generalist_steps=2",
                       "--eval_examples=2 --experts_per_group=2",
                       *(f"--gin_bindings={binding}" for binding in ONE_LAYER_PER_STACK),
                       f'"--gin_bindings={TRIO}"'])
# A terminal log line (console.TERMINAL_FORMAT): level, date, time, the file that logged it.
LOG_LINE = re.compile(r"^[IWEF]\d{4} [\d:]+ ([\w.]+):\d+\] ")


def our_source_files():
  names = set()
  for package in ("omni_smola", "tasks"):
    for _, _, files in os.walk(os.path.join(REPO, package)):
      names.update(f for f in files if f.endswith(".py"))
  return names


def make_demo_command(run_dir: str):
  """What `make demo` runs (its last recipe line), with this interpreter as the venv's."""
  dry_run = subprocess.run(
      ["make", "-s", "-n", "demo", f"PY={sys.executable}", f"RUN_DIR={run_dir}",
       f"DEMO_FLAGS={DEMO_FLAGS}"], cwd=REPO, capture_output=True, text=True, check=True)
  return shlex.split(dry_run.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run_dir():
  """runs/<unique> under the repository root, as the default RUN_DIR=runs/demo is."""
  runs = os.path.join(REPO, "runs")
  made_runs = not os.path.isdir(runs)
  relative = os.path.join("runs", f"test-demo-{uuid.uuid4().hex[:8]}")
  yield relative
  shutil.rmtree(os.path.join(REPO, relative), ignore_errors=True)
  if made_runs and not os.listdir(runs):
    os.rmdir(runs)


def run_demo(run_dir: str) -> subprocess.CompletedProcess:
  env = dict(os.environ)
  env.pop("PYTHONPATH", None)  # as from a shell: `python -m` puts the cwd on the path
  result = subprocess.run(make_demo_command(run_dir), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-5000:]
  return result


def table_rows(stdout: str):
  """{task: [cell per column]} of the printed Markdown table, and its header."""
  lines = [line for line in stdout.splitlines() if line.startswith("|")]
  header = [cell.strip() for cell in lines[0].strip("|").split("|")]
  rows = {}
  for line in lines[2:]:
    cells = [cell.strip() for cell in line.strip("|").split("|")]
    rows[cells[0]] = cells[2:]
  return header, rows


@pytest.fixture(scope="module")
def first_and_second(run_dir):
  return run_demo(run_dir), run_demo(run_dir)


def test_the_demo_prints_a_row_per_task_and_a_column_per_model(first_and_second):
  first, _ = first_and_second
  header, rows = table_rows(first.stdout)
  assert header == ["task", "metric", *(c.format(rank=MATCHED_LORA_RANK) for c in COLUMNS)]
  assert set(rows) == {f"mini_{task}_tiny" for task in TASKS} | {"**mean**"}
  for task, cells in rows.items():
    assert len(cells) == len(COLUMNS), (task, cells)
    for cell in cells:
      assert 0.0 <= float(cell.strip("*")) <= 1000.0, (task, cells)  # CIDEr goes past 100


def test_the_terminal_shows_our_lines_and_the_log_file_the_libraries(first_and_second, run_dir):
  first, _ = first_and_second
  ours = our_source_files()
  for line in first.stderr.splitlines():
    if not line.strip():
      continue
    match = LOG_LINE.match(line)
    assert match and match.group(1) in ours, f"not one of our log lines: {line!r}"
  phases = [line for line in first.stderr.splitlines() if "] [demo] " in line]
  assert len(phases) >= 11, phases  # data, rank, 4 x training, 4 x evaluation
  assert re.search(r"step 2/2\s+loss [0-9.]+", first.stderr)  # training progress
  log = open(os.path.join(REPO, run_dir, "demo.log")).read()
  assert "dataset_providers.py" in log or "reader.py" in log  # seqio / TFDS INFO lines
  assert "[demo] evaluating omni_smola" in log  # our own lines too
  assert "did not fully read the dataset being cached" not in log  # fixed at its source


def test_a_second_demo_skips_what_is_done_and_prints_the_same_table(first_and_second):
  first, second = first_and_second
  assert table_rows(second.stdout) == table_rows(first.stdout)
  assert second.stderr.count("nothing to train") == len(COLUMNS), second.stderr[-3000:]
  assert second.stderr.count("evaluated before") == len(COLUMNS), second.stderr[-3000:]


def test_gin_bindings_reach_every_phase(first_and_second, run_dir):
  del first_and_second
  for name in ("backbone", "continued_ft", "lora", "omni_smola"):
    operative = open(os.path.join(REPO, run_dir, name, "config.gin")).read()
    for binding in ONE_LAYER_PER_STACK:
      field, value = binding.rsplit("=", 1)
      class_and_field = ".".join(field.split(".")[-2:])  # MODEL/T5Config.num_... = 1
      assert re.search(rf"\b{class_and_field} = {value}$", operative, re.M), (name, binding)


def test_the_binaries_flags_the_demo_cannot_honour_are_refused_before_anything_is_written(
    tmp_path):
  run_dir = tmp_path / "demo"
  result = subprocess.run(
      [sys.executable, "-m", "omni_smola.demo", f"--run_dir={run_dir}", "--gin_file=x.gin",
       "--tfds_data_dir=/tmp/data"], cwd=REPO, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "the demo does not take --gin_file, --tfds_data_dir" in result.stderr, (
      result.stderr[-2000:])
  assert not run_dir.exists()
