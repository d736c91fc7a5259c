"""Gin file names resolve to the search paths' files whatever the working directory holds."""
import os

import gin
import pytest

from omni_smola import gin_files, launching

REPO_CONFIGS = launching.REPO_GIN_CONFIGS
LOOKALIKE_FOLDERS = ("runs", "models", "adapters", "experiments")


@pytest.fixture(autouse=True)
def clean_gin():
  gin.clear_config()
  yield
  gin.clear_config()


@pytest.fixture(params=["namespace_packages", "regular_packages"])
def crowded_cwd(request, tmp_path, monkeypatch):
  """A working directory on sys.path (as under `python -m`) with folders named like ours."""
  for name in LOOKALIKE_FOLDERS:
    folder = tmp_path / name
    (folder / "demo").mkdir(parents=True)  # e.g. the demo's runs/demo/
    if request.param == "regular_packages":
      (folder / "__init__.py").write_text("")
  monkeypatch.chdir(tmp_path)
  monkeypatch.syspath_prepend(str(tmp_path))
  return tmp_path


def test_includes_and_files_resolve_to_the_search_paths_from_a_crowded_cwd(crowded_cwd):
  launching.parse_gin(["experiments/mini_pretrain.gin", "adapters/lora.gin"],
                      ["MODEL_DIR = 'unused'"], [REPO_CONFIGS], finalize=False)
  # mini_pretrain.gin includes runs/pretrain.gin and models/mini.gin; the later lora.gin
  # replaces its adapter, so the bindings of all three files are in force.
  assert gin.query_parameter("TRAIN_STEPS/macro.value") == 1000
  assert gin.query_parameter("TRAINABLE_MODE/macro.value") == "adapters"


def test_a_missing_file_names_itself_and_every_place_tried(crowded_cwd):
  with pytest.raises(launching.GinConfigError) as error:
    launching.parse_gin(["runs/no_such_run.gin"], [], [REPO_CONFIGS])
  message = str(error.value)
  assert "'runs/no_such_run.gin'" in message
  assert os.path.join(REPO_CONFIGS, "runs", "no_such_run.gin") in message
  assert str(crowded_cwd / "runs" / "no_such_run.gin") in message


def test_a_missing_include_names_the_include_and_the_including_file(crowded_cwd):
  (crowded_cwd / "broken.gin").write_text("include 'models/no_such_model.gin'\n")
  with pytest.raises(launching.GinConfigError) as error:
    launching.parse_gin(["broken.gin"], [], [REPO_CONFIGS])
  message = str(error.value)
  assert "'models/no_such_model.gin'" in message and "broken.gin" in message
  assert os.path.join(REPO_CONFIGS, "models", "no_such_model.gin") in message


def test_search_paths_come_first_then_the_working_directory(tmp_path, monkeypatch, caplog):
  own = tmp_path / "own_configs"
  (own / "models").mkdir(parents=True)
  (own / "models" / "mine.gin").write_text("X = 1\n")
  (tmp_path / "models").mkdir()
  (tmp_path / "models" / "mine.gin").write_text("X = 2\n")
  (tmp_path / "only_here.gin").write_text("X = 3\n")
  monkeypatch.chdir(tmp_path)
  search = [str(own), REPO_CONFIGS]
  assert gin_files.resolve("models/mine.gin", search) == str(own / "models" / "mine.gin")
  assert "write ./models/mine.gin" in caplog.text  # the shadowed cwd file is named
  assert gin_files.resolve("./models/mine.gin", search) == str(tmp_path / "models" / "mine.gin")
  assert gin_files.resolve("only_here.gin", search) == str(tmp_path / "only_here.gin")
  assert gin_files.resolve("models/mini.gin", search) == os.path.join(
      REPO_CONFIGS, "models", "mini.gin")
  with pytest.raises(gin_files.GinFileNotFoundError, match="only_here.gin"):
    gin_files.resolve(str(own / "only_here.gin"), search)  # absolute: that file or nothing
