"""What each projection and attention of a model saw while it was traced.

Accounting needs, per projection, the widths its kernel contracts and produces, how
many tokens of one example it runs on, and which of them each Omni-SMoLA group
applies to; per attention, how many queries meet how many keys. Reading these off
parameter names would break silently when a module is renamed (a cross-attention's
keys run on the encoder's tokens, an attention output contracts two kernel axes).
So they are recorded from the calls themselves, with `nn.intercept_methods`, during
the one `jax.eval_shape` trace that accounting already makes.

Records are keyed by the module's path as traced. A scanned stack traces its layer
once, so `text/encoder/layers/mlp/wi_0` stands for every `layers_{i}`; `projection`
and `attention` take either name (`param_layout.stacked_name`).
"""
import contextlib
import dataclasses
from typing import Dict, Iterator, Mapping, Optional, Union

import flax.linen as nn
import numpy as np

from omni_smola import param_layout
from omni_smola.models.attention import MultiHeadAttention
from omni_smola.models.vit import PatchEmbedding
from omni_smola.nn import AdaptedDense, TokenContext
from omni_smola.nn.adapter_spec import MODALITY_GROUPS
from omni_smola.nn.omni_smola import plan_segments


@dataclasses.dataclass(frozen=True)
class ProjectionRecord:
  """One kernel's matmul as traced, for one example.

  Attributes:
    path: the module's path (`text/decoder/layers_0/encoder_decoder_attention/key`).
    d_in, d_out: contracted input width and output width (products over their axes).
    tokens: positions of one example the projection runs on.
    group_tokens: tokens each Omni-SMoLA group computes on ({'mm', 'vis', 'txt'}), as
      the adapter splits them (`omni_smola.plan_segments` on the projection's context).
    causal: the projection's `TokenContext.causal`.
    d_context: width instance-level routers route on (`instance_features`, or the
      projection's own mean input).
  """
  path: str
  d_in: int
  d_out: int
  tokens: int
  group_tokens: Mapping[str, int]
  causal: bool
  d_context: int


@dataclasses.dataclass(frozen=True)
class AttentionRecord:
  """One attention's score and mixing einsums: `query_tokens x key_tokens x width`."""
  path: str
  query_tokens: int
  key_tokens: int
  width: int  # heads x head_dim


Record = Union[ProjectionRecord, AttentionRecord]


@dataclasses.dataclass
class TraceRecords:
  """Everything recorded during one trace, by module path."""
  projections: Dict[str, ProjectionRecord] = dataclasses.field(default_factory=dict)
  attentions: Dict[str, AttentionRecord] = dataclasses.field(default_factory=dict)

  def projection(self, path: str) -> Optional[ProjectionRecord]:
    """The record of the projection at `path`, a per-layer or a scanned name."""
    return _lookup(self.projections, path)

  def attention(self, path: str) -> Optional[AttentionRecord]:
    return _lookup(self.attentions, path)

  def add(self, table: Dict[str, Record], record: Record) -> None:
    # A subclass's __call__ calling super().__call__ and lifted transforms can show
    # the same call twice; a path traced with two different shapes is a bug here.
    known = table.setdefault(record.path, record)
    if known != record:
      raise ValueError(f"trace_records: {record.path} traced as {known} and as {record}")


def _lookup(table, path):
  if path in table:
    return table[path]
  return table.get(param_layout.stacked_name(path))


def _argument(args, kwargs, index: int, name: str, default=None):
  if len(args) > index:
    return args[index]
  return kwargs.get(name, default)


def _group_tokens(context: TokenContext, tokens: int) -> Dict[str, int]:
  segments, _ = plan_segments(context, tokens, MODALITY_GROUPS)
  return {g: sum(s.stop - s.start for s in segments if g in s.groups)
          for g in MODALITY_GROUPS}


def _projection(path, inputs, d_in, d_out, context) -> ProjectionRecord:
  context = context if context is not None else TokenContext()
  tokens = int(inputs.shape[1])
  features = context.instance_features
  return ProjectionRecord(
      path=path, d_in=int(d_in), d_out=int(d_out), tokens=tokens,
      group_tokens=_group_tokens(context, tokens), causal=bool(context.causal),
      d_context=int(features.shape[-1]) if features is not None else int(d_in))


def _dense_record(module: AdaptedDense, args, kwargs) -> ProjectionRecord:
  inputs = _argument(args, kwargs, 0, "inputs")
  axes = (module.axis,) if isinstance(module.axis, int) else tuple(module.axis)
  features = ((module.features,) if isinstance(module.features, int)
              else tuple(module.features))
  d_in = np.prod([inputs.shape[a % inputs.ndim] for a in axes], dtype=np.int64)
  return _projection(module.path_name, inputs, d_in, np.prod(features, dtype=np.int64),
                     _argument(args, kwargs, 1, "context"))


def _patch_record(module: PatchEmbedding, args, kwargs, output) -> ProjectionRecord:
  # A conv over non-overlapping patches: one matmul per patch token, all of them visual.
  image = _argument(args, kwargs, 0, "image")
  d_in = module.patch_size ** 2 * image.shape[-1]
  return _projection("/".join(module.scope.path), output, d_in, module.width,
                     TokenContext(num_visual_tokens=int(output.shape[1])))


def _attention_record(module: MultiHeadAttention, args, kwargs) -> AttentionRecord:
  inputs_q = _argument(args, kwargs, 0, "inputs_q")
  inputs_kv = _argument(args, kwargs, 1, "inputs_kv")
  return AttentionRecord("/".join(module.scope.path), int(inputs_q.shape[1]),
                         int(inputs_kv.shape[1]), module.num_heads * module.head_dim)


@contextlib.contextmanager
def recording() -> Iterator[TraceRecords]:
  """Records every projection and attention the model calls inside the block."""
  records = TraceRecords()

  def record(next_fun, args, kwargs, context):
    module = context.module
    output = next_fun(*args, **kwargs)
    if context.method_name != "__call__":
      return output
    if isinstance(module, AdaptedDense):
      records.add(records.projections, _dense_record(module, args, kwargs))
    elif isinstance(module, PatchEmbedding):
      records.add(records.projections, _patch_record(module, args, kwargs, output))
    elif isinstance(module, MultiHeadAttention):
      records.add(records.attentions, _attention_record(module, args, kwargs))
    return output

  with nn.intercept_methods(record):
    yield records
