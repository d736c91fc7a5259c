"""Trains the mini mixture's SentencePiece vocabulary from the mixture's own text.

    python scripts/train_mini_spm.py            # writes tasks/mini/mini_vl.spm.model

The corpus is every prompt and every answer of the `full` config (all splits), drawn
without rendering any image. Training is deterministic (one thread, no sentence sampling),
so running this again reproduces the shipped model byte for byte. BPE rather than unigram:
on a corpus this repetitive, unigram keeps few whole words ("caption" came out as four
pieces) and cannot reach 1,000 pieces; BPE merges every frequent word. T5 ids: pad=0, eos=1,
unk=2, no BOS. No Unicode normalisation (the text is ASCII, and the NFKC tables would make
the file 20 times larger): only tabs and newlines become spaces. Digits are split into
single pieces (counting and reading answers are numbers) and unseen characters fall back
to bytes, so any text can be encoded.
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from omni_smola.data import prompts
from tasks.mini import builder
from tasks.mini.common import SPLITS

VOCAB_SIZE = 1000
# Tabs and newlines become spaces; nothing else changes. A rule table, rather than the
# "identity" rule, because TF-Text logs a line each time it loads a model whose table is empty.
_NORMALIZATION_RULES = "9\t20\nA\t20\nD\t20\n"
DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                              "tasks", "mini", "mini_vl.spm.model")


def corpus(config: builder.MiniVlConfig = builder.FULL) -> list[str]:
  """The model-side text of every example: its prompt, then each of its answers."""
  sentences = []
  for subtask in builder.SUBTASKS:
    for split in SPLITS:
      for sample in builder.samples(config, subtask, split):
        if sample.question:
          sentences.append(prompts.VQA_PROMPT.texts['pali'].format(question=sample.question))
        else:
          sentences.append(prompts.CAPTION_PROMPT.texts['pali'])
        sentences.extend(sample.answers)
  return sentences


def train(sentences: list[str], vocab_size: int = VOCAB_SIZE) -> bytes:
  model = io.BytesIO()
  with tempfile.TemporaryDirectory() as tmp:
    rules = os.path.join(tmp, "rules.tsv")
    with open(rules, "w") as f:
      f.write(_NORMALIZATION_RULES)
    _train(sentences, vocab_size, model, rules)
  proto = sentencepiece_model_pb2.ModelProto.FromString(model.getvalue())
  proto.normalizer_spec.ClearField("normalization_rule_tsv")  # a temporary path
  return proto.SerializeToString(deterministic=True)


def _train(sentences, vocab_size, model, rules) -> None:
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=model, vocab_size=vocab_size,
      model_type="bpe", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
      character_coverage=1.0, byte_fallback=True, split_digits=True,
      normalization_rule_tsv=rules,
      num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
      minloglevel=2)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--output", default=DEFAULT_OUTPUT)
  parser.add_argument("--vocab_size", type=int, default=VOCAB_SIZE)
  args = parser.parse_args(argv)
  sentences = corpus()
  model = train(sentences, args.vocab_size)
  with open(args.output, "wb") as f:
    f.write(model)
  print(f"Wrote {args.output}: {args.vocab_size} pieces from {len(sentences)} sentences.")


if __name__ == "__main__":
  main()
