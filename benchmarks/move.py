"""MoME's MoVE front end (3 towers + ADT + instruction router) against SigLIP alone.

    python benchmarks/move.py [--widths mini,large] [--repeats 3] [--depth N]

Both front ends turn one image into the visual tokens that PaLI's projection carries into
the text encoder, so the projection (the same kind of layer for both) is left out:

* `siglip`: the SigLIP ViT (`models/vit.py`) on the image: [b, gh*gw, d] tokens;
* `move`: DINOv2 (`models/dinov2.py`) and CLIP (`models/clip_vision.py`) on the same
  image, Pix2Struct (`models/pix2struct_vision.py`) on its flattened patches (made on the
  host, outside the timing), one ADT per tower to L tokens at SigLIP's width and the
  instruction router over the three (`models/move.py`, the paper's settings: M 6, Nh 8,
  Np 4; MoVEConfig's defaults), from an instruction embedding at the text width.

Widths (batch 1, float32, CPU):
* `mini`: every tower at the mini ViT's shape (width 128, 2 layers, 8-px patches, 32 px:
  4x4 patches; `models/mini.gin`), ADT to L = 16 queries, instruction width 128;
* `large`: ViT-L/14 widths (1024, 24 layers, 16 heads, MLP 4096) at 224 px for SigLIP,
  DINOv2-L and CLIP-L (16x16 patches); Pix2Struct at the same width (gated MLP 2816, about
  ViT-L's MLP FLOPs) with a 256-patch budget of 16-px patches; ADT to L = 64 queries;
  instruction width 2048 (UL2-3B's). `--depth` shortens every tower (not the ADTs) when
  the machine is too slow for 24 layers.

The layers are unrolled (no `scan_layers`): XLA's cost analysis counts a scanned loop's body
once, not once per layer.

Pix2Struct's feature map is its canvas (`canvas_grid`: a 256 budget at aspect ratio up to
4 is a 32x32 canvas, mostly padding) and the ADT's value projection runs over all of it,
so the analytic count below includes those cells, as the code computes them.

One JSON line per case (seconds: fastest of --repeats interleaved runs, as
`benchmarks/timing.py` advises for runs disturbed only upward; XLA's `cost_analysis`
FLOPs; the analytic FLOPs of `analytic_flops`), then a `summary` line:
  time_ratio       t_move / t_siglip
  xla_flop_ratio   XLA's FLOPs, move over siglip
  analytic_flop_ratio  the closed-form count's, move over siglip
  efficiency       xla_flop_ratio / time_ratio (1: MoVE runs at SigLIP's FLOP rate; the
                   issue's target is >= 0.8)
"""
import argparse
import dataclasses
import json
import os
import sys
from typing import Dict, Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from omni_smola.models import configs  # noqa: E402
from omni_smola.models.adt import ADTConfig  # noqa: E402
from omni_smola.models.clip_vision import ClipVision  # noqa: E402
from omni_smola.models.dinov2 import DinoV2  # noqa: E402
from omni_smola.models.move import MoVE, MoVEConfig  # noqa: E402
from omni_smola.models.pix2struct_patches import canvas_grid, flatten_patches  # noqa: E402
from omni_smola.models.pix2struct_vision import Pix2StructVision  # noqa: E402
from omni_smola.models.vit import ViT  # noqa: E402
from timing import interleaved_minimums  # noqa: E402

TOWERS = ("dinov2", "clip", "pix2struct")


@dataclasses.dataclass(frozen=True)
class Setting:
  """One width: the SigLIP baseline, the three towers, the ADT and the instruction width."""
  siglip: configs.ViTConfig
  dinov2: configs.DinoV2Config
  clip: configs.ClipVisionConfig
  pix2struct: configs.Pix2StructVisionConfig
  adt: ADTConfig
  instruction_width: int


def _setting(width, depth, mlp_dim, heads, patch, image, p2s_mlp, p2s_patch, p2s_budget,
             queries, instruction_width) -> Setting:
  vit = dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=heads, patch_size=patch,
             image_size=image)
  return Setting(
      siglip=configs.ViTConfig(**vit),
      dinov2=configs.DinoV2Config(**vit),
      clip=configs.ClipVisionConfig(**vit),
      pix2struct=configs.Pix2StructVisionConfig(
          width=width, depth=depth, mlp_dim=p2s_mlp, num_heads=heads,
          head_dim=width // heads, patch_size=p2s_patch, max_patches=p2s_budget,
          num_positions=max(64, 2 * p2s_budget)),
      adt=ADTConfig(num_queries=queries), instruction_width=instruction_width)


def settings(depth=None) -> Dict[str, Setting]:
  mini = configs.CONFIGS["mini"].vision
  return {
      "mini": _setting(mini.width, mini.depth, mini.mlp_dim, mini.num_heads, mini.patch_size,
                       mini.image_size, mini.mlp_dim, mini.patch_size, 16, 16,
                       configs.CONFIGS["mini"].text.emb_dim),
      "large": _setting(1024, depth or 24, 4096, 16, 14, 224, 2816, 16, 256, 64, 2048),
  }


class MoVEFrontEnd(nn.Module):
  """Image, Pix2Struct patches and the instruction -> MoVE's fused tokens [b, L, width]."""
  setting: Setting

  @nn.compact
  def __call__(self, image, patches, row_ids, col_ids, instruction):
    s = self.setting
    features = [DinoV2(s.dinov2, name="dinov2")(image),
                ClipVision(s.clip, name="clip")(image),
                Pix2StructVision(s.pix2struct, name="pix2struct")(patches, row_ids, col_ids)]
    move = MoVE(MoVEConfig(tower_names=TOWERS, width=s.siglip.width, adt=s.adt), name="move")
    fused, _ = move([f.feature_map for f in features], instruction,
                    [f.feature_mask for f in features])
    return fused


# ----------------------------------------------------------------- analytic FLOPs
# Multiply-adds x 2 of every matmul-like product (the ones XLA counts); norms, softmax and
# elementwise work are left out, so the closed form sits a few percent under XLA's count.

def _encoder_flops(tokens, width, mlp_dim, depth, gated=False):
  attention = 2 * tokens * 4 * width * width + 2 * 2 * tokens * tokens * width
  mlp = 2 * tokens * width * mlp_dim * (3 if gated else 2)
  return depth * (attention + mlp)


def _vit_flops(cfg, prefix_tokens):
  patches = cfg.grid_size ** 2
  embed = 2 * patches * cfg.patch_size ** 2 * 3 * cfg.width
  return embed + _encoder_flops(patches + prefix_tokens, cfg.width, cfg.mlp_dim, cfg.depth)


def _pix2struct_flops(cfg):
  embed = 2 * cfg.max_patches * cfg.patch_dim * cfg.width
  return embed + _encoder_flops(cfg.max_patches, cfg.width, cfg.mlp_dim, cfg.depth, gated=True)


def _adt_flops(adt: ADTConfig, grid, width, out_width):
  """One ADT on a [grid[0], grid[1], width] map (models/adt.py, nn/deformable_attention.py)."""
  cells, queries, side = grid[0] * grid[1], adt.num_queries, adt.grid_side
  heads, points = adt.num_heads, adt.num_points
  pool = 2 * cells * side * width + 2 * side * grid[0] * side * width  # the two bin einsums
  self_attention = 2 * queries * 4 * width * width + 2 * 2 * queries * queries * width
  cross_attention = (2 * cells * width * width                     # value projection
                     + 2 * queries * width * heads * points * 3    # offsets (2) + weights (1)
                     + 2 * queries * points * 4 * width            # bilinear: 4 corners
                     + 2 * queries * points * width                # weighted sum of points
                     + 2 * queries * width * width)                # output projection
  mlp = 2 * queries * width * adt.mlp_ratio * width * 2
  return pool + adt.num_layers * (self_attention + cross_attention + mlp) + (
      2 * queries * width * out_width)


def analytic_flops(s: Setting) -> Dict[str, int]:
  p2s_grid = canvas_grid(s.pix2struct.max_patches, s.pix2struct.max_aspect_ratio)
  out = s.siglip.width
  towers = {"dinov2": _vit_flops(s.dinov2, 1), "clip": _vit_flops(s.clip, 1),
            "pix2struct": _pix2struct_flops(s.pix2struct)}
  adts = {"dinov2": _adt_flops(s.adt, (s.dinov2.grid_size,) * 2, s.dinov2.width, out),
          "clip": _adt_flops(s.adt, (s.clip.grid_size,) * 2, s.clip.width, out),
          "pix2struct": _adt_flops(s.adt, p2s_grid, s.pix2struct.width, out)}
  router = 2 * s.instruction_width * s.instruction_width + 2 * s.instruction_width * 3
  return {"siglip": _vit_flops(s.siglip, 0),
          "move": sum(towers.values()) + sum(adts.values()) + router,
          "move_towers": sum(towers.values()), "move_adts": sum(adts.values())}


# ----------------------------------------------------------------- timing

def _random_params(module, *args, seed=0):
  """Random parameters of the module's shapes, made on the host: no init to compile."""
  shapes = nn.unbox(jax.eval_shape(module.init, jax.random.PRNGKey(0), *args))["params"]
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda leaf: jax.numpy.asarray(0.02 * rng.standard_normal(leaf.shape, np.float32)),
      shapes)


def _compiled(module, params, args):
  compiled = jax.jit(lambda p, *a: module.apply({"params": p}, *a)).lower(
      params, *args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return (lambda: compiled(params, *args)), float(cost["flops"])


def _inputs(s: Setting, seed=0):
  rng = np.random.default_rng(seed)
  size = s.siglip.image_size
  image = rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32)
  flat = flatten_patches(image[0], patch_size=s.pix2struct.patch_size,
                         max_patches=s.pix2struct.max_patches,
                         max_aspect_ratio=s.pix2struct.max_aspect_ratio)
  instruction = rng.standard_normal((1, s.instruction_width)).astype(np.float32)
  return image, (image, flat.patches[None], flat.row_ids[None], flat.col_ids[None],
                 instruction)


def run_width(name: str, s: Setting, repeats: int) -> None:
  siglip_args, move_args = _inputs(s)
  siglip, move = ViT(s.siglip), MoVEFrontEnd(s)
  cases, xla_flops = {}, {}
  cases["siglip"], xla_flops["siglip"] = _compiled(
      siglip, _random_params(siglip, siglip_args), (siglip_args,))
  cases["move"], xla_flops["move"] = _compiled(
      move, _random_params(move, *move_args), move_args)
  seconds = interleaved_minimums(cases, repeats=repeats, warmup=1)
  analytic = analytic_flops(s)
  common = {"benchmark": "move", "width": name, "tower_width": s.siglip.width,
            "tower_depth": s.siglip.depth, "image_px": s.siglip.image_size,
            "adt_queries": s.adt.num_queries, "adt_layers": s.adt.num_layers,
            "pix2struct_patches": s.pix2struct.max_patches,
            "pix2struct_canvas": list(canvas_grid(s.pix2struct.max_patches,
                                                  s.pix2struct.max_aspect_ratio)),
            "batch": 1, "repeats": repeats, "device": jax.devices()[0].platform}
  for case in cases:
    print(json.dumps({**common, "case": case, "seconds": round(seconds[case], 5),
                      "xla_gflops": round(xla_flops[case] / 1e9, 3),
                      "analytic_gflops": round(analytic[case] / 1e9, 3)}), flush=True)
  time_ratio = seconds["move"] / seconds["siglip"]
  xla_ratio = xla_flops["move"] / xla_flops["siglip"]
  print(json.dumps({
      **common, "case": "summary", "time_ratio": round(time_ratio, 3),
      "xla_flop_ratio": round(xla_ratio, 3),
      "analytic_flop_ratio": round(analytic["move"] / analytic["siglip"], 3),
      "analytic_adt_share_of_move": round(analytic["move_adts"] / analytic["move"], 3),
      "efficiency": round(xla_ratio / time_ratio, 3)}), flush=True)


def main(argv: Sequence[str] = None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--widths", default="mini,large")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--depth", type=int, default=None,
                      help="layers of every tower at the large width (default: ViT-L's 24)")
  args = parser.parse_args(argv)
  table = settings(args.depth)
  for name in args.widths.split(","):
    if name not in table:
      raise SystemExit(f"--widths: unknown width {name!r}; known: {sorted(table)}")
    run_width(name, table[name], args.repeats)


if __name__ == "__main__":
  main()
