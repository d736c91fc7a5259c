import os
import sys

# Tests run on the CPU, quietly, and find the repo's packages (`omni_smola`, `tasks`).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import pytest  # noqa: E402

# How `make test` spreads the files over its two workers (`-n 2 --dist loadgroup`):
# * each file is one unit of work, so its module fixtures are built once;
# * the files that read the session's trained tiny run (train_common.shared_tiny_run) are
#   one unit: apart, one worker would sit waiting on the other's lock while it trains;
# * the longest units start first, so the workers finish together. The seconds are one
#   uncontended run on a 2-core machine; only their order matters.
SHARED_TINY_RUN = ("test_train.py", "test_eval.py", "test_infer.py")
LONGEST_FIRST = {
    "shared_tiny_run": 200, "test_demo.py": 130, "test_train_multidevice.py": 56,
    "test_multiprocess_train.py": 50, "test_adapter_sharding.py": 46,
    "test_models_pali.py": 41, "test_params_cli.py": 33, "test_adapter_routing.py": 30,
    "test_adapter_math.py": 27, "test_decoding.py": 20,
}


def _work_unit(item) -> str:
  name = os.path.basename(str(item.fspath))
  return "shared_tiny_run" if name in SHARED_TINY_RUN else name


@pytest.hookimpl(tryfirst=True)  # before xdist reads the groups
def pytest_collection_modifyitems(config, items):
  del config
  for item in items:
    item.add_marker(pytest.mark.xdist_group(_work_unit(item)))
  items.sort(key=lambda item: -LONGEST_FIRST.get(_work_unit(item), 0))  # stable: file order kept
