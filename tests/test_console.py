"""The binaries' console: native stderr and library records go to the run's log file only."""
import os
import subprocess
import sys
import textwrap

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A binary in miniature: holds descriptor 2, logs from "our" code and from a library,
# has native code write to descriptor 2, then names its log file in `run_dir`.
PROGRAM = textwrap.dedent("""
    import os, sys
    import library  # a library's code: a file outside our packages
    from omni_smola import console
    console.hold_native_stderr()
    from absl import app, logging
    # This file stands in for our packages' code.
    console._OUR_PACKAGES += (os.path.dirname(os.path.abspath(__file__)) + os.sep,)

    def main(argv):
      run_dir = argv[1]
      console.quiet_terminal()
      os.write(2, b"native line before the log file\\n")
      logging.info("our line")
      library.log_three_lines()
      logging.info("our detail line", extra=console.FILE_ONLY)
      console.log_to(os.path.join(run_dir, "run.log"))
      if argv[2] == "make_run_dir":
        os.makedirs(run_dir)
      logging.info("our line after the log file")
      os.write(2, b"native line after the log file\\n")

    app.run(main)
""")


LIBRARY = textwrap.dedent("""
    import logging

    def log_three_lines():
      logging.getLogger("some.library").info("library info line")
      logging.getLogger("some.library").warning("library warning line")
      logging.getLogger("some.library").error("library error line")
""")


def run_program(tmp_path, run_dir, make_run_dir: bool) -> str:
  (tmp_path / "program").mkdir(exist_ok=True)
  (tmp_path / "site").mkdir(exist_ok=True)
  program = tmp_path / "program" / "binary.py"
  program.write_text(PROGRAM)
  (tmp_path / "site" / "library.py").write_text(LIBRARY)
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([REPO, str(tmp_path / "site")]))
  result = subprocess.run(
      [sys.executable, str(program), str(run_dir), "make_run_dir" if make_run_dir else "no"],
      env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr
  return result.stderr


def test_the_terminal_gets_our_lines_and_errors_and_the_log_file_everything(tmp_path):
  run_dir = tmp_path / "run"
  terminal = run_program(tmp_path, run_dir, make_run_dir=True)
  for shown in ("our line", "library error line", "our line after the log file"):
    assert shown in terminal, terminal
  for hidden in ("native line", "library info line", "library warning line",
                 "our detail line"):
    assert hidden not in terminal, terminal
  log = (run_dir / "run.log").read_text()
  for line in ("native line before the log file", "native line after the log file",
               "our line", "library info line", "library warning line", "library error line",
               "our detail line", "our line after the log file"):
    assert line in log, line


def test_a_run_that_never_makes_its_directory_writes_nothing_and_loses_nothing(tmp_path):
  run_dir = tmp_path / "never_made"
  terminal = run_program(tmp_path, run_dir, make_run_dir=False)
  assert not run_dir.exists()
  # What native code wrote comes back to the terminal at exit.
  assert "native line before the log file" in terminal
  assert "native line after the log file" in terminal
