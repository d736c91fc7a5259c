"""The infer binary: a checkpoint, a task, image files (and a question) in, decoded text out.

Its examples must be the ones training builds: the same image and question through the same
task give the same encoder tokens and pixels, whatever the prompt style.
"""
import json
import os
import sys

import numpy as np
import PIL.Image
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "multidevice_checks"))
import train_common  # noqa: E402

train_common.enable_compilation_cache()

import gin  # noqa: E402
import seqio  # noqa: E402

from omni_smola import infer as infer_lib  # noqa: E402
from omni_smola import launching  # noqa: E402
from omni_smola.data import task_id  # noqa: E402
from omni_smola.training import data_iterator  # noqa: E402

CAPTION_TASK = "mini_shapes_caption_tiny"
VQA_TASK = "mini_shapes_color_qa_tiny"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  root = str(tmp_path_factory.getbasetemp().parent)
  data_dir = train_common.prepare_data(os.path.join(root, "mini_tiny"))
  seqio.set_tfds_data_dir_override(data_dir)
  return data_dir


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir):
  root = str(tmp_path_factory.getbasetemp().parent)
  model_dir, _ = train_common.shared_tiny_run(root, data_dir)
  return data_dir, model_dir


@pytest.fixture
def paper_style():
  gin.clear_config()
  gin.bind_parameter("omni_smola.data.prompt_style.style", "paper")
  yield
  gin.clear_config()


@pytest.mark.parametrize("task_name", [CAPTION_TASK, VQA_TASK])
def test_infer_feeds_the_tokens_and_pixels_training_makes_of_the_same_example(
    data_dir, task_name, paper_style, tmp_path):
  del data_dir, paper_style  # the mini data; the paper's prompts, so no default hides a gap
  lengths = {"inputs": 32, "targets": 16}
  image_size = 16
  source = seqio.get_mixture_or_task(task_name).source
  example = next(source.get_dataset("validation", shuffle=False).as_numpy_iterator())
  trained = next(data_iterator.model_dataset(
      data_iterator.DatasetConfig(task_name, lengths, split="validation", shuffle=False),
      image_size, shard=False).as_numpy_iterator())
  image = tmp_path / "image.png"
  image.write_bytes(example["image"])
  question = example["question"].decode()

  task = infer_lib.resolve_task(task_name, None, question or None)
  features, prompts = infer_lib.infer_features(task, [str(image)], question, lengths,
                                               image_size)

  expected_prompt = (f"Answer in en: {question}" if question
                     else "Generate the alt text in en at 0:")
  assert prompts == [expected_prompt]
  np.testing.assert_array_equal(features["encoder_input_tokens"][0],
                                trained["encoder_input_tokens"])
  np.testing.assert_array_equal(features["image"][0], trained["image"])


@pytest.mark.parametrize("task, prompt, question, message", [
    (CAPTION_TASK, "caption en", None,
     f"--prompt='caption en' and task '{CAPTION_TASK}' \\(--task or INFER_TASK\\) are both"),
    (VQA_TASK, None, None, f"--task='{VQA_TASK}' asks a question: pass --question"),
    (CAPTION_TASK, None, "what is it?",
     f"--task='{CAPTION_TASK}' asks no question .* drop --question='what is it\\?'"),
    ("mini_shapes_captoin_tiny", None, None,
     f"--task='mini_shapes_captoin_tiny': no task is registered .* mean {CAPTION_TASK}"),
    ("mini_generalist_tiny", None, None, "--task='mini_generalist_tiny' is a mixture"),
    (None, "answer en {question}", " ", "--prompt='answer en {question}' asks a question"),
    (None, None, None, "no task given: pass --task=NAME"),
])
def test_infer_rejects_conflicting_or_missing_flags_naming_them(data_dir, task, prompt,
                                                                 question, message):
  del data_dir
  with pytest.raises(launching.FlagError, match=message):
    infer_lib.resolve_task(task, prompt, question, vocabulary="mini")


def test_infer_names_an_image_file_it_cannot_decode(data_dir, tmp_path):
  del data_dir
  image = tmp_path / "notes.png"
  image.write_bytes(b"not an image")
  task = infer_lib.resolve_task(CAPTION_TASK, None, None)
  with pytest.raises(launching.FlagError, match=f"--image={image}: cannot be decoded: "):
    infer_lib.infer_features(task, [str(image)], "", {"inputs": 16, "targets": 16}, 16)


def test_the_binary_reports_a_flag_error_before_reading_the_checkpoint(data_dir, tmp_path):
  train_common.configure(None, data_dir, train_common.INFER_GIN_FILES,
                         train_common.INFER_BINDINGS, CHECKPOINT_PATH=str(tmp_path / "none"))
  try:
    with pytest.raises(SystemExit, match=r"error \(FlagError\): --task='mini_shapes_color_qa_tiny'"
                       " asks a question"):
      launching.exit_on_user_error(
          lambda: infer_lib.infer(images=[str(tmp_path / "a.png")], task=VQA_TASK))
  finally:
    gin.clear_config()


def test_infer_prints_one_line_per_image_and_writes_predictions(checkpoint, tmp_path):
  data_dir, model_dir = checkpoint
  images = []
  for index, size in enumerate([(40, 30), (64, 64)]):
    path = tmp_path / f"image_{index}.png"
    pixels = np.random.default_rng(index).integers(0, 255, size + (3,), dtype=np.uint8)
    PIL.Image.fromarray(pixels).save(path)
    images.append(str(path))
  output_dir = tmp_path / "out"
  run = train_common.run_binary(
      "infer", data_dir, train_common.INFER_GIN_FILES, base=train_common.INFER_BINDINGS,
      CHECKPOINT_PATH=str(model_dir), INFER_OUTPUT_DIR=str(output_dir),
      extra_args=[f"--image={images[0]}", f"--image={images[1]}", f"--task={CAPTION_TASK}",
                  "--decoding=beam", "--beam_size=2"])
  assert run.returncode == 0, run.stderr[-3000:]
  lines = run.stdout.strip().splitlines()
  assert [line.split("\t")[0] for line in lines] == images, run.stdout
  records = [json.loads(line) for line in (output_dir / "predictions.jsonl").read_text()
             .splitlines()]
  assert [r["image"] for r in records] == images
  assert all(r["prompt"] == "caption en" and r["task"] == CAPTION_TASK
             and r["decoding"] == "beam" for r in records)
  assert [r["prediction"] for r in records] == [line.split("\t", 1)[1] if "\t" in line else ""
                                                for line in lines]


def test_infer_rejects_a_missing_image(data_dir, tmp_path):
  train_common.configure(None, data_dir, train_common.INFER_GIN_FILES,
                         train_common.INFER_BINDINGS, CHECKPOINT_PATH=str(tmp_path / "none"))
  try:
    with pytest.raises(FileNotFoundError, match="image file does not exist: .*no.png"):
      infer_lib.infer(images=[str(tmp_path / "no.png")], task=CAPTION_TASK)
  finally:
    gin.clear_config()


def test_images_of_several_tasks_share_a_batch_each_built_by_its_own_task(data_dir, tmp_path):
  del data_dir
  images = []
  for index in range(2):
    path = tmp_path / f"image_{index}.png"
    PIL.Image.fromarray(np.random.default_rng(index).integers(
        0, 255, (24 + 8 * index, 32, 3), dtype=np.uint8)).save(path)
    images.append(str(path))
  lengths = {"inputs": 16, "targets": 16}
  asked = [(CAPTION_TASK, ""), (VQA_TASK, "what color is it?")]
  mixed, prompts, owners = infer_lib.batch_features(
      images, [t for t, _ in asked], [q for _, q in asked], lengths, 16)
  for row, (task_name, question) in enumerate(asked):
    alone, alone_prompts = infer_lib.infer_features(
        infer_lib.resolve_task(task_name, None, question or None), [images[row]], question,
        lengths, 16)
    assert prompts[row] == alone_prompts[0] and owners[row].name == task_name
    for feature in ("encoder_input_tokens", "image"):
      np.testing.assert_array_equal(mixed[feature][row], alone[feature][0])
  assert list(mixed["task_id"]) == [task_id(CAPTION_TASK), task_id(VQA_TASK)]
  with pytest.raises(launching.FlagError, match="--task is given 2 times for 3 --image"):
    infer_lib.infer(model=None, checkpoint_path=None, images=images + images[:1],
                    task=[CAPTION_TASK, VQA_TASK])
