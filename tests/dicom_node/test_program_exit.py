"""How the ``petnode`` program ends (``dicom_node.cli.run``): exit handlers run, the code is kept, and threads that
are not daemons are waited for."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_PROGRAM = """
import atexit, sys, threading, time
from pathlib import Path
from dicom_node.cli import run
out = Path(sys.argv[1])
atexit.register(lambda: (out / "exit-handler").write_text("ran"))
if sys.argv[2] == "thread":
    def late() -> None:
        time.sleep(0.3)
        (out / "thread").write_text("done")
    threading.Thread(target=late).start()  # not a daemon: the exit waits for it
print("before exit", flush=False)  # left in the buffer: the exit must flush it
run(sys.argv[3:])
"""


def _program(tmp_path: Path, thread: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", _PROGRAM, str(tmp_path), thread, *args], capture_output=True,
                          text=True, timeout=60)


def test_the_program_runs_exit_handlers_flushes_and_keeps_its_exit_code(tmp_path: Path) -> None:
    ok = _program(tmp_path, "none", "--version")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.splitlines() == ["before exit", "petnode 0.1.0"]
    assert (tmp_path / "exit-handler").read_text() == "ran"
    (tmp_path / "exit-handler").unlink()
    failed = _program(tmp_path, "none", "denoise", str(tmp_path / "missing"), str(tmp_path / "out"))
    assert failed.returncode == 1 and "does not exist" in failed.stderr
    assert (tmp_path / "exit-handler").read_text() == "ran"


def test_the_program_waits_for_threads_that_are_not_daemons(tmp_path: Path) -> None:
    done = _program(tmp_path, "thread", "--version")
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "thread").read_text() == "done" and (tmp_path / "exit-handler").read_text() == "ran"
