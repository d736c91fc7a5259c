"""What a run leaves behind for the study: a done record or a failure record.

`study_done.json` is written atomically after the run's training and evaluation, with
its scores and the configuration it ran with; a rerun of the study skips the run. A
failure leaves `study_failed.json` (the error, the traceback) instead and the run is tried
again next time (the trainer resumes from its last checkpoint).
"""
import json
import os
from typing import Any, Dict, Optional

from omni_smola.evaluation import evaluator

DONE = "study_done.json"
FAILED = "study_failed.json"


def read(path: str) -> Optional[Dict[str, Any]]:
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def done(run_dir: str) -> Optional[Dict[str, Any]]:
  return read(os.path.join(run_dir, DONE))


def failed(run_dir: str) -> Optional[Dict[str, Any]]:
  return read(os.path.join(run_dir, FAILED))


def write_done(run_dir: str, record: Dict[str, Any]) -> None:
  os.makedirs(run_dir, exist_ok=True)
  evaluator.write_json_atomically(os.path.join(run_dir, DONE), record)
  if os.path.exists(os.path.join(run_dir, FAILED)):
    os.remove(os.path.join(run_dir, FAILED))


def write_failed(run_dir: str, record: Dict[str, Any]) -> None:
  os.makedirs(run_dir, exist_ok=True)
  evaluator.write_json_atomically(os.path.join(run_dir, FAILED), record)
