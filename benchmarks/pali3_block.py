"""One PaLI-3 encoder block at the paper's resolution: adapter overheads, then the model.

The adapter benchmarks at width 128-1024 (`adapter_layer.py`, `train_step.py`) let 48
experts per group cost more than the layer; here the layer is the real one. One UL2-3B
encoder block (d=2048, 32 heads of 64, gated-SiLU MLP 5120; `models/pali3.gin`) runs on
the PaLI-3 paper's input: 812 px / 14 = 58^2 = 3,364 visual tokens then 64 text tokens,
batch 1, float32 (the gin file's dtype). The block is the repo's own `t5.Encoder` with
one layer under the model's path (`text/encoder/layers_0/...`), and each adapter comes
from its paper gin file, sites included, so what is timed is what a run builds:

    frozen          no adapter
    lora128         adapters/paper_lora128.gin        (all attention and MLP projections)
    smola_mm96      adapters/paper_smola_mm96.gin     (sequence routing)
    omni_smola_o48  adapters/paper_omni_smola_o48.gin (sequence routing)
    <case>/unfused  the same with input fusion off (gin `input_fusion`, nn/omni_smola.py;
                    off is the library's default, the other cases run with it on)
  decode_step/...   32 cached-decoding steps (beam 4, one token each) of one adapted
                    2048 -> 5120 projection, O-48 routed per token (the decoder is
                    causal), fused and unfused: the other place input fusion acts

One JSON object per line, per case and pass (`forward`; `forward_backward`: the output
and the gradients w.r.t. the block's input and, when adapted, the adapter parameters, as
a training step needs them):
  time_overhead   t_case / t_frozen - 1 (fastest of --repeats interleaved runs)
  flop_overhead   XLA's cost analysis: flops_case / flops_frozen - 1
  efficiency      flop_overhead / time_overhead (>= 1: the adapter runs at least at
                  the backbone's FLOP rate)
Then one `model_estimate` line: the measured forward overhead of the block weighted by
the encoder's share of a PaLI-3 inference's FLOPs (`omni_smola.accounting` on
models/pali3.gin at 812 px, 64 prompt and 32 target tokens; ViT once, encoder once,
decoder x4 for beam 4; only the encoder is adapted, as in the paper), next to the
paper's measured 1.4% (31.29 vs 30.85 examples/s, PaLI-3, 812 px, batch 128, beam 4).
Ours is an estimate from one block's time and FLOP shares (`ours_estimated_slowdown`;
`ours_flop_slowdown` weights the block's XLA FLOP overhead instead, the figure a device
running the adapter at the backbone's FLOP rate would show); the paper's is a wall-clock
measurement on its accelerators, where beam decoding is bound by memory traffic more than
FLOPs, so the decoder's share of time exceeds its share of FLOPs. Each field says whose.

  python benchmarks/pali3_block.py [--repeats 3] [--cases frozen,lora128,...]
"""
import argparse
import dataclasses
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import gin  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from omni_smola import accounting, param_layout, params as params_cli  # noqa: E402
from omni_smola.models import t5  # noqa: E402
from omni_smola.models.configs import T5Config  # noqa: E402
from omni_smola.nn import AdaptedDense, AdapterPlan, TokenContext  # noqa: E402
from timing import interleaved_minimums  # noqa: E402

IMAGE_SIZE, PATCH_SIZE = 812, 14  # the paper's PaLI-3 resolution (Sec. 4.1)
NUM_VISUAL = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 3,364
NUM_TEXT, NUM_TARGETS, BEAMS = 64, 32, 4
PAPER_SLOWDOWN = 0.014  # Omni-SMoLA paper: 31.29 -> 30.85 examples/s (SMoLA^48_O, PaLI-3)
ADAPTER_FILES = {
    "frozen": None,
    "lora128": "adapters/paper_lora128.gin",
    "smola_mm96": "adapters/paper_smola_mm96.gin",
    "omni_smola_o48": "adapters/paper_omni_smola_o48.gin",
}
UNFUSED = "unfused"  # `<case>/unfused`: the same adapter with input fusion off
FUSION = "omni_smola.nn.omni_smola.input_fusion"
DECODE_STEPS, DECODE_ROWS = 32, 4  # beam 4, one token per step


class _Text(nn.Module):
  """PaLI's `text` tower reduced to its encoder, so parameter paths match the model's."""
  config: T5Config

  @nn.compact
  def __call__(self, x, context):
    return t5.Encoder(self.config, name="encoder")(x, context)


class EncoderBlock(nn.Module):
  """`text/encoder` with one layer, holding the adapter plan as the model's root does."""
  config: T5Config
  adapters: AdapterPlan

  @nn.compact
  def __call__(self, x, context):
    return _Text(self.config, name="text")(x, context)


def configured_model(adapter_file, bindings=()):
  """The PaliModel that models/pali3.gin plus `adapter_file` configure (gin cleared after)."""
  files = ["models/pali3.gin"] + ([adapter_file] if adapter_file else [])
  gin.clear_config()
  params_cli.parse_config(files, list(bindings))
  try:
    model, lengths, _ = params_cli.run_macros()
    return model, lengths
  finally:
    gin.clear_config()


def inference_flop_shares():
  """Forward FLOPs of one PaLI-3 captioning example per stack, beam-4 decoding."""
  model, _ = configured_model(
      ADAPTER_FILES["omni_smola_o48"],
      [f"omni_smola.models.configs.ViTConfig.image_size = {IMAGE_SIZE}"])
  account = accounting.account_model(model, {"inputs": NUM_TEXT, "targets": NUM_TARGETS})
  flops = account["flops"]
  shares = {"vision": flops["vision"]["backbone"], "encoder": flops["encoder"]["backbone"],
            "decoder": BEAMS * flops["decoder"]["backbone"]}
  total = sum(shares.values())
  return {stack: value / total for stack, value in shares.items()}, account


def set_fusion(enabled):
  """Binds `input_fusion` for what is traced next (gin is cleared after each case)."""
  for routing in ("sequence_routing", "token_routing"):
    gin.bind_parameter(f"{FUSION}.{routing}", enabled)


def build_case(adapter_file, x, context, fused=True):
  """Per pass, a compiled thunk and XLA's FLOP count for one block with this adapter."""
  model, _ = configured_model(adapter_file)
  config = dataclasses.replace(model.config.text, num_encoder_layers=1, scan_layers=False)
  block = EncoderBlock(config, model.adapters)
  set_fusion(fused)
  variables = jax.jit(block.init)(jax.random.PRNGKey(1), x, context)
  flat = traverse_util.flatten_dict(param_layout.unbox(variables)["params"])
  # Non-zero LoRA B and expert B, so no adapter output is trivially zero.
  adapter = {k: v + 0.01 for k, v in flat.items() if param_layout.is_adapter_path(k)}
  frozen = {k: v for k, v in flat.items() if k not in adapter}
  cotangent = jax.random.normal(jax.random.PRNGKey(2), x.shape, x.dtype)

  def forward(frozen, adapter, x):
    params = traverse_util.unflatten_dict({**frozen, **adapter})
    return block.apply({"params": params}, x, context)

  def forward_backward(frozen, adapter, x, cotangent):
    outputs, pullback = jax.vjp(lambda a, x: forward(frozen, a, x), adapter, x)
    return outputs, pullback(cotangent)

  passes = {}
  for name, fn, args in (("forward", forward, (frozen, adapter, x)),
                         ("forward_backward", forward_backward,
                          (frozen, adapter, x, cotangent))):
    compiled = jax.jit(fn).lower(*args).compile()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    passes[name] = ((lambda compiled=compiled, args=args: compiled(*args)),
                    float(cost["flops"]))
  gin.clear_config()
  return passes


def build_decode_case(spec, fused):
  """A compiled thunk running DECODE_STEPS cached-decoding steps of one adapted MLP
  input projection (2048 -> 5120, beam 4, causal: token routing), parameters loop
  invariant as in the decoding loop; and XLA's FLOP count."""
  layer = AdaptedDense(5120, kernel_axes=("embed", "mlp"), adapters=AdapterPlan(adapter=spec))
  context = TokenContext(causal=True)
  steps = jax.random.normal(jax.random.PRNGKey(3), (DECODE_STEPS, DECODE_ROWS, 1, 2048))
  set_fusion(fused)
  variables = param_layout.unbox(jax.jit(layer.init)(jax.random.PRNGKey(1), steps[0], context))
  variables = jax.tree_util.tree_map(lambda p: p + 0.01, variables)

  def decode(variables, steps):
    def step(carry, x):
      y = layer.apply(variables, x + carry[:, :, :2048], context)
      return y, None
    return jax.lax.scan(step, jnp.zeros((DECODE_ROWS, 1, 5120)), steps)[0]

  compiled = jax.jit(decode).lower(variables, steps).compile()
  gin.clear_config()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (lambda: compiled(variables, steps)), float(cost["flops"])


def decode_lines(repeats):
  """Fused vs unfused token-routed decoding steps of O-48 (the paper does not adapt
  the decoder; `adapters/omni_smola.gin`'s sites do)."""
  model, _ = configured_model(ADAPTER_FILES["omni_smola_o48"])
  spec = dataclasses.replace(model.adapters.adapter, sites=(".*",))
  cases = {"frozen": build_decode_case(dataclasses.replace(spec, kind="none"), True),
           "omni_smola_o48": build_decode_case(spec, True),
           f"omni_smola_o48/{UNFUSED}": build_decode_case(spec, False)}
  fastest = interleaved_minimums({n: c[0] for n, c in cases.items()}, repeats=repeats)
  for name in cases:
    print(json.dumps({
        "case": f"decode_step/{name}",
        "time_overhead": round(fastest[name] / fastest["frozen"] - 1, 4),
        "flop_overhead": round(cases[name][1] / cases["frozen"][1] - 1, 4),
        "fused_vs_unfused_time": round(
            fastest["omni_smola_o48"] / fastest[f"omni_smola_o48/{UNFUSED}"], 4),
        "seconds": round(fastest[name], 4), "steps": DECODE_STEPS, "rows": DECODE_ROWS,
        "device": jax.devices()[0].device_kind}), flush=True)


def ratio(numerator, denominator):
  return round(numerator / denominator, 3) if denominator > 0 else None


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--cases", default=",".join(
      list(ADAPTER_FILES) + ["omni_smola_o48/unfused", "smola_mm96/unfused"]))
  parser.add_argument("--passes", default="forward,forward_backward")
  parser.add_argument("--decode_repeats", type=int, default=15)
  args = parser.parse_args()
  if args.decode_repeats:
    decode_lines(args.decode_repeats)
  x = jax.random.normal(jax.random.PRNGKey(0), (1, NUM_VISUAL + NUM_TEXT, 2048), jnp.float32)
  context = TokenContext(num_visual_tokens=NUM_VISUAL)
  names = args.cases.split(",")
  built = {}
  for name in names:
    adapter_name, _, variant = name.partition("/")
    built[name] = build_case(ADAPTER_FILES[adapter_name], x, context,
                             fused=variant != UNFUSED)
  overheads = {}
  for pass_name in args.passes.split(","):
    fastest = interleaved_minimums({n: built[n][pass_name][0] for n in names},
                                   repeats=args.repeats, warmup=0)
    for name in names:
      time_overhead = fastest[name] / fastest["frozen"] - 1
      flop_overhead = built[name][pass_name][1] / built["frozen"][pass_name][1] - 1
      overheads[(name, pass_name)] = (time_overhead, flop_overhead)
      print(json.dumps({
          "case": f"{name}/{pass_name}", "time_overhead": round(time_overhead, 4),
          "flop_overhead": round(flop_overhead, 4),
          "efficiency": ratio(flop_overhead, time_overhead),
          "seconds": round(fastest[name], 3), "repeats": args.repeats,
          "device": jax.devices()[0].device_kind}), flush=True)
  if ("omni_smola_o48", "forward") in overheads:
    shares, _ = inference_flop_shares()
    block_time, block_flops = overheads[("omni_smola_o48", "forward")]
    print(json.dumps({
        "case": "model_estimate/omni_smola_o48/inference",
        "ours_estimated_slowdown": round(shares["encoder"] * block_time, 4),
        "ours_flop_slowdown": round(shares["encoder"] * block_flops, 4),
        "ours_block_forward_overhead": round(block_time, 4),
        "ours_block_forward_flop_overhead": round(block_flops, 4),
        "flop_shares": {k: round(v, 4) for k, v in shares.items()},
        "paper_measured_slowdown": PAPER_SLOWDOWN,
        "setting": f"{IMAGE_SIZE} px, {NUM_TEXT} prompt + {NUM_TARGETS} target tokens, "
                   f"beam {BEAMS}; ours: CPU block time x FLOP share, paper: TPU wall clock",
    }), flush=True)


if __name__ == "__main__":
  main()
