"""Adapter overhead on one projection, as ratios to the frozen matmul.

One JSON object per line:
  case            adapter and pass (`forward` or `forward_backward`)
  time_overhead   t_adapted / t_dense - 1
  flop_overhead   adapter FLOPs / dense FLOPs (analytic, omni_smola.nn.accounting)
  efficiency      flop_overhead / time_overhead: 1.0 means the adapter runs at
                  the frozen matmul's FLOP rate.
  dot_flop_overhead  the same ratio counted from the products the code really
                  runs (its traced `dot_general`s): equal to flop_overhead when
                  no product does work the analytic count does not include
  dot_efficiency  flop_overhead / the time overhead of those products replayed
                  on their own (`contractions.py`): the efficiency the device's
                  rate for these product shapes allows, before any routing
                  work. `efficiency` well below it means time lost around the
                  products; both low means the shapes run slowly here.
Shapes follow a PaLI encoder layer: d_in = d_out = 1024, 4 examples x 256 tokens
(192 visual, then 64 text), rank 4. `forward_backward` differentiates with
respect to the input (a frozen layer still back-propagates) and, for adapted
layers, the adapter parameters, and returns the output too, as a training step
does: the dense baseline is 2 matmuls (y and dx), an adapter adds 3x its
forward FLOPs (its output, its input gradient and its parameter gradients).

  python benchmarks/adapter_layer.py [--repeats 15] [--d_model 1024]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from omni_smola.nn import AdaptedDense, AdapterPlan, AdapterSpec, TokenContext  # noqa: E402
from omni_smola.nn.accounting import adapter_forward_flops, dense_forward_flops  # noqa: E402
from contractions import dot_generals, product_flops, replay  # noqa: E402
from timing import interleaved_minimums  # noqa: E402

EXAMPLES, LENGTH, NUM_VISUAL, RANK = 4, 256, 192, 4


def cases(experts):
  omni = dict(kind="omni_smola", rank=RANK,
              experts_per_group={"mm": experts, "vis": experts, "txt": experts})
  return {
      f"omni_smola_{experts}_sequence": AdapterSpec(**omni, routing="sequence"),
      f"omni_smola_{experts}_token": AdapterSpec(**omni, routing="token"),
      "lora": AdapterSpec(kind="lora", rank=RANK),
      "mixlora": AdapterSpec(kind="mixlora", rank=RANK, num_factors=16),
      "mole": AdapterSpec(kind="mole", rank=RANK, num_experts=8, top_k=2),
  }


def build(spec, x, context, d_model):
  """Per pass (forward, forward_backward): a thunk running the layer, and the
  products it runs (see `contractions.py`). Every array is a jit argument, so
  XLA cannot fold any of the work into compile-time constants."""
  layer = AdaptedDense(d_model, kernel_axes=("embed", "mlp"),
                       adapters=AdapterPlan(adapter=spec))
  params = nn.unbox(layer.init(jax.random.PRNGKey(1), x, context))["params"]
  # Non-zero B, so nothing is trivially zero.
  params = jax.tree_util.tree_map(lambda p: p + 0.01, params)
  kernel = params.pop("kernel")
  adapter = params.get("adapter", {})
  cotangent = jax.random.normal(jax.random.PRNGKey(2), x.shape[:2] + (d_model,), x.dtype)

  def apply(kernel, adapter, x):
    variables = {"params": {"kernel": kernel, **({"adapter": adapter} if adapter else {})}}
    return layer.apply(variables, x, context)

  def pullback(kernel, adapter, x, cotangent):
    # A training step's share of this layer: the output (for the next layer)
    # and the gradient w.r.t. the input (always) and the adapter (when
    # present); the kernel is frozen.
    outputs, vjp = jax.vjp(lambda a, x: apply(kernel, a, x), adapter, x)
    return outputs, vjp(cotangent)

  passes = []
  for function, args in ((apply, (kernel, adapter, x)), (pullback, (kernel, adapter, x, cotangent))):
    compiled = jax.jit(function)
    passes.append(((lambda compiled=compiled, args=args: compiled(*args)),
                   dot_generals(function, *args)))
  return passes


def ratio(flop_overhead, time_overhead):
  return round(flop_overhead / time_overhead, 3) if time_overhead > 0 else None


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=15)
  parser.add_argument("--d_model", type=int, default=1024)
  parser.add_argument("--experts", type=int, default=48)
  args = parser.parse_args()
  d = args.d_model
  x = jax.random.normal(jax.random.PRNGKey(0), (EXAMPLES, LENGTH, d))
  context = TokenContext(num_visual_tokens=NUM_VISUAL)
  tokens = {"mm": LENGTH, "vis": NUM_VISUAL, "txt": LENGTH - NUM_VISUAL}
  dense_flops = EXAMPLES * dense_forward_flops(d, d, LENGTH)

  specs = cases(args.experts)
  built = {"dense": build(AdapterSpec(kind="none"), x, context, d)}
  built.update({name: build(spec, x, context, d) for name, spec in specs.items()})
  for pass_index, pass_name in enumerate(("forward", "forward_backward")):
    thunks, products = {}, {}
    for name, passes in built.items():
      thunks[name], products[name] = passes[pass_index]
      products_alone, operands = replay(products[name])
      thunks[f"{name}/products"] = lambda run=products_alone, operands=operands: run(operands)
    fastest = interleaved_minimums(thunks, repeats=args.repeats)
    dense_products = product_flops(products["dense"])
    for name, spec in specs.items():
      adapter_flops = EXAMPLES * adapter_forward_flops(spec, d, d, tokens)
      # Backward: the dense layer only back-propagates to x (2x its forward);
      # an adapter also differentiates its parameters (3x its forward in all).
      flop_overhead = adapter_flops / dense_flops if pass_index == 0 else (
          3 * adapter_flops) / (2 * dense_flops)
      time_overhead = fastest[name] / fastest["dense"] - 1
      products_overhead = fastest[f"{name}/products"] / fastest["dense/products"] - 1
      print(json.dumps({
          "case": f"{name}/{pass_name}",
          "time_overhead": round(time_overhead, 4),
          "flop_overhead": round(flop_overhead, 4),
          "efficiency": ratio(flop_overhead, time_overhead),
          "dot_flop_overhead": round(product_flops(products[name]) / dense_products - 1, 4),
          "dot_efficiency": ratio(flop_overhead, products_overhead),
          "dense_seconds": round(fastest["dense"], 5),
          "device": jax.devices()[0].device_kind,
      }), flush=True)


if __name__ == "__main__":
  main()
