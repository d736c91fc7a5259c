"""Data plumbing: image decoding, vocabularies, the PaLI feature converter, task registration.

Public API (see README "Data and tasks"):
  register_vl_task, build_vl_task, register_vl_mixture, tfds_source, vl_output_features
  VLTask (dataset_from_contract: a task's examples for in-memory contract examples),
  contract_source
  PaliFeatureConverter
  get_vocabulary, sentencepiece_vocabulary (gin), MINI_SENTENCEPIECE_PATH
  task_id, task_name
  decode_image, drop_unreadable_images, resize_and_normalize, CorruptImageError,
  skipped_image_counts
  CAPTION_PROMPT, VQA_PROMPT, StyledPrompt, prompt_style (gin: the prompts' style)
"""
from omni_smola.data.feature_converter import PaliFeatureConverter
from omni_smola.data.images import CorruptImageError
from omni_smola.data.images import decode_image
from omni_smola.data.images import drop_unreadable_images
from omni_smola.data.images import resize_and_normalize
from omni_smola.data.images import skipped_image_counts
from omni_smola.data.prompts import CAPTION_PROMPT
from omni_smola.data.prompts import StyledPrompt
from omni_smola.data.prompts import VQA_PROMPT
from omni_smola.data.prompts import prompt_style
from omni_smola.data.registration import VLTask
from omni_smola.data.registration import VLTfdsSource
from omni_smola.data.registration import build_vl_task
from omni_smola.data.registration import contract_source
from omni_smola.data.registration import register_vl_mixture
from omni_smola.data.registration import register_vl_task
from omni_smola.data.registration import tfds_source
from omni_smola.data.registration import vl_output_features
from omni_smola.data.task_ids import task_id
from omni_smola.data.task_ids import task_name
from omni_smola.data.vocabularies import MINI_SENTENCEPIECE_PATH
from omni_smola.data.vocabularies import get_vocabulary
from omni_smola.data.vocabularies import sentencepiece_vocabulary
