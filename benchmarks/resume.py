"""Time to the first resumed step of the `mini` generalist, after 10 and after 5,000 steps.

One JSON object per line:
  case           resume_10, resume_5000: resumed from the checkpoint's input iterator state;
                 skip_5000: the same 5,000-step checkpoint without its iterator state (the
                 fallback, which replays the consumed batches; --skip_repeats=0 leaves it out)
  position       batches consumed at the checkpoint
  seconds        median over repeats of the seconds from launching a fresh Python process to
                 the end of its first resumed step
  samples        each repeat's seconds
  resumed_from   how the input got to its position: "state" or "skip"
  state_bytes    this host's iterator state in the checkpoint (0: none)
then {"case": "ratio", "resume_5000_vs_resume_10": ..., "target": 1.2}.

Each timed process parses the mini generalist's gin config (experiments/mini_generalist.gin,
batch 32, a fresh backbone instead of INITIAL_CHECKPOINT_PATH) and calls the real
`trainer.train`, which restores the latest checkpoint of its MODEL_DIR as any resume does:
the train state, the position, then the input iterator (`data_iterator.resume`). The process
reports the wall-clock time once its first step's metrics are fetched and exits. Its start
is taken just before it is launched, so imports, set-up and compilation count; all runs
share a persistent compilation cache, warmed by an untimed first run, so compilation costs
each case the same. Cases run round-robin.

How the two checkpoints are made:
  10      a real 10-step run (`trainer.train`, TRAIN_STEPS=10).
  5,000   the 10-step checkpoint's train state with its step set to 5,000, saved beside an
          input iterator that really consumed 5,000 batches: restored from the 10-step
          state and advanced 4,990 batches through the whole pipeline (no training), then
          saved by `RunCheckpointer.save` as the trainer saves. Only the parameters are
          those of step 10; what a resume reads (state tree, position, iterator state) has
          the shape and content a 5,000-step run's checkpoint would have.

  python benchmarks/resume.py [--repeats 3] [--skip_repeats 1] [--workdir DIR]
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

GIN_FILES = ("experiments/mini_generalist.gin",)
FAR = 5000
NEAR = 10


def bindings(model_dir: str, train_steps: int):
  return [f"MODEL_DIR = {model_dir!r}", f"TRAIN_STEPS = {train_steps}",
          "INITIAL_CHECKPOINT_PATH = None", f"CHECKPOINT_PERIOD = {NEAR}",
          "omni_smola.training.checkpointing.CheckpointConfig.export_adapters = False"]


def configure(model_dir: str, data_dir: str, train_steps: int) -> None:
  """The mini generalist's config, as `python -m omni_smola.train` parses it."""
  import seqio  # pylint: disable=g-import-not-at-top
  from omni_smola import launching  # pylint: disable=g-import-not-at-top
  seqio.set_tfds_data_dir_override(data_dir)
  launching.parse_gin(list(GIN_FILES), bindings(model_dir, train_steps))


def child(model_dir: str, data_dir: str, position: int) -> None:
  """Resumes `model_dir` (at `position`), prints when its first step is done, exits."""
  from omni_smola.training import data_iterator, trainer  # pylint: disable=g-import-not-at-top
  seen = {}
  restore = data_iterator.resume

  def recording_resume(*args, **kwargs):
    batches = restore(*args, **kwargs)
    seen["resumed_from"] = batches.resumed_from
    return batches

  data_iterator.resume = recording_resume

  def first_step(step):
    print(json.dumps({"time": time.time(), "step": step, **seen}), flush=True)
    os._exit(0)  # pylint: disable=protected-access

  configure(model_dir, data_dir, position + 1)
  trainer.train(callbacks=[first_step])
  raise SystemExit(f"{model_dir} did not resume at {position}")


def state_bytes(step_dir: str) -> int:
  states = os.path.join(step_dir, "data_iterator")
  if not os.path.isdir(states):
    return 0
  return sum(os.path.getsize(os.path.join(states, n)) for n in os.listdir(states)
             if n.startswith("process_"))


def prepare(workdir: str, data_dir: str) -> None:
  """The mini data, the 10-step run and the 5,000-step checkpoints, unless already there."""
  import gin  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import tasks.mini  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from omni_smola.training import checkpointing, data_iterator, iterator_state, trainer
  tasks.mini.prepare("full", data_dir=data_dir)
  near = os.path.join(workdir, "resume_10")
  far = os.path.join(workdir, "resume_5000")
  skip = os.path.join(workdir, "skip_5000")
  near_step = os.path.join(near, "checkpoints", str(NEAR))
  if not os.path.isdir(near_step):
    shutil.rmtree(near, ignore_errors=True)
    configure(near, data_dir, NEAR)
    trainer.train()
    gin.clear_config()
  far_step = os.path.join(far, "checkpoints", str(FAR))
  if not os.path.isdir(far_step):
    shutil.rmtree(far, ignore_errors=True)
    configure(far, data_dir, FAR)
    cfg = gin.query_parameter("train.train_dataset_cfg").scoped_configurable_fn()
    state = ocp.StandardCheckpointer().restore(os.path.join(near_step, "state"))
    state["step"] = np.asarray(FAR, np.asarray(state["step"]).dtype)
    with open(os.path.join(near_step, "data", "metadata")) as f:
      position = json.load(f)
    prefix, _ = iterator_state.locate(near_step)
    batches = data_iterator.TrainBatches(cfg, position["image_size"], 1)
    batches.restore(prefix, position["batches_consumed"])
    start = time.perf_counter()
    for _ in range(FAR - NEAR):
      next(batches)
    print(json.dumps({"setup": f"advanced the input {FAR - NEAR} batches",
                      "seconds": round(time.perf_counter() - start, 1)}), flush=True)
    checkpointer = checkpointing.RunCheckpointer(far)
    checkpointer.save(FAR, state, batches.position(), data_iterator=batches.checkpointable)
    checkpointer.close()
    gin.clear_config()
  shutil.rmtree(skip, ignore_errors=True)
  shutil.copytree(far_step, os.path.join(skip, "checkpoints", str(FAR)),
                  ignore=shutil.ignore_patterns("data_iterator"))


def time_case(model_dir: str, position: int, data_dir: str, env: dict):
  """(seconds from launch to the end of the first resumed step, how the input resumed)."""
  argv = [sys.executable, os.path.abspath(__file__), "--child", model_dir,
          "--data_dir", data_dir, "--position", str(position)]
  start = time.time()
  result = subprocess.run(argv, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
  lines = [l for l in result.stdout.splitlines() if l.startswith("{")]
  if result.returncode or not lines:
    raise SystemExit(f"resuming {model_dir} failed:\n{result.stderr[-3000:]}")
  report = json.loads(lines[-1])
  if report["step"] != position + 1:
    raise SystemExit(f"{model_dir} resumed at step {report['step'] - 1}, not {position}")
  return report["time"] - start, report.get("resumed_from")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--skip_repeats", type=int, default=1)
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(),
                                                        "omni_smola_resume_benchmark"))
  parser.add_argument("--child")
  parser.add_argument("--data_dir")
  parser.add_argument("--position", type=int)
  args = parser.parse_args()
  if args.child:
    child(args.child, args.data_dir, args.position)
    return
  os.makedirs(args.workdir, exist_ok=True)
  data_dir = os.path.join(args.workdir, "data")
  env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"),
             TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO,
             JAX_COMPILATION_CACHE_DIR=os.path.join(args.workdir, "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  # Set-up in its own process, so the timed ones start as cold as a relaunched job.
  subprocess.run([sys.executable, os.path.abspath(__file__), "--prepare_only",
                  args.workdir], env=env, cwd=REPO, check=True)
  cases = {"resume_10": (os.path.join(args.workdir, "resume_10"), NEAR),
           "resume_5000": (os.path.join(args.workdir, "resume_5000"), FAR),
           "skip_5000": (os.path.join(args.workdir, "skip_5000"), FAR)}
  time_case(*cases["resume_10"], data_dir, env)  # warms the compilation cache
  samples = {name: [] for name in cases}
  modes = {}
  for repeat in range(max(args.repeats, args.skip_repeats)):
    for name, (model_dir, position) in cases.items():
      if repeat < (args.skip_repeats if name.startswith("skip") else args.repeats):
        seconds, modes[name] = time_case(model_dir, position, data_dir, env)
        samples[name].append(seconds)
  medians = {}
  for name, (model_dir, position) in cases.items():
    if not samples[name]:
      continue
    medians[name] = statistics.median(samples[name])
    print(json.dumps({
        "case": name, "position": position, "seconds": round(medians[name], 2),
        "samples": [round(s, 2) for s in samples[name]], "resumed_from": modes[name],
        "state_bytes": state_bytes(os.path.join(model_dir, "checkpoints", str(position)))}))
  print(json.dumps({"case": "ratio", "resume_5000_vs_resume_10":
                    round(medians["resume_5000"] / medians["resume_10"], 3), "target": 1.2}))


if __name__ == "__main__":
  if len(sys.argv) == 3 and sys.argv[1] == "--prepare_only":
    workdir = sys.argv[2]
    prepare(workdir, os.path.join(workdir, "data"))
  else:
    main()
