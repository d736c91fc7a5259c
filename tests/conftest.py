import os
import sys

import pytest

# Tests run on the CPU, quietly, and find the repo's packages (`omni_smola`, `tasks`).
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Tests check behaviour, not speed: LLVM's optimisations of XLA's CPU code cost a fifth of
# the suite's compile time, and a test's few steps never win it back. XLA's newer CPU
# fusion emitters take longer to compile than the classic ones they replace (a tiny eager
# op: 45 ms against 72; the 8-device adapter check: 23 CPU-s against 44), and the tests'
# programs are small. HLO-level passes and numerics are unchanged (XLA's CPU fast math
# stays off). Subprocesses inherit both.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
for _flag in TEST_XLA_FLAGS:
  if _flag.split("=")[0] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# How `make test` spreads the files over its two workers (`-n 2 --dist loadfile
# --no-loadscope-reorder`): each file is one unit of work, so its module fixtures are built
# once, and the longest files start first, so that the workers finish together (each worker
# takes two files at the start, then one whenever it is down to one: the first and third
# go to one worker, the second and fourth to the other). The seconds are a cold full-suite
# run's per-file figures (617 s wall, at a7df196), except test_study.py's: it is put third,
# behind test_faults.py on one worker, where it finds the tiny config's programs traced
# (run_fixtures.shared_programs) instead of tracing them beside it on the other. Only the
# order matters. test_faults.py trains the session's shared tiny run
# (train_common.shared_tiny_run) a minute in; test_train.py, test_eval.py and test_infer.py
# read it and start later, so they do not sit waiting on its lock.
LONGEST_FIRST = {
    "test_faults.py": 192, "test_demo.py": 111, "test_study.py": 100,
    "test_train_multidevice.py": 72, "test_multiprocess_train.py": 50, "test_train.py": 43,
    "test_adapter_sharding.py": 40, "test_adapter_routing.py": 32, "test_layer_stack.py": 30,
    "test_products.py": 27, "test_pix2struct_inputs.py": 26, "test_models_pali.py": 24,
    "test_mome_model.py": 23,
    "test_eval.py": 22, "test_analyze.py": 21, "test_infer.py": 20, "test_params_cli.py": 15,
    "test_memory_plan.py": 14, "test_vl_tasks.py": 14, "test_models_t5.py": 12,
    "test_decoding.py": 11, "test_train_errors.py": 10, "test_adapter_export.py": 10,
    "test_move.py": 9, "test_model_api.py": 9, "test_specialist_bank.py": 9,
    "test_mini_mixture.py": 8, "test_checkpoint_pali.py": 8, "test_fused_projection.py": 7,
    "test_microbatches.py": 7, "test_data_plumbing.py": 6, "test_vision_towers.py": 6,
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

