"""The prompts tasks put before the image's tokens, in one of two styles chosen by gin.

    omni_smola.data.prompt_style.style = 'paper'

* `pali` (default): PaLI's short prompts, "caption en" and "answer en {question}".
* `paper`: the Omni-SMoLA paper's, "Generate the alt text in en at 0:" and
  "Answer in en: {question}" (Wu et al., CVPR 2024, Sec. 4.1).

Tasks are registered when `tasks` is imported, before gin has parsed anything, so a task
keeps the styled prompt and reads the style when its dataset is built. Training, evaluation
and the operative config of a run therefore agree on it. A plain string is a prompt of its
own, whatever the style.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Union

import gin

QUESTION_PLACEHOLDER = "{question}"
STYLES = ("pali", "paper")


def split_prompt(prompt: str) -> tuple[str, str]:
  """(text before, text after) `{question}`; raises on a malformed prompt."""
  if prompt.count(QUESTION_PLACEHOLDER) > 1:
    raise ValueError(f"Prompt {prompt!r} may contain {QUESTION_PLACEHOLDER} at most once.")
  if QUESTION_PLACEHOLDER not in prompt:
    return prompt, ""
  prefix, suffix = prompt.split(QUESTION_PLACEHOLDER)
  return prefix, suffix


@dataclasses.dataclass(frozen=True)
class StyledPrompt:
  """One prompt per style; `{question}` is filled in with the example's question."""
  texts: Mapping[str, str]

  def __post_init__(self):
    missing = [s for s in STYLES if s not in self.texts]
    if missing:
      raise ValueError(f"StyledPrompt {dict(self.texts)} lacks the styles {missing}")
    for text in self.texts.values():
      split_prompt(text)  # a malformed text fails here, not at the first dataset


CAPTION_PROMPT = StyledPrompt({"pali": "caption en", "paper": "Generate the alt text in en at 0:"})
VQA_PROMPT = StyledPrompt({"pali": "answer en {question}", "paper": "Answer in en: {question}"})

Prompt = Union[str, StyledPrompt]


@gin.configurable(module="omni_smola.data")
def prompt_style(style: str = "pali") -> str:
  if style not in STYLES:
    raise ValueError(f"omni_smola.data.prompt_style.style must be one of {STYLES}, "
                     f"got {style!r}")
  return style


def prompt_text(prompt: Prompt) -> str:
  """The text of `prompt` in the gin-chosen style (a string is its own text)."""
  return prompt if isinstance(prompt, str) else prompt.texts[prompt_style()]
