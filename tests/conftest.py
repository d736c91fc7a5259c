import os
import sys

import pytest

# Tests run on the CPU, quietly, and find the repo's packages (`omni_smola`, `tasks`).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tests check behaviour, not speed: LLVM's optimisations of XLA's CPU code cost a fifth of
# the suite's compile time, and a test's few steps never win it back. HLO-level passes and
# numerics are unchanged (XLA's CPU fast math stays off). Subprocesses inherit it.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_backend_optimization_level=0").strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# How `make test` spreads the files over its two workers (`-n 2 --dist loadfile
# --no-loadscope-reorder`): each file is one unit of work, so its module fixtures are built
# once, and the longest files start first, so that the workers finish together. The seconds
# are one uncontended run on a 2-core machine; only their order matters. test_train.py
# trains the session's shared tiny run (train_common.shared_tiny_run); test_eval.py and
# test_infer.py read it and come late, so they do not sit waiting on its lock.
LONGEST_FIRST = {
    "test_demo.py": 180, "test_faults.py": 170, "test_train.py": 146, "test_study.py": 120,
    "test_multiprocess_train.py": 75, "test_train_multidevice.py": 65,
    "test_adapter_sharding.py": 43, "test_move.py": 25, "test_memory_plan.py": 25,
    "test_specialist_bank.py": 20, "test_fused_projection.py": 15,
    "test_vision_towers.py": 15,
    "test_models_pali.py": 39, "test_layer_stack.py": 38, "test_adapter_routing.py": 30,
    "test_adapter_math.py": 27, "test_products.py": 21, "test_eval.py": 20,
    "test_decoding.py": 20, "test_infer.py": 19, "test_model_api.py": 17,
    "test_analyze.py": 16, "test_params_cli.py": 12, "test_export.py": 11,
}


def pytest_collection_modifyitems(config, items):
  del config
  items.sort(key=lambda item: -LONGEST_FIRST.get(os.path.basename(str(item.fspath)), 0))


@pytest.fixture(autouse=True)
def absl_records_reach_the_root_logger():
  """Each test starts with absl's logger passing its records to the root (where `caplog`
  listens), whatever an earlier test's in-process binary left: its level, `propagate` and
  `disabled` are reset, and restored after the test."""
  import logging  # pylint: disable=g-import-not-at-top
  absl_logger = logging.getLogger("absl")
  saved = absl_logger.level, absl_logger.propagate, absl_logger.disabled
  absl_logger.setLevel(logging.NOTSET)
  absl_logger.propagate, absl_logger.disabled = True, False
  yield
  absl_logger.setLevel(saved[0])
  absl_logger.propagate, absl_logger.disabled = saved[1], saved[2]

