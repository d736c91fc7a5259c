"""Mixtures the studies add to the mini tasks: `mini_captions` (and `_tiny`), the captioning
tasks alone, on which the mini study pretrains its RAW backbone (the paper's RAW checkpoint
was pretrained without the fine-tuning mixture). Listed in a study's `task_modules`."""
from omni_smola.data import register_vl_mixture
from omni_smola.data.prompts import CAPTION_PROMPT
import tasks.mini

CAPTION_SUBTASKS = [s for s, kwargs in tasks.mini.TASK_KWARGS.items()
                    if kwargs["prompt"] is CAPTION_PROMPT]

for _config in tasks.mini.CONFIG_SUFFIXES:
  register_vl_mixture(f"mini_captions{tasks.mini.CONFIG_SUFFIXES[_config]}",
                      {tasks.mini.task_name(s, _config): 1.0 for s in CAPTION_SUBTASKS})
