"""omni_smola.data: image decoding, the PaLI feature converter, vocabularies, task ids,
prompt formatting and one-call task registration. Synthetic in-memory sources only."""
import importlib.util
import io
import os
import zlib

import gin
import numpy as np
import PIL.Image
import pytest
import seqio
import sentencepiece as spm
import tensorflow as tf

from omni_smola import data
from omni_smola.data import images
from omni_smola.data import preprocessors
from omni_smola.data import task_ids
from omni_smola.data import vocabularies
from omni_smola.evaluation import metrics
from omni_smola.evaluation import postprocessors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LENGTHS = {"inputs": 8, "targets": 6}


def _encode(array: np.ndarray, fmt: str = "PNG") -> bytes:
  buffer = io.BytesIO()
  PIL.Image.fromarray(array).save(buffer, format=fmt)
  return buffer.getvalue()


def _rgb(seed: int = 0, size=(20, 30)) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)


def _contract_source(records) -> seqio.FunctionDataSource:
  """A source of contract examples; `records` is a list of dicts (image: bytes)."""
  signature = {key: tf.TensorSpec([], tf.string) for key in (
      "image", "image_id", "question_id", "question", "answer_type")}
  signature["answers"] = tf.TensorSpec([None], tf.string)

  def dataset_fn(split, shuffle_files, seed=None):
    del split, shuffle_files, seed
    return tf.data.Dataset.from_generator(
        lambda: (dict(r, answers=list(r["answers"])) for r in records),
        output_signature=signature)
  return seqio.FunctionDataSource(dataset_fn, splits=["train", "validation"])


def _record(index: int, image: bytes, question: str = "what is it?",
            answers=("a cat", "a kitten")) -> dict:
  return {"image": image, "image_id": f"img-{index}", "question_id": f"q-{index}",
          "question": question, "answers": answers, "answer_type": ""}


def _register(name, records, **kwargs):
  kwargs.setdefault("prompt", data.VQA_PROMPT)
  kwargs.setdefault("metric_fns", [metrics.exact_match])
  kwargs.setdefault("postprocess_fn", postprocessors.references)
  return data.register_vl_task(name, source=_contract_source(records), vocabulary="mini",
                               **kwargs)


def _task_examples(image_list) -> tf.data.Dataset:
  """Two tokenized task examples (one short, one too long) with the given images."""
  examples = [{"inputs": [5, 6, 1], "targets": [20, 21, 1], "task_id": [3]},
              {"inputs": [7, 8, 9, 10, 11, 12, 13, 14, 15, 1],
               "targets": [30, 31, 32, 33, 34, 35, 36, 1], "task_id": [4]}]
  signature = {"inputs": tf.TensorSpec([None], tf.int32),
               "targets": tf.TensorSpec([None], tf.int32),
               "task_id": tf.TensorSpec([1], tf.int32),
               "image": tf.TensorSpec([None, None, 3], tf.uint8)}
  return tf.data.Dataset.from_generator(
      lambda: (dict(ex, image=image) for ex, image in zip(examples, image_list)),
      output_signature=signature)


@pytest.fixture(name="converted", scope="module")
def converted_fixture():
  white = np.full((40, 50, 3), 255, np.uint8)
  black = np.zeros((12, 9, 3), np.uint8)
  converter = data.PaliFeatureConverter(image_size=16)
  return list(converter(_task_examples([white, black]), LENGTHS).as_numpy_iterator())


def test_converter_yields_exactly_the_model_features(converted):
  assert set(converted[0]) == {"image", "encoder_input_tokens", "decoder_input_tokens",
                               "decoder_target_tokens", "decoder_loss_weights", "task_id"}
  assert converted[0]["image"].shape == (16, 16, 3)
  assert converted[0]["image"].dtype == np.float32
  assert converted[0]["task_id"].shape == () and converted[0]["task_id"] == 3


def test_converter_scales_pixels_to_minus_one_one(converted):
  np.testing.assert_allclose(converted[0]["image"], 1.0, atol=1e-5)
  np.testing.assert_allclose(converted[1]["image"], -1.0, atol=1e-5)


def test_converter_pads_and_truncates_to_task_feature_lengths(converted):
  np.testing.assert_array_equal(converted[0]["encoder_input_tokens"], [5, 6, 1, 0, 0, 0, 0, 0])
  np.testing.assert_array_equal(converted[1]["encoder_input_tokens"],
                                [7, 8, 9, 10, 11, 12, 13, 14])
  np.testing.assert_array_equal(converted[0]["decoder_target_tokens"], [20, 21, 1, 0, 0, 0])
  np.testing.assert_array_equal(converted[1]["decoder_target_tokens"], [30, 31, 32, 33, 34, 35])


def test_decoder_inputs_are_targets_shifted_right_with_zero_bos(converted):
  for example in converted:
    np.testing.assert_array_equal(example["decoder_input_tokens"][0], 0)
    np.testing.assert_array_equal(example["decoder_input_tokens"][1:],
                                  example["decoder_target_tokens"][:-1])


def test_loss_weights_are_zero_exactly_on_padding(converted):
  np.testing.assert_array_equal(converted[0]["decoder_loss_weights"], [1, 1, 1, 0, 0, 0])
  np.testing.assert_array_equal(converted[1]["decoder_loss_weights"], [1] * 6)


def test_converter_accepts_lengths_for_non_token_features_as_the_evaluator_passes_them():
  ds = _task_examples([np.zeros((4, 4, 3), np.uint8)] * 2)
  out = data.PaliFeatureConverter(image_size=(8, 12))(ds, dict(LENGTHS, image=4, task_id=1))
  assert out.element_spec["image"].shape == (8, 12, 3)


def test_converter_refuses_packing():
  with pytest.raises(ValueError, match="pack"):
    data.PaliFeatureConverter(image_size=8, pack=True)


def test_converter_explains_a_missing_image():
  ds = _task_examples([np.zeros((4, 4, 3), np.uint8)] * 2)
  ds = ds.map(lambda ex: {k: v for k, v in ex.items() if k != "image"})
  with pytest.raises(ValueError, match="image"):
    data.PaliFeatureConverter(image_size=8)(ds, LENGTHS)


def _decode_one(encoded: bytes) -> np.ndarray:
  return images.decode_image(tf.constant(encoded), tf.constant("x"), tf.constant(0)).numpy()


def test_grey_images_become_rgb():
  grey = np.arange(64, dtype=np.uint8).reshape(8, 8)
  decoded = _decode_one(_encode(grey))
  assert decoded.shape == (8, 8, 3)
  for channel in range(3):
    np.testing.assert_array_equal(decoded[..., channel], grey)


def test_alpha_is_dropped():
  rgba = np.concatenate([_rgb(1, (6, 7)), np.full((6, 7, 1), 10, np.uint8)], axis=-1)
  np.testing.assert_array_equal(_decode_one(_encode(rgba)), rgba[..., :3])


def test_jpeg_decodes_to_rgb():
  decoded = _decode_one(_encode(np.full((9, 11, 3), 128, np.uint8), "JPEG"))
  assert decoded.shape == (9, 11, 3)
  assert abs(int(decoded.mean()) - 128) <= 2


def test_whole_files_take_the_graph_path_and_damaged_ones_the_checked_path():
  rgb = _rgb(8, (9, 7))
  for fmt in ("JPEG", "PNG", "GIF", "BMP", "WEBP"):
    assert images.looks_complete(tf.constant(_encode(rgb, fmt))), fmt
  jpeg = _encode(rgb, "JPEG")
  for damaged in (jpeg[:-20], _encode(rgb)[:-5], b"", b"xx", b"GIF8"):
    assert not images.looks_complete(tf.constant(damaged))
  # A whole JPEG with bytes after its end marker fails the check, yet still decodes.
  assert _decode_one(jpeg + b"\n\0").shape == (9, 7, 3)


def _converted_task(name, records, **kwargs):
  task = _register(name, records, **kwargs)
  ds = task.get_dataset(LENGTHS, split="train", shuffle=False)
  return list(data.PaliFeatureConverter(image_size=8)(ds, LENGTHS).as_numpy_iterator())


def test_corrupt_image_error_names_the_task_and_the_example():
  good = _encode(_rgb(2))
  records = [_record(0, good), _record(1, b"definitely not an image"), _record(2, good)]
  records[1]["image_id"] = "broken-image-42"
  with pytest.raises(Exception, match="broken-image-42") as error:
    _converted_task("test_plumbing_corrupt", records)
  assert "test_plumbing_corrupt" in str(error.value)
  assert "CorruptImageError" in str(error.value)


def test_truncated_png_error_names_the_example():
  with pytest.raises(Exception, match="q-7"):
    _converted_task("test_plumbing_truncated", [_record(7, _encode(_rgb(3))[:60])])


def test_corrupt_images_can_be_skipped_and_counted():
  images.reset_skipped_image_counts()
  good = _encode(_rgb(4))
  records = [_record(0, good), _record(1, b"\x89PNG broken"), _record(2, b""), _record(3, good)]
  converted = _converted_task("test_plumbing_skip", records, on_corrupt_image="skip")
  assert len(converted) == 2
  assert images.skipped_image_counts() == {"test_plumbing_skip": 2}


def test_images_stay_encoded_until_the_converter_decodes_them():
  records = [_record(0, _encode(_rgb(5, (10, 10)))), _record(1, _encode(_rgb(6, (7, 3))))]
  task = _register("test_plumbing_encoded", records)
  examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
  assert examples[0]["image"].tolist() == [records[0]["image"]]
  assert examples[0]["example_id"].tolist() == [b"image_id=img-0, question_id=q-0"]
  converted = _converted_task("test_plumbing_encoded", records)
  assert [c["image"].shape for c in converted] == [(8, 8, 3)] * 2
  assert converted[0]["task_id"] == data.task_id("test_plumbing_encoded")


def test_task_examples_carry_prompt_sampled_target_answers_and_task_id():
  records = [_record(i, _encode(_rgb(i)), question=f" question {i} ",
                     answers=("red", "blue", "green")) for i in range(12)]
  task = _register("test_plumbing_format", records)
  examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False,
                                   seed=3).as_numpy_iterator())
  assert examples[5]["inputs_pretokenized"] == b"answer en question 5"
  assert all(e["targets_pretokenized"] in (b"red", b"blue", b"green") for e in examples)
  assert len({e["targets_pretokenized"] for e in examples}) > 1  # sampled, not always first
  assert list(examples[0]["answers"]) == [b"red", b"blue", b"green"]
  assert examples[0]["task_id"].tolist() == [data.task_id("test_plumbing_format")]
  assert "image_pretokenized" not in examples[0]
  again = list(task.get_dataset(LENGTHS, split="train", shuffle=False,
                                seed=3).as_numpy_iterator())
  assert [e["targets_pretokenized"] for e in again] == [
      e["targets_pretokenized"] for e in examples]


def test_first_answer_when_sampling_is_off_and_caption_prompt_ignores_question():
  records = [_record(i, _encode(_rgb(i)), answers=("first", "second")) for i in range(4)]
  task = _register("test_plumbing_first", records, prompt=data.CAPTION_PROMPT,
                   sample_target=False)
  examples = list(task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator())
  assert {e["targets_pretokenized"] for e in examples} == {b"first"}
  assert {e["inputs_pretokenized"] for e in examples} == {b"caption en"}


@pytest.mark.parametrize("style,caption,question", [
    ("pali", b"caption en", b"answer en what is it?"),
    ("paper", b"Generate the alt text in en at 0:", b"Answer in en: what is it?"),
])
def test_the_prompt_style_is_read_from_gin_when_the_dataset_is_built(style, caption, question):
  # The tasks are registered first, with the default style bound, as `import tasks` does.
  records = [_record(0, _encode(_rgb(0)))]
  captions = _register("test_plumbing_style_caption", records, prompt=data.CAPTION_PROMPT)
  questions = _register("test_plumbing_style_question", records)
  with gin.unlock_config():
    gin.bind_parameter("omni_smola.data.prompt_style.style", style)
  try:
    for task, expected in ((captions, caption), (questions, question)):
      (example,) = task.get_dataset(LENGTHS, split="train", shuffle=False).as_numpy_iterator()
      assert example["inputs_pretokenized"] == expected
  finally:
    gin.clear_config()


def test_an_unknown_prompt_style_is_refused_naming_the_setting():
  with pytest.raises(ValueError, match="prompt_style.style must be one of .*'pali'"):
    data.prompt_style("papr")


def test_registering_a_task_twice_replaces_it():
  records = [_record(0, _encode(_rgb(0)))]
  first = _register("test_plumbing_twice", records)
  second = _register("test_plumbing_twice", records, prompt=data.CAPTION_PROMPT)
  assert seqio.get_mixture_or_task("test_plumbing_twice") is second is not first
  data.register_vl_mixture("test_plumbing_mix", {"test_plumbing_twice": 1.0})
  data.register_vl_mixture("test_plumbing_mix", {"test_plumbing_twice": 2.0})


def test_prompt_with_two_placeholders_is_rejected():
  with pytest.raises(ValueError, match="at most once"):
    preprocessors.format_prompt(tf.constant("q"), "{question} {question}")


def test_task_id_is_a_stable_crc_and_maps_back_to_the_name():
  records = [_record(0, _encode(_rgb(0)))]
  _register("test_plumbing_ids", records)
  identifier = data.task_id("test_plumbing_ids")
  assert identifier == zlib.crc32(b"test_plumbing_ids") & 0x7FFFFFFF
  assert 0 <= identifier < 2**31
  assert data.task_name(identifier) == "test_plumbing_ids"
  with pytest.raises(KeyError):
    data.task_name(data.task_id("no_such_task_registered"))


def test_task_id_collisions_are_refused(monkeypatch):
  monkeypatch.setattr(task_ids, "task_id", lambda name: 7)
  task_ids.claim_task_id("collision_a")
  with pytest.raises(ValueError, match="same task_id"):
    task_ids.claim_task_id("collision_b")
  task_ids._id_to_name.pop(7)  # pylint: disable=protected-access


def test_mini_vocabulary_follows_t5_conventions():
  vocab = data.get_vocabulary("mini")
  assert (vocab.pad_id, vocab.eos_id, vocab.unk_id) == (0, 1, 2)
  assert vocab.vocab_size == 1000
  assert os.path.dirname(data.MINI_SENTENCEPIECE_PATH) == os.path.join(REPO, "tasks", "mini")
  for text in ("answer en how many red shapes are there?", "caption en", "stop 42",
               "Zürich\tcafé"):
    ids = vocab.encode(text)
    assert vocab.unk_id not in ids
    assert vocab.decode(ids) == text.replace("\t", " ")
  assert len(vocab.encode("caption en")) == 2


def test_default_vocabulary_reads_the_gin_path_when_used():
  vocab = data.get_vocabulary("default")
  assert vocab == data.get_vocabulary("default")
  with gin.unlock_config():
    gin.bind_parameter("omni_smola.data.sentencepiece_vocabulary.path",
                       data.MINI_SENTENCEPIECE_PATH)
  try:
    assert vocab.vocab_size == 1000
    assert vocab.eos_id == 1
    ids = vocab.encode_tf(tf.constant("caption en")).numpy().tolist()
    assert ids == data.get_vocabulary("mini").encode("caption en")
    assert vocab.decode(ids + [1, 0]) == "caption en"
  finally:
    gin.clear_config()
  assert vocabularies.sentencepiece_vocabulary().sentencepiece_model_file == (
      vocabularies.MT5_SENTENCEPIECE_PATH)


def test_sentencepiece_script_is_deterministic():
  spec = importlib.util.spec_from_file_location(
      "train_mini_spm", os.path.join(REPO, "scripts", "train_mini_spm.py"))
  script = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(script)
  sentences = ["caption en", "a large red circle", "answer en how many shapes are there?",
               "stop 42", "a small blue square left of a green triangle"] * 20
  first = script.train(sentences, vocab_size=300)
  assert first == script.train(sentences, vocab_size=300)
  processor = spm.SentencePieceProcessor(model_proto=first)
  assert [processor.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
