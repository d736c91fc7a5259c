r"""`make demo`: the whole recipe on the offline mini mixture, on a laptop CPU.

    python -m omni_smola.demo --run_dir=runs/demo

1. builds the mini mixture's TFDS dataset into RUN_DIR/tfds (once);
2. pretrains the `mini` backbone briefly, every parameter trained
   (experiments/mini_pretrain.gin; it stands in for a released checkpoint);
3. trains an Omni-SMoLA generalist on the frozen backbone
   (experiments/mini_generalist.gin) and, to compare it with, a LoRA generalist whose
   rank gives it as many trainable parameters as the Omni-SMoLA one
   (experiments/mini_generalist_lora.gin with the rank computed by
   `accounting.matching_lora_rank`), and the control that rules out "it just trained
   longer": the backbone trained on, every parameter, for as many steps
   (experiments/mini_continued_ft.gin);
4. evaluates the four (experiments/mini_eval.gin) and prints a per-task table.

It is one seed: the table shows the recipe running, not which method is better. The
study runner (`make study`) repeats the comparison over seeds, with spreads.

Every phase goes through the binaries' own code (gin files parsed as
`--gin_file` / `--gin.NAME=VALUE` would be, then `trainer.train` or
`eval.evaluate`), in this one process. Checkpoints, TensorBoard logs
(RUN_DIR/<run>/train), metrics.json and predictions stay under RUN_DIR; a second
`make demo` resumes or skips what is done. `tensorboard --logdir RUN_DIR` shows
the curves. The terminal shows one line per phase, the training progress and the
table; RUN_DIR/demo.log has everything, libraries' logs included (`omni_smola.console`).
"""
if __name__ == "__main__":
  from omni_smola import console  # pylint: disable=g-import-not-at-top
  console.hold_native_stderr()  # before TensorFlow loads and prints its start-up lines

import json
import os
import time
from typing import Dict, Optional, Sequence, Tuple

from absl import app
from absl import flags
from absl import logging
import gin

from omni_smola import accounting
from omni_smola import console
from omni_smola import eval as eval_lib
from omni_smola import launching
from omni_smola.evaluation import evaluator, tables
from omni_smola.training import checkpointing, trainer

flags.DEFINE_string("run_dir", "runs/demo", "Where everything the demo makes goes.")
flags.DEFINE_integer("pretrain_steps", None, "Overrides the backbone's TRAIN_STEPS.")
# 300, the mini study's ADAPTER_STEPS (gin_configs/studies/mini_table3.gin): the demo runs the
# study's recipe for one seed, and stays within ten minutes on two cores.
flags.DEFINE_integer("generalist_steps", 300, "TRAIN_STEPS of the generalists and of the "
                     "continued-FT control (0: the experiments' gin files' own).")
flags.DEFINE_integer("eval_examples", None, "Overrides EVAL_NUM_EXAMPLES (per task).")
flags.DEFINE_string("data_config", "full", "Mini dataset config: 'full' or 'tiny'.")
flags.DEFINE_integer("experts_per_group", None,
                     "Overrides Omni-SMoLA's experts per group (mm, vis, txt); the gin file "
                     "says 16.")
FLAGS = flags.FLAGS
# The demo honours one of the binaries' flags (omni_smola.launching): --gin_bindings, which
# follow its own bindings in every phase (training, evaluation and the LoRA rank). It
# refuses the others, whatever launching defines: each phase picks its own gin files, data
# directory and single process.
HONOURED_BINARY_FLAGS = ("gin_bindings",)

# (run name, experiment, adapters include for evaluation, label in the table); `lora`'s
# label gets its rank, which matches Omni-SMoLA's trainable parameters.
RUNS = (
    ("backbone", "experiments/mini_pretrain.gin", "adapters/full.gin", "backbone"),
    ("continued_ft", "experiments/mini_continued_ft.gin", "adapters/full.gin",
     "backbone + FT"),
    ("lora", "experiments/mini_generalist_lora.gin", "adapters/lora.gin", "LoRA"),
    ("omni_smola", "experiments/mini_generalist.gin", "adapters/omni_smola.gin",
     "Omni-SMoLA"),
)
LORA_RANK = "omni_smola.nn.adapter_spec.AdapterSpec.rank"
# The matched-rank LoRA keeps alpha at the gin file's rank, so alpha / r shrinks as r grows
# and every rank takes the step the gin file's learning rate was tuned for. At alpha = r
# (a scale of one) rank 179 collapsed at rank 4's learning rate (README).
LORA_ALPHA = "omni_smola.nn.adapter_spec.AdapterSpec.alpha"
# What a finished evaluation of a run is kept under, to be reused by the next demo.
EVAL_RECORD = "demo_eval.json"


def _configure(gin_files: Sequence[str], bindings: Dict[str, object]) -> None:
  """Gin as the binaries set it from --gin_file and --gin.NAME=VALUE, then --gin_bindings."""
  gin.clear_config()
  launching.parse_gin(list(gin_files),
                      [f"{k} = {v!r}" for k, v in bindings.items()] + FLAGS.gin_bindings,
                      [launching.REPO_GIN_CONFIGS])


def _run_bindings(name: str, lora: Tuple[int, float]) -> Dict[str, object]:
  """What the flags change in every phase (the data config, the experts per group), and
  the LoRA run's (rank, alpha)."""
  bindings = {LORA_RANK: lora[0], LORA_ALPHA: lora[1]} if name == "lora" else {}
  if FLAGS.data_config == "tiny":
    bindings["MIXTURE_OR_TASK_NAME"] = "mini_generalist_tiny"
  if FLAGS.experts_per_group:
    experts = FLAGS.experts_per_group
    bindings["omni_smola.nn.adapter_spec.AdapterSpec.experts_per_group"] = {
        "mm": experts, "vis": experts, "txt": experts}
  return bindings


def matched_lora() -> Tuple[int, float]:
  """The LoRA rank with the trainable parameters of the demo's Omni-SMoLA generalist, and
  the alpha that keeps the LoRA gin file's scale (alpha = its rank)."""
  placeholders = {"MODEL_DIR": "", "INITIAL_CHECKPOINT_PATH": ""}
  _configure(["experiments/mini_generalist.gin"],
             {**placeholders, **_run_bindings("", (0, 0.0))})
  target = accounting.trainable_parameter_count(launching.evaluated_macro("MODEL"))
  _configure(["experiments/mini_generalist_lora.gin"], placeholders)
  lora_model = launching.evaluated_macro("MODEL")
  spec = lora_model.adapters.adapter  # the gin file's rank and alpha
  rank = accounting.matching_lora_rank(lora_model, target)
  return rank, float(spec.alpha if spec.alpha is not None else spec.rank)


def _train(name: str, experiment: str, run_dir: str, steps: Optional[int],
           lora: Tuple[int, float]) -> None:
  bindings = {"MODEL_DIR": os.path.join(run_dir, name), **_run_bindings(name, lora)}
  if name != "backbone":
    bindings["INITIAL_CHECKPOINT_PATH"] = os.path.join(run_dir, "backbone")
  if steps:
    bindings["TRAIN_STEPS"] = steps
  _configure([experiment], bindings)
  start = time.time()
  result = trainer.train()
  logging.info("[demo] %s: at step %d after %.0f s", name, result.step, time.time() - start)


def _evaluate(name: str, adapters: str, run_dir: str,
              lora: Tuple[int, float]) -> Tuple[Dict[str, Dict[str, float]], int]:
  """({task: {metric: value}}, examples per task) of the run's latest checkpoint.

  A second demo reads back an evaluation of the same checkpoint with the same settings.
  """
  output_dir = os.path.join(run_dir, name, "eval")
  bindings = {"CHECKPOINT_PATH": os.path.join(run_dir, name),
              "EVAL_OUTPUT_DIR": output_dir, **_run_bindings(name, lora)}
  if FLAGS.eval_examples:
    bindings["EVAL_NUM_EXAMPLES"] = FLAGS.eval_examples
  step = checkpointing.step_of(checkpointing.resolve_checkpoint(bindings["CHECKPOINT_PATH"]))
  settings = {"step": step, "data_config": FLAGS.data_config,
              "eval_examples": FLAGS.eval_examples, "gin_bindings": FLAGS.gin_bindings}
  record_path = os.path.join(output_dir, EVAL_RECORD)
  if os.path.exists(record_path):
    with open(record_path) as f:
      record = json.load(f)
    if record["settings"] == settings:
      logging.info("[demo] %s: step %d evaluated before (%s), not again", name, step,
                   record_path)
      return record["results"], record["examples_per_task"]
  _configure(["experiments/mini_eval.gin", adapters], bindings)
  examples = launching.macro_value("EVAL_NUM_EXAMPLES")
  start = time.time()
  results = eval_lib.evaluate()
  logging.info("[demo] %s: evaluated in %.0f s", name, time.time() - start)
  latest = results[max(results)]
  evaluator.write_json_atomically(record_path, {"settings": settings, "results": latest,
                                                "examples_per_task": examples})
  return latest, examples


def run_demo(run_dir: str) -> str:
  """Every phase; returns the table (also printed, and written to RUN_DIR/results.md).

  The phases share the programs of equal models (`program_cache`): the backbone and its
  FT control evaluate through one decoder, and each evaluation reuses its model's
  training layout."""
  from omni_smola.training import program_cache  # pylint: disable=g-import-not-at-top
  with program_cache.shared_programs():
    return _run_phases(run_dir)


def _run_phases(run_dir: str) -> str:
  import jax  # pylint: disable=g-import-not-at-top
  import seqio  # pylint: disable=g-import-not-at-top
  import tasks.mini  # pylint: disable=g-import-not-at-top
  start = time.time()
  run_dir = os.path.abspath(run_dir)
  os.makedirs(run_dir, exist_ok=True)
  # Compiled programs are reused across the phases and by the next `make demo`.
  jax.config.update("jax_compilation_cache_dir", os.path.join(run_dir, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  data_dir = os.path.join(run_dir, "tfds")
  seqio.set_tfds_data_dir_override(data_dir)
  logging.info("[demo] data: the mini mixture (%s config) in %s", FLAGS.data_config, data_dir)
  tasks.mini.prepare(FLAGS.data_config, data_dir=data_dir)
  logging.info("[demo] data: ready after %.0f s", time.time() - start)

  lora = matched_lora()
  lora_rank = lora[0]
  logging.info("[demo] LoRA rank %d (alpha %g): the trainable parameters of the Omni-SMoLA "
               "generalist", *lora)
  labels = {name: f"LoRA-{lora_rank}" if name == "lora" else label
            for name, _, _, label in RUNS}
  for name, experiment, _, _ in RUNS:
    steps = FLAGS.pretrain_steps if name == "backbone" else FLAGS.generalist_steps
    logging.info("[demo] training %s (%s) after %.0f s", name, experiment, time.time() - start)
    _train(name, experiment, run_dir, steps, lora)
  results, examples = {}, set()
  for name, _, adapters, _ in RUNS:
    logging.info("[demo] evaluating %s after %.0f s", name, time.time() - start)
    results[labels[name]], examples_per_task = _evaluate(name, adapters, run_dir, lora)
    examples.add(examples_per_task)

  table = tables.format_table(results, list(labels.values()))
  elapsed = time.time() - start
  evaluator.write_json_atomically(os.path.join(run_dir, "results.json"),
                                      {"results": results, "wall_seconds": elapsed})
  with open(os.path.join(run_dir, "results.md") + ".tmp", "w") as f:
    f.write(table + "\n")
  os.replace(os.path.join(run_dir, "results.md") + ".tmp", os.path.join(run_dir, "results.md"))
  warnings = console.library_warning_count()
  examples_text = " or ".join(str(e) for e in sorted(examples, key=str))
  summary = (f"\nmini_generalist, validation ({examples_text} examples per task). The adapters "
             f"train on the frozen backbone; LoRA-{lora_rank} has Omni-SMoLA's trainable "
             f"parameters; 'backbone + FT' trains every parameter for the adapters' steps "
             f"(the control). One seed: this is not a ranking of the methods; `make study` "
             f"gives spreads over seeds.\n\n{table}\n\n"
             f"Demo wall time: {elapsed / 60:.1f} min. Checkpoints, TensorBoard logs and "
             f"predictions are in {run_dir} (tensorboard --logdir {run_dir}); the full log "
             f"is {os.path.join(run_dir, 'demo.log')}"
             + (f" ({warnings} library warnings)." if warnings else "."))
  print(summary, flush=True)
  return table


def main(argv):
  if len(argv) > 1:
    raise SystemExit(f"unexpected arguments: {argv[1:]}")
  given = [f"--{flag.name}" for flag in FLAGS.get_flags_for_module(launching)
           if flag.present and flag.name not in HONOURED_BINARY_FLAGS]
  if given:
    raise SystemExit(f"the demo does not take {', '.join(given)}: its phases choose their own "
                     "gin files, data and process (--gin_bindings apply to every phase)")
  logging.set_verbosity(logging.INFO)
  console.quiet_terminal()
  launching.start_log_file(os.path.abspath(FLAGS.run_dir), "demo")
  launching.exit_on_user_error(lambda: run_demo(FLAGS.run_dir))


if __name__ == "__main__":
  app.run(main)
