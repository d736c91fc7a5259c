"""The tiny training config the train / eval / infer tests share (and helpers).

Every test that trains uses the same gin files and bindings, so each compiled
program (init, train step, predict) is the same HLO everywhere and the JAX
persistent compilation cache (`enable_compilation_cache`) serves it to every test
process, pytest worker and subprocess after the first compile.
"""
import os
import subprocess
import sys
import tempfile
from typing import Dict, List, Optional, Sequence

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# One layer per stack: what every tiny run traces and compiles halves (Omni-SMoLA's
# projections are most of it). The demo's test binds it too. Stacks of several layers are
# test_layer_stack's, test_models_*'s and test_analyze's (its own bindings).
ONE_LAYER_PER_STACK: Dict[str, object] = {
    "omni_smola.models.configs.T5Config.num_encoder_layers": 1,
    "omni_smola.models.configs.T5Config.num_decoder_layers": 1,
    "omni_smola.models.configs.ViTConfig.depth": 1,
}
GIN_FILES = ("models/tiny.gin", "adapters/omni_smola.gin", "runs/generalist.gin")
BINDINGS: Dict[str, object] = {
    "MIXTURE_OR_TASK_NAME": "mini_trio_tiny",  # three tasks: a third of the pipelines
    "TASK_FEATURE_LENGTHS": {"inputs": 16, "targets": 16},
    "BATCH_SIZE": 8,
    "EVAL_BATCH_SIZE": 8,
    "EVAL_PERIOD": 0,
    "CHECKPOINT_PERIOD": 10,
    "LEARNING_RATE": 1e-2,
    "WARMUP_STEPS": 10,
    "omni_smola.models.configs.T5Config.vocab_size": 1024,  # the mini vocabulary: 1000 pieces
    "omni_smola.nn.adapter_spec.AdapterSpec.rank": 2,
    "omni_smola.nn.adapter_spec.AdapterSpec.experts_per_group": {"mm": 2, "vis": 2, "txt": 2},
    "omni_smola.training.trainer.train.log_period": 5,
    **ONE_LAYER_PER_STACK,
}
# What the eval and infer runs share with training: the model, its adapter, the data.
MODEL_BINDINGS = {k: v for k, v in BINDINGS.items()
                  if k.startswith("omni_smola.model") or k.startswith("omni_smola.nn")}
EVAL_GIN_FILES = ("models/tiny.gin", "adapters/omni_smola.gin", "runs/eval.gin")
EVAL_BINDINGS: Dict[str, object] = dict(
    MODEL_BINDINGS, MIXTURE_OR_TASK_NAME="mini_trio_tiny",
    TASK_FEATURE_LENGTHS={"inputs": 16, "targets": 16}, EVAL_BATCH_SIZE=8,
    EVAL_NUM_EXAMPLES=4)
INFER_GIN_FILES = ("models/tiny.gin", "adapters/omni_smola.gin", "runs/infer.gin")
INFER_BINDINGS: Dict[str, object] = dict(
    MODEL_BINDINGS, VOCABULARY="mini", INPUT_LENGTH=16, MAX_DECODE_LENGTH=16)
CACHE_DIR = os.path.join(tempfile.gettempdir(), f"omni_smola_test_jax_cache_{os.getuid()}")


def enable_compilation_cache() -> None:
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  # Cache keys hash the program with its source locations; full tracebacks would make
  # them depend on who called the trainer (a test, the binary), defeating the cache.
  jax.config.update("jax_include_full_tracebacks_in_locations", False)


# What only the in-process runs (`configure`) add: settings of speed, not of results.
# A tiny run's evaluation of 4 examples a task costs less untuned than tf.data's
# rewrites and autotuner cost (ModelEvaluator.tune_input_pipeline).
IN_PROCESS_BINDINGS = ["omni_smola.evaluation.evaluator.ModelEvaluator.tune_input_pipeline = False"]


def bindings(base: Optional[Dict[str, object]] = None, **overrides) -> List[str]:
  merged = dict(BINDINGS if base is None else base)
  merged.update(overrides)
  return [f"{k} = {v!r}" for k, v in merged.items()]


def configure(model_dir: Optional[str], data_dir: str, gin_files: Sequence[str] = GIN_FILES,
              base: Optional[Dict[str, object]] = None, **overrides) -> None:
  """Parses the tiny config as the train binary would, pointing at `data_dir`."""
  import gin  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  from omni_smola import launching  # pylint: disable=g-import-not-at-top
  from omni_smola.evaluation import evaluator  # pylint: disable=g-import-not-at-top,unused-import
  seqio.set_tfds_data_dir_override(data_dir)
  gin.clear_config()
  if model_dir is not None:
    overrides.setdefault("MODEL_DIR", model_dir)
  launching.parse_gin(list(gin_files), bindings(base, **overrides) + IN_PROCESS_BINDINGS,
                      [launching.REPO_GIN_CONFIGS])


def prepare_data(data_dir: str) -> str:
  import tasks.mini  # pylint: disable=g-import-not-at-top
  tasks.mini.prepare("tiny", data_dir=data_dir)
  return data_dir


def binary_command(binary: str, data_dir: str, gin_files: Sequence[str] = GIN_FILES,
                   base: Optional[Dict[str, object]] = None, **overrides) -> List[str]:
  """argv of `python -m omni_smola.<binary>` with the tiny config."""
  argv = [sys.executable, "-m", f"omni_smola.{binary}", f"--tfds_data_dir={data_dir}"]
  argv += [f"--gin_file={f}" for f in gin_files]
  merged = dict(BINDINGS if base is None else base)
  merged.update(overrides)
  argv += [f"--gin_bindings={k} = {v!r}" for k, v in merged.items()]
  return argv


def binary_env() -> Dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3", JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5",
             JAX_INCLUDE_FULL_TRACEBACKS_IN_LOCATIONS="false",
             PYTHONPATH=os.pathsep.join([REPO, env.get("PYTHONPATH", "")]))
  return env


def run_binary(binary: str, data_dir: str, gin_files: Sequence[str] = GIN_FILES,
               extra_args: Sequence[str] = (), timeout: int = 300,
               base: Optional[Dict[str, object]] = None,
               **overrides) -> subprocess.CompletedProcess:
  argv = binary_command(binary, data_dir, gin_files, base, **overrides) + list(extra_args)
  return subprocess.run(argv, env=binary_env(), cwd=REPO, capture_output=True, text=True,
                        timeout=timeout)


def read_params(step_dir: str) -> Dict[str, "object"]:
  """{path: np.ndarray} of a checkpoint's parameters (the checkpoint engineer's reader)."""
  from omni_smola.checkpoints import read_orbax  # pylint: disable=g-import-not-at-top
  return read_orbax(step_dir)


def read_position(step_dir: str) -> Dict[str, object]:
  import json  # pylint: disable=g-import-not-at-top
  with open(os.path.join(step_dir, "data", "metadata")) as f:
    return json.load(f)


SHARED_RUN_STEPS = 30
# Bump when what the shared run writes changes: a pytest run without workers keeps it
# beside its session directories, where a later session (and newer code) finds it.
# 2: checkpoints hold the input iterator's state.
# 3: the run trains on mini_trio_tiny (was mini_generalist_tiny).
# 4: positions record the Pix2Struct cut; one layer per stack.
SHARED_RUN_FORMAT = 4


def shared_tiny_run(root: str, data_dir: str):
  """(model_dir, summary) of one 30-step tiny run shared by every test of a pytest session.

  The first process to ask trains it (checkpoints at 10, 20, 30; an evaluation of four
  examples per task at 30); the others wait on a lock and read it. `summary` holds the
  logged losses and the evaluation results.
  """
  import fcntl  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import shutil  # pylint: disable=g-import-not-at-top
  run_dir = os.path.join(root, "shared_tiny_run")
  done = os.path.join(root, "shared_tiny_run.json")
  with open(os.path.join(root, ".shared_tiny_run.lock"), "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      if _shared_run_format(done) != SHARED_RUN_FORMAT:
        import gin  # pylint: disable=g-import-not-at-top
        from omni_smola.training import trainer  # pylint: disable=g-import-not-at-top
        shutil.rmtree(run_dir, ignore_errors=True)
        configure(run_dir, data_dir, TRAIN_STEPS=SHARED_RUN_STEPS,
                  EVAL_PERIOD=SHARED_RUN_STEPS, EVAL_NUM_EXAMPLES=4)
        try:
          result = trainer.train()
        finally:
          gin.clear_config()
        with open(done + ".tmp", "w") as f:
          json.dump({"format": SHARED_RUN_FORMAT, "loss_history": result.loss_history,
                     "eval_results": {str(k): v for k, v in result.eval_results.items()}}, f)
        os.rename(done + ".tmp", done)
    finally:
      fcntl.flock(lock, fcntl.LOCK_UN)
  with open(done) as f:
    return run_dir, json.load(f)


def _shared_run_format(done: str):
  import json  # pylint: disable=g-import-not-at-top
  if not os.path.exists(done):
    return None
  with open(done) as f:
    return json.load(f).get("format")
