"""Fixtures of the tests that train the tiny config (import them into a test module)."""
import collections

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


# The programs of the modules that use `shared_programs`, kept from one to the next of a
# test process.
PROGRAMS_OF_THE_PROCESS = collections.OrderedDict()


@pytest.fixture(scope="module")
def shared_programs():
  """The module's runs share their programs (`program_cache`), as a study's runs do, with
  the other modules of the process that use this fixture: make it autouse in a module
  whose runs are of fixed code (no layer patched) and whose bit-identical comparisons
  hold with the programs shared."""
  from omni_smola.training import program_cache  # pylint: disable=g-import-not-at-top
  with program_cache.shared_programs(PROGRAMS_OF_THE_PROCESS):
    yield
