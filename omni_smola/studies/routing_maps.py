"""Routing heat maps of one run: `omni_smola.analysis.routing` on its final checkpoint,
configured from the run's own gin files and bindings (the model and adapter it trained
with), written to `<study_dir>/routing/<arm>/`. An analysis of the same checkpoint is
read back instead of repeated."""
import json
import os
from typing import Any, Dict, Optional

import gin

from omni_smola import analyze
from omni_smola.studies import configure
from omni_smola.studies.plan import Run
from omni_smola.studies.spec import Study, gin_binding


def routing_maps(study: Study, run: Run, study_dir: str,
                 output_dir: Optional[str] = None) -> Dict[str, Any]:
  """The analysis summary; written to `output_dir` (default `<study_dir>/routing/<arm>/`)."""
  from omni_smola.analysis import routing  # pylint: disable=g-import-not-at-top
  output_dir = output_dir or os.path.join(study_dir, "routing", run.arm.name)
  checkpoint = os.path.join(study_dir, run.directory)
  record = os.path.join(output_dir, "routing.json")
  gin_files, bindings = configure.run_config(study, run, study_dir)
  bindings += [gin_binding("CHECKPOINT_PATH", checkpoint),
               gin_binding("ANALYSIS_OUTPUT_DIR", output_dir),
               gin_binding("ANALYSIS_NUM_BATCHES", study.routing_batches)]
  gin.clear_config()
  analyze.parse_config(gin_files, bindings)
  try:
    from omni_smola.training import checkpointing  # pylint: disable=g-import-not-at-top
    step_dir = checkpointing.resolve_checkpoint(checkpoint)
    if os.path.exists(record):
      with open(record) as f:
        summary = json.load(f)
      if summary.get("checkpoint") == step_dir:
        return dict(summary, output_dir=output_dir)
    return routing.analyze()
  finally:
    gin.clear_config()
