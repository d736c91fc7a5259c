"""Serving several specialists: one mixed batch through a `task_lora` bank vs per-task batches.

    python benchmarks/specialist_batch.py [--widths mini,wide] [--tasks 4] [--per_task 8]

The workload is `tasks` tasks with `per_task` examples each, every task with its own LoRA
specialist (rank `--rank`, every projection) on one frozen backbone; each case decodes all
of them greedily with the KV cache (`--length` tokens, EOS off so every row decodes all):

* `per_task`: what serving without a bank does: the specialist run's model (a plain LoRA),
  one batch per task, its specialist's parameters swapped in between calls (one compiled
  step; `tasks` calls of `per_task` rows);
* `mixed`: the bank: every example in one batch (`tasks * per_task` rows), each row
  gathering its task's factors;
* `one_specialist`: the plain LoRA model on the same full batch, every row with one
  specialist: what the mixed batch would cost if the gather were free.

Widths: `mini` (the demo's model, text width 128) and `wide` (PaLI-3's text width: UL2-3B's
2048, 32 heads of 64, MLP 5120, gated SiLU; 2+2 layers, vocabulary 1024 and the mini ViT, so
it runs on a CPU). Prints JSON lines; `speedup_vs_per_task` = per_task / mixed and
`gather_overhead` = mixed / one_specialist, all timed interleaved in the same run (medians).
"""
import argparse
import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import timing  # noqa: E402

from omni_smola.data import task_id  # noqa: E402
from omni_smola.model import PaliModel  # noqa: E402
from omni_smola.models import configs  # noqa: E402
from omni_smola.nn import AdapterPlan, AdapterSpec  # noqa: E402

MINI = configs.CONFIGS["mini"]
WIDTHS = {
    "mini": MINI,
    "wide": dataclasses.replace(MINI, text=dataclasses.replace(
        MINI.text, emb_dim=2048, num_heads=32, head_dim=64, mlp_dim=5120,
        mlp_activation="silu")),
}


def _batch(model, rows, prompt_length, length, tasks, seed=0):
  rng = np.random.RandomState(seed)
  size = model.config.vision.image_size
  return {
      "image": rng.uniform(-1, 1, (rows, size, size, 3)).astype(np.float32),
      "encoder_input_tokens": rng.randint(2, model.vocab_size,
                                          (rows, prompt_length)).astype(np.int32),
      "decoder_input_tokens": np.zeros((rows, length), np.int32),
      "task_id": np.array([task_id(tasks[i % len(tasks)]) for i in range(rows)], np.int32),
  }


def _random_params(model, batch, seed):
  shapes = {k: v.shape for k, v in batch.items()}
  abstract = nn.unbox(jax.eval_shape(
      lambda: model.get_initial_variables(jax.random.PRNGKey(0), shapes))["params"])
  rng = np.random.RandomState(seed)
  return jax.tree_util.tree_map(
      lambda s: jax.numpy.asarray(0.02 * rng.randn(*s.shape).astype(s.dtype)), abstract)


def run_width(name, args):
  config = WIDTHS[name]
  tasks = tuple(f"task_{i}" for i in range(args.tasks))
  lora = AdapterSpec(kind="lora", rank=args.rank)
  bank = AdapterSpec(kind="task_lora", rank=args.rank, tasks=tasks)
  plain_model = PaliModel(config, AdapterPlan(specialist_adapter=lora))
  bank_model = PaliModel(config, AdapterPlan(specialist_adapter=bank))
  rows = args.tasks * args.per_task
  mixed = _batch(bank_model, rows, args.prompt_length, args.length, tasks)
  bank_params = _random_params(bank_model, mixed, 0)
  # Task t's own model: the backbone and row t of the bank as a plain LoRA.
  specialists = [jax.tree_util.tree_map_with_path(
      lambda path, x, t=t: x[t] if any(getattr(k, "key", None) == "specialist_adapter"
                                       for k in path) else x, bank_params)
                 for t in range(args.tasks)]
  per_task_batches = [{k: v[t::args.tasks] for k, v in mixed.items()}
                      for t in range(args.tasks)]
  options = {"decoding": "greedy", "use_cache": True, "eos_id": -1}
  plain_decode = jax.jit(lambda p, b: plain_model.predict_batch_with_aux(
      p, b, decoder_params=options)[0])
  bank_decode = jax.jit(lambda p, b: bank_model.predict_batch_with_aux(
      p, b, decoder_params=options)[0])

  def per_task():
    return [plain_decode(specialists[t], per_task_batches[t]) for t in range(args.tasks)]

  cases = {
      "per_task": per_task,
      "mixed": lambda: bank_decode(bank_params, mixed),
      "one_specialist": lambda: plain_decode(specialists[0], mixed),
  }
  seconds = timing.interleaved_medians(cases, repeats=args.repeats, warmup=1)
  common = {"benchmark": "specialist_batch", "width": name,
            "text_width": config.text.emb_dim, "tasks": args.tasks, "per_task": args.per_task,
            "rank": args.rank, "decoded_tokens": args.length,
            "device": jax.devices()[0].platform}
  for case, value in seconds.items():
    print(json.dumps({**common, "case": case, "seconds": round(value, 5),
                      "examples_per_s": round(rows / value, 1)}), flush=True)
  print(json.dumps({**common, "case": "summary",
                    "speedup_vs_per_task": round(seconds["per_task"] / seconds["mixed"], 2),
                    "gather_overhead": round(seconds["mixed"] / seconds["one_specialist"], 3)}),
        flush=True)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="mini,wide")
  parser.add_argument("--tasks", type=int, default=4)
  parser.add_argument("--per_task", type=int, default=8)
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--length", type=int, default=8, help="decoded tokens per row")
  parser.add_argument("--prompt_length", type=int, default=16)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  for name in args.widths.split(","):
    if name not in WIDTHS:
      raise SystemExit(f"--widths: unknown width {name!r}; known: {sorted(WIDTHS)}")
    run_width(name, args)


if __name__ == "__main__":
  main()
