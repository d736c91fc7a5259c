"""Parameter, optimizer-state and FLOP accounting (`python -m omni_smola.params`).

The expected numbers are written out here from the architecture, independently of
`omni_smola.nn.accounting` (which the library reuses).
"""
import copy
import dataclasses
import json
import os
import subprocess
import sys

import pytest

from omni_smola import accounting
from omni_smola.model import PaliModel
from omni_smola.models import configs, t5
from omni_smola.nn import AdapterSpec

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 7, "targets": 5}
EXPERTS = {"mm": 3, "vis": 2, "txt": 1}
RANK, SLOTS = 2, 2


# ------------------------------------------------------------ closed forms (ours)


def vit_params(v, text_width):
  w, m, n = v.width, v.mlp_dim, v.num_patches
  block = 2 * 2 * w + 3 * (w * w + w) + (w * w + w) + (w * m + m) + (m * w + w)
  return (v.patch_size ** 2 * 3 * w + w) + n * w + v.depth * block + 2 * w + (
      w * text_width + text_width)


def t5_params(t):
  e, hd, m = t.emb_dim, t.num_heads * t.head_dim, t.mlp_dim
  relpos = t.num_heads * t.relative_attention_num_buckets
  encoder = t.num_encoder_layers * (2 * e + 4 * e * hd + 3 * e * m) + relpos + e
  decoder = t.num_decoder_layers * (3 * e + 8 * e * hd + 3 * e * m) + relpos + e
  logits = 0 if t.logits_via_embedding else e * t.vocab_size
  return {"embedding": t.vocab_size * e, "encoder": encoder, "decoder": decoder + logits}


def smola_block_params(experts, d_in, d_out):
  # A [e, d, r], B [e, r, f], router slots [d, e, p], router scale.
  return experts * RANK * (d_in + d_out) + d_in * experts * SLOTS + 1


def text_sites(t):
  """(stack, d_in, d_out, groups, sequence) of every adapted projection of the text side."""
  e, hd, m = t.emb_dim, t.num_heads * t.head_dim, t.mlp_dim
  all_groups, text_groups = ("mm", "vis", "txt"), ("mm", "txt")
  sites = []
  for _ in range(t.num_encoder_layers):
    sites += [("encoder", e, hd, all_groups, "enc")] * 3 + [("encoder", hd, e, all_groups,
                                                              "enc")]
    sites += [("encoder", e, m, all_groups, "enc")] * 2 + [("encoder", m, e, all_groups,
                                                             "enc")]
  for _ in range(t.num_decoder_layers):
    sites += [("decoder", e, hd, text_groups, "dec")] * 3 + [("decoder", hd, e, text_groups,
                                                              "dec")]
    sites += [("decoder", e, hd, text_groups, "dec"), ("decoder", hd, e, text_groups, "dec")]
    sites += [("decoder", e, hd, all_groups, "enc")] * 2  # cross-attention keys / values
    sites += [("decoder", e, m, text_groups, "dec")] * 2 + [("decoder", m, e, text_groups,
                                                             "dec")]
  return sites


def smola_flops(experts, d_in, d_out, tokens, causal):
  slots = experts * SLOTS
  router = 2 * tokens * d_in * slots
  if causal:  # token routing: every expert on every token
    return router + 2 * tokens * experts * RANK * (d_in + d_out)
  return router + 2 * tokens * slots * d_in + 2 * slots * RANK * (d_in + d_out) + (
      2 * tokens * slots * d_out)


def backbone_flops(config, inputs, targets):
  v, t = config.vision, config.text
  n, w, m = v.num_patches, v.width, v.mlp_dim
  vision = 2 * n * v.patch_size ** 2 * 3 * w + v.depth * (
      2 * n * (4 * w * w + 2 * w * m) + 4 * n * n * w) + 2 * n * w * t.emb_dim
  e, hd, mlp = t.emb_dim, t.num_heads * t.head_dim, t.mlp_dim
  enc, dec = n + inputs, targets
  encoder = t.num_encoder_layers * (2 * enc * (4 * e * hd + 3 * e * mlp) + 4 * enc * enc * hd)
  decoder = t.num_decoder_layers * (
      2 * dec * 4 * e * hd + 4 * dec * dec * hd            # self-attention
      + 2 * dec * 2 * e * hd + 2 * enc * 2 * e * hd + 4 * dec * enc * hd  # cross
      + 2 * dec * 3 * e * mlp) + 2 * dec * e * t.vocab_size
  return {"vision": vision, "encoder": encoder, "decoder": decoder}


# ------------------------------------------------------------------------ tests


@pytest.fixture(scope="module")
def tiny_account():
  spec = AdapterSpec(kind="omni_smola", rank=RANK, slots_per_expert=SLOTS,
                     experts_per_group=EXPERTS)
  return accounting.account_model(PaliModel("tiny", spec), LENGTHS, "adapters",
                                  optimizer_name="adamw")


def test_tiny_parameter_counts_match_closed_form(tiny_account):
  config = configs.get_config("tiny")
  params = tiny_account["parameters"]
  by_stack = params["by_stack"]
  text = t5_params(config.text)
  assert by_stack["vision"]["backbone"] == vit_params(config.vision, config.text.emb_dim)
  for stack in ("encoder", "decoder", "embedding"):
    assert by_stack[stack]["backbone"] == text[stack], stack
  expected = {(s, g): 0 for s in ("encoder", "decoder") for g in EXPERTS}
  for stack, d_in, d_out, groups, _ in text_sites(config.text):
    for g in groups:
      expected[stack, g] += smola_block_params(EXPERTS[g], d_in, d_out)
  for (stack, group), count in expected.items():
    assert by_stack[stack][group] == count, (stack, group)
  assert sum(by_stack["vision"][g] for g in EXPERTS) == 0  # the ViT is not adapted
  adapters = sum(expected.values())
  assert params["adapters"] == params["trainable"] == adapters
  assert params["total"] == params["backbone"] + adapters
  assert params["trainable_fraction"] == pytest.approx(adapters / params["total"])
  assert tiny_account["closed_form_mismatches"] == []


def test_tiny_flops_match_closed_form(tiny_account):
  config = configs.get_config("tiny")
  n = config.vision.num_patches
  expected = backbone_flops(config, LENGTHS["inputs"], LENGTHS["targets"])
  flops = tiny_account["flops"]
  for stack, value in expected.items():
    assert flops[stack]["backbone"] == value, stack
  tokens = {"enc": {"mm": n + LENGTHS["inputs"], "vis": n, "txt": LENGTHS["inputs"]},
            "dec": {"mm": LENGTHS["targets"], "vis": 0, "txt": LENGTHS["targets"]}}
  adapters = {(s, g): 0 for s in ("encoder", "decoder") for g in EXPERTS}
  for stack, d_in, d_out, groups, sequence in text_sites(config.text):
    causal = stack == "decoder" and sequence == "dec"
    for g in groups:
      adapters[stack, g] += smola_flops(EXPERTS[g], d_in, d_out, tokens[sequence][g], causal)
  for (stack, group), value in adapters.items():
    assert flops[stack]["adapters_by_group"][group] == value, (stack, group)
  assert flops["encoder"]["tokens"] == n + LENGTHS["inputs"]
  assert flops["encoder"]["backbone_per_token"] == pytest.approx(
      expected["encoder"] / (n + LENGTHS["inputs"]))
  assert tiny_account["assumptions"]["tokens"] == {
      "vision": n, "encoder_visual": n, "encoder_text": LENGTHS["inputs"],
      "encoder": n + LENGTHS["inputs"], "decoder": LENGTHS["targets"]}


def test_optimizer_state_counts_trainable_parameters_only(tiny_account):
  trainable = tiny_account["parameters"]["trainable"]
  state = tiny_account["optimizer"]["state_bytes"]
  assert tiny_account["optimizer"]["name"] == "adamw"
  assert state["adamw"] == 2 * 4 * trainable + 4  # mu, nu in float32; an int32 count
  # Adafactor factors no tiny parameter (no two dims >= 128): a full second moment per
  # parameter plus two 1-element row / column placeholders; four leaves per SMoLA block.
  blocks = sum(len(groups) for *_, groups, _ in text_sites(configs.get_config("tiny").text))
  assert state["adafactor"] == 4 * (trainable + 2 * 4 * blocks) + 4


def test_adafactor_state_is_factored_for_wide_matrices():
  import jax
  import jax.numpy as jnp
  from omni_smola.training import optimizers
  tree = {"wide": jax.ShapeDtypeStruct((256, 512), jnp.float32),
          "narrow": jax.ShapeDtypeStruct((300, 4), jnp.float32)}
  tx = optimizers.create_optimizer(name="adafactor", learning_rate=1.0).tx
  nbytes, _ = accounting.optimizer_state_bytes(tx, tree)
  # wide: rows + columns + a placeholder; narrow: full + two placeholders; int32 count.
  assert nbytes == 4 * (256 + 512 + 1) + 4 * (300 * 4 + 2) + 4


def test_t5_1_1_small_has_its_published_size():
  account = accounting.account_model(PaliModel("t5_1_1_small"), LENGTHS, "full")
  params = account["parameters"]
  assert params["total"] == params["trainable"] == 76_961_152  # google/t5-v1_1-small
  assert params["by_stack"]["vision"]["total"] == 0
  assert account["flops"]["vision"]["tokens"] == 0


@pytest.mark.parametrize("spec,groups", [
    (AdapterSpec(kind="lora", rank=2, sites=("mlp/",)), ["lora"]),
    (AdapterSpec(kind="mole", rank=2, num_experts=3, top_k=1, mole_level="instance"),
     ["mole"]),
    (AdapterSpec(kind="mixlora", rank=2, num_factors=4, sites=("attention/",)), ["mixlora"]),
])
def test_other_adapters_are_grouped_by_kind_and_match_closed_form(spec, groups):
  account = accounting.account_model(PaliModel("tiny", spec), LENGTHS)
  assert list(account["parameters"]["by_group"]) == groups
  assert account["closed_form_mismatches"] == []
  assert account["parameters"]["trainable"] == account["parameters"]["adapters"] > 0
  assert account["flops"]["total"]["adapters"] > 0


def test_cli_prints_table_and_writes_json(tmp_path):
  output = tmp_path / "tiny.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3")
  result = subprocess.run(
      [sys.executable, "-m", "omni_smola.params", "--gin_file=models/tiny.gin",
       "--gin_file=adapters/lora.gin", "--gin.TASK_FEATURE_LENGTHS={'inputs': 7, 'targets': 5}",
       "--gin.TRAINABLE_MODE=full", f"--output={output}"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "parameters" in result.stdout and "forward FLOPs" in result.stdout
  account = json.loads(output.read_text())
  assert account["assumptions"]["task_feature_lengths"] == LENGTHS
  assert account["trainable_mode"] == "full"
  params = account["parameters"]
  assert params["trainable"] == params["total"] and params["by_group"]["lora"] > 0


@pytest.fixture
def clean_gin():
  import gin
  gin.clear_config()
  yield
  gin.clear_config()


def test_a_config_without_model_says_what_is_missing(clean_gin):
  from omni_smola import launching, params
  with pytest.raises(launching.GinConfigError, match="models/"):
    params.parse_config(["adapters/lora.gin"], [])


def test_run_macros_are_read_from_gin(clean_gin):
  from omni_smola import params
  params.parse_config(["models/tiny.gin", "adapters/lora.gin"],
                      ["TASK_FEATURE_LENGTHS = {'inputs': 7, 'targets': 5}"])
  model, lengths, mode = params.run_macros()
  assert (model.config_name, model.adapters.adapter.kind) == ("tiny", "lora")
  assert lengths == LENGTHS and mode == "adapters"


def test_pali3_is_counted_without_allocating():
  spec = AdapterSpec(kind="omni_smola", rank=4, experts_per_group={"mm": 16, "vis": 16,
                                                                     "txt": 16})
  account = accounting.account_model(PaliModel("pali3", spec),
                                     {"inputs": 32, "targets": 32})
  config = configs.get_config("pali3")
  params = account["parameters"]
  text = t5_params(config.text)
  assert params["by_stack"]["vision"]["backbone"] == vit_params(config.vision, 2048)
  assert params["backbone"] == vit_params(config.vision, 2048) + sum(text.values())
  assert account["closed_form_mismatches"] == []
  assert account["assumptions"]["tokens"]["encoder"] == 256 + 32
  from omni_smola import params as params_cli
  table = params_cli.format_table(account)
  assert "pali3" in table and "vision" in table


def test_a_sites_regex_that_matches_no_projection_exits_naming_it(clean_gin):
  from omni_smola import launching, params

  def account():
    params.parse_config(["models/tiny.gin", "adapters/lora.gin"],
                        ["omni_smola.nn.adapter_spec.AdapterSpec.sites = ('^encoder/',)"])
    return params.account_from_gin()

  with pytest.raises(SystemExit, match=r"sites regex '\^encoder/' matches none .*"
                     r"text/encoder/layers_\{i\}/mlp/wo"):
    launching.exit_on_user_error(account)


def test_the_table_lists_which_projections_carry_which_adapter():
  spec = AdapterSpec(kind="lora", rank=2, sites=("^text/encoder/.*/mlp/",))
  account = accounting.account_model(PaliModel("tiny", spec), LENGTHS)
  assert account["adapted_projections"] == {"adapter": [
      f"text/encoder/layers_{i}/mlp/{name}" for i in range(2) for name in ("wi_0", "wi_1", "wo")]}
  from omni_smola import params as params_cli
  table = params_cli.projection_table(account["adapted_projections"])
  assert [line.split()[:3] for line in table.splitlines()[2:]] == [
      [f"text/encoder/layers_{{i}}/mlp/{name}", "adapter", "2"] for name in ("wi_0", "wi_1", "wo")]


PAPER_CONFIGS = ("paper_omni_smola_o48", "paper_smola_mm96", "paper_lora128")


def paper_account(name, lengths):
  from omni_smola import params as params_cli
  import gin
  gin.clear_config()
  try:
    params_cli.parse_config(["models/tiny.gin", f"adapters/{name}.gin"],
                            [f"TASK_FEATURE_LENGTHS = {lengths!r}"])
    return params_cli.account_from_gin()
  finally:
    gin.clear_config()


@pytest.mark.parametrize("name", PAPER_CONFIGS)
def test_paper_configs_adapt_exactly_the_text_encoders_attention_and_mlp(name):
  account = paper_account(name, LENGTHS)
  layers = configs.get_config("tiny").text.num_encoder_layers
  assert account["adapted_projections"] == {"adapter": sorted(
      f"text/encoder/layers_{i}/{p}" for i in range(layers)
      for p in ("attention/query", "attention/key", "attention/value", "attention/out",
                "mlp/wi_0", "mlp/wi_1", "mlp/wo"))}
  assert account["closed_form_mismatches"] == []
  assert account["parameters"]["trainable"] == account["parameters"]["adapters"] > 0
  assert account["flops"]["vision"]["adapters"] == account["flops"]["decoder"]["adapters"] == 0


def test_paper_o48_and_mm96_cost_the_same_inference_flops():
  # Both route 96 slots over every encoder token (O-48: mm + the token's own modality
  # block); O-48 runs its 96 slots' experts once per modality segment, MM-96 once: a
  # difference of the experts' per-slot work, rank / tokens of the routing work.
  lengths = {"inputs": 128, "targets": 8}
  omni = paper_account("paper_omni_smola_o48", lengths)["flops"]["encoder"]["adapters"]
  mm = paper_account("paper_smola_mm96", lengths)["flops"]["encoder"]["adapters"]
  assert mm < omni < 1.05 * mm, (omni, mm)


# ------------------------------------------- counts come from the trace, not from names


def layout_free_counts(account, drop_adafactor=False):
  """Every count of `account`; the config and the projections' names left out."""
  counts = copy.deepcopy({k: v for k, v in account.items()
                          if k not in ("model", "adapted_projections")})
  if drop_adafactor:
    for values in (counts["optimizer"]["state_bytes"], counts["optimizer"]["state_values"]):
      del values["adafactor"]
  return counts


def test_scanned_and_unrolled_models_give_identical_accounts(tiny_account):
  spec = AdapterSpec(kind="omni_smola", rank=RANK, slots_per_expert=SLOTS,
                     experts_per_group=EXPERTS)
  tiny = configs.get_config("tiny")
  scanned = dataclasses.replace(tiny, text=dataclasses.replace(tiny.text, scan_layers=True),
                                vision=dataclasses.replace(tiny.vision, scan_layers=True))
  account = accounting.account_model(PaliModel(scanned, spec), LENGTHS, "adapters",
                                     optimizer_name="adamw")
  # Adafactor keeps placeholders per array, and a scanned stack is one array per kernel:
  # its state is counted on the arrays the model has, so only it may differ.
  assert layout_free_counts(account, True) == layout_free_counts(tiny_account, True)
  assert account["adapted_projections"] == tiny_account["adapted_projections"]


class CrossAttentionRenamed(t5.DecoderLayer):
  """The decoder layer with its cross-attention under a name no rule table knows."""

  def attention(self, name, **kw):
    if name == "encoder_decoder_attention":
      name = "cross_attention"
    return super().attention(name, **kw)


def test_a_renamed_cross_attention_still_runs_on_the_encoders_tokens(tiny_account,
                                                                    monkeypatch):
  monkeypatch.setattr(t5, "DecoderLayer", CrossAttentionRenamed)
  spec = AdapterSpec(kind="omni_smola", rank=RANK, slots_per_expert=SLOTS,
                     experts_per_group=EXPERTS)
  account = accounting.account_model(PaliModel("tiny", spec), LENGTHS, "adapters",
                                     optimizer_name="adamw")
  sites = account["adapted_projections"]["adapter"]
  assert "text/decoder/layers_0/cross_attention/key" in sites
  assert not any("encoder_decoder_attention" in site for site in sites)
  # The decoder's own tokens are text; only the cross-attention's keys and values see
  # the encoder's visual tokens. Filed by name, the renamed keys and values would run on
  # the decoder's tokens: no `vis` FLOPs, and fewer backbone FLOPs and attention scores.
  assert account["flops"]["decoder"]["adapters_by_group"]["vis"] > 0
  assert layout_free_counts(account) == layout_free_counts(tiny_account)


def test_the_matching_lora_rank_trains_as_many_parameters_as_the_target():
  lora_model = PaliModel("tiny", AdapterSpec(kind="lora", rank=3))
  per_rank = sum(d_in + d_out for _, d_in, d_out, _, _ in text_sites(lora_model.config.text))
  assert accounting.trainable_parameter_count(lora_model) == 3 * per_rank
  assert accounting.matching_lora_rank(lora_model, 7 * per_rank + per_rank // 3) == 7
  assert accounting.matching_lora_rank(lora_model, 1) == 1  # never rank 0
  with pytest.raises(ValueError, match="LoRA"):
    accounting.matching_lora_rank(PaliModel("tiny", AdapterSpec(kind="omni_smola")), 100)
