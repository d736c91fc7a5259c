"""MoME's frozen vision towers filled from checkpoints of their own (VISION_TOWER_CHECKPOINTS).

Why this exists: a MoME model's towers (`vision_towers/<name>/...`) stay frozen while MoVE and
MoLE train, and the backbone checkpoint a MoME run starts from (a single-ViT PaLI) does not
hold them. A frozen tower left at its random initialisation feeds MoVE noise for the whole run
and nothing fails: the silent no-op this module refuses. Every frozen tower is filled, by
INITIAL_CHECKPOINT_PATH or by its entry here, or the run stops naming the tower and the
checkpoint (`TowerNotFilledError`). A tower that trains (TRAINABLE_MODE 'full', a
`trainable_overrides` entry) may start at its initialisation: it learns.

`VISION_TOWER_CHECKPOINTS = {'<tower>': source}` (gin, `models/*_mome.gin`, read by
`trainer.train`'s `vision_tower_checkpoints` when a run initialises, never when it resumes),
where `source` is
* a transformers checkpoint (model folder, `.safetensors` file or index) of a `Dinov2Model`,
  `CLIPVisionModel` or `Pix2StructVisionModel`: `hf_vision_towers.load_vision_tower` imports it
  and refuses a width, patch size or depth other than the tower config's, naming the field;
* an omni_smola checkpoint (a MODEL_DIR, its `checkpoints/`, a step, or any format
  `restore.read_checkpoint` reads) holding `vision_towers/<tower>/...`, e.g. a run that trained
  the tower (a study's tower-pretraining stage);
* `(path, subtree)`: such a checkpoint, read from another subtree of it
  (`{'photos': ('runs/x', 'vision_towers/dinov2')}`: a tower trained under another name).

A source's values replace what INITIAL_CHECKPOINT_PATH holds for that tower.
"""
import dataclasses
from typing import Any, Callable, Iterable, List, Mapping, Optional, Sequence, Tuple

from omni_smola.checkpoints import restore
from omni_smola.checkpoints.hf_vision_towers import load_vision_tower
from omni_smola.checkpoints.tree import Flat

TOWERS_KEY = "vision_towers"  # `models.pali`'s module name for PaliConfig.vision_towers


class TowerNotFilledError(ValueError):
  """A frozen vision tower that no checkpoint fills would stay at its random initialisation."""


def tower_prefix(tower: str) -> str:
  """The parameter subtree of tower `tower`: 'vision_towers/<tower>'."""
  return f"{TOWERS_KEY}/{tower}"


@dataclasses.dataclass(frozen=True)
class TowerSource:
  """Where one tower's parameters come from: `path`, and the subtree of it ('' for HF)."""
  tower: str
  path: str
  subtree: str

  @property
  def label(self) -> str:
    return f"{self.path}" + (f" ({self.subtree}/)" if self.subtree else "")


def parse_sources(mapping: Optional[Mapping[str, Any]], towers: Iterable[str]
                  ) -> List[TowerSource]:
  """VISION_TOWER_CHECKPOINTS as `TowerSource`s; an entry naming no tower is an error."""
  towers = list(towers)
  sources = []
  for tower, value in sorted((mapping or {}).items()):
    if tower not in towers:
      raise ValueError(f"VISION_TOWER_CHECKPOINTS names tower {tower!r}, which the model does "
                       f"not have (PaliConfig.vision_towers: {towers})")
    path, subtree = value, None
    if isinstance(value, (tuple, list)):
      if len(value) != 2 or not all(isinstance(v, str) for v in value):
        raise ValueError(f"VISION_TOWER_CHECKPOINTS[{tower!r}] = {value!r}: give a path or "
                         "(path, subtree)")
      path, subtree = value
    elif not isinstance(value, str) or not value:
      raise ValueError(f"VISION_TOWER_CHECKPOINTS[{tower!r}] = {value!r}: give a path or "
                       "(path, subtree)")
    sources.append(TowerSource(tower, path, (subtree if subtree is not None
                                             else tower_prefix(tower)).strip("/")))
  return sources


def read_tower(source: TowerSource, config: Any,
               resolve: Callable[[str], str] = lambda path: path) -> Flat:
  """`source`'s parameters for a tower of `config`, at the model's paths (`vision_towers/..`).

  `resolve` turns a MODEL_DIR into the checkpoint to read (the trainer's
  `checkpointing.resolve_checkpoint`).
  """
  path = resolve(source.path)
  prefix = tower_prefix(source.tower)
  if restore.detect_format(path) == "hf":
    flat = load_vision_tower(path, config)
    return {f"{prefix}/{name}": value for name, value in flat.items()}
  loaded = restore.read_checkpoint(path)
  inside = {name[len(source.subtree) + 1:]: value for name, value in loaded.items()
            if name.startswith(source.subtree + "/")}
  if not inside:
    held = sorted({"/".join(name.split("/")[:2]) for name in loaded
                   if name.startswith(TOWERS_KEY + "/")})
    raise TowerNotFilledError(
        f"VISION_TOWER_CHECKPOINTS[{source.tower!r}]: {path} holds nothing under "
        f"{source.subtree}/ (its towers: {held or 'none'}); name a checkpoint that trained "
        f"the tower, or (path, subtree) for another subtree")
  return {f"{prefix}/{name}": value for name, value in inside.items()}


class TowerFill:
  """A run's tower sources, read up front, and the check that no frozen tower stays random.

  Args:
    towers: `{name: tower config}` (`dict(PaliConfig.vision_towers)`).
    sources: VISION_TOWER_CHECKPOINTS.
    resolve: MODEL_DIR -> checkpoint (see `read_tower`).
  """

  def __init__(self, towers: Mapping[str, Any], sources: Optional[Mapping[str, Any]],
               resolve: Callable[[str], str] = lambda path: path):
    self.towers = dict(towers)
    self.sources = parse_sources(sources, self.towers)
    self.arrays: Flat = {}
    for source in self.sources:
      self.arrays.update(read_tower(source, self.towers[source.tower], resolve))

  @property
  def allow_missing(self) -> Tuple[str, ...]:
    """What INITIAL_CHECKPOINT_PATH may lack: the towers (`check_filled` judges them)."""
    return (f"^{TOWERS_KEY}/",) if self.towers else ()

  def fills(self, name: str) -> bool:
    """Whether parameter `name` comes from a tower source."""
    return any(name.startswith(tower_prefix(s.tower) + "/") for s in self.sources)

  def check_filled(self, param_names: Iterable[str], frozen: Callable[[str], bool],
                   checkpoint_names: Iterable[str], checkpoint: Optional[str]) -> None:
    """Raises `TowerNotFilledError` for a frozen tower neither a source nor the checkpoint holds.

    `checkpoint_names`: the parameter paths INITIAL_CHECKPOINT_PATH (`checkpoint`, None
    when the run starts from nothing) holds.
    """
    param_names, checkpoint_names = list(param_names), set(checkpoint_names)
    sourced = {s.tower for s in self.sources}
    for tower in sorted(set(self.towers) - sourced):
      prefix = tower_prefix(tower) + "/"
      frozen_params = [n for n in param_names if n.startswith(prefix) and frozen(n)]
      if frozen_params and not any(n.startswith(prefix) for n in checkpoint_names):
        given = (f"INITIAL_CHECKPOINT_PATH {checkpoint} holds no {prefix}..." if checkpoint
                 else "no INITIAL_CHECKPOINT_PATH is given")
        raise TowerNotFilledError(
            f"vision tower {tower!r} is frozen in this run ({len(frozen_params)} parameters "
            f"under {prefix}, e.g. {frozen_params[0]}) and {given}, so it would stay at its "
            f"random initialisation and MoVE would fuse noise. Fill it: "
            f"VISION_TOWER_CHECKPOINTS = {{'{tower}': '<transformers model dir, or a "
            f"checkpoint/MODEL_DIR holding {prefix}>'}}; or train it (TRAINABLE_MODE = "
            f"'full', or trainable_overrides [('^{prefix}', True)])")

  def fill(self, params: Any) -> Any:
    """`params` (a tree of arrays) with every sourced tower's parameters in place.

    Every parameter of a sourced tower must be in its source, with the model's shape (a
    `CheckpointMismatchError` names each one that is not).
    """
    if not self.sources:
      return params
    return restore.merge_into(
        params, self.arrays, [tower_prefix(s.tower) for s in self.sources],
        source="VISION_TOWER_CHECKPOINTS (" + ", ".join(
            f"{s.tower}: {s.label}" for s in self.sources) + ")")

