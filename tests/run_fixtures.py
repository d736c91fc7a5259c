"""Fixtures of the tests that train the tiny config (import them into a test module)."""
import gin
import pytest

import train_common


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """The tiny mini dataset, built once and shared by the pytest workers of one run (the mini
  source locks while it builds)."""
  return train_common.prepare_data(str(tmp_path_factory.getbasetemp().parent / "mini_tiny"))


@pytest.fixture(autouse=True)
def clean_gin():
  """Every test starts from an empty gin config, whatever the previous one parsed."""
  yield
  gin.clear_config()


@pytest.fixture(scope="module")
def shared_programs():
  """The module's runs share their programs (`program_cache`), as a study's runs do: make
  it autouse in a module whose runs are of one config (their bit-identical comparisons
  then hold with the programs shared)."""
  from omni_smola.training import program_cache  # pylint: disable=g-import-not-at-top
  with program_cache.shared_programs():
    yield
