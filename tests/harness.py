"""Helpers shared by test files: a script under tools/ loaded as a module, and a command run in
a session of its own whose leftovers are killed."""
from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def load_tool(name: str):
    """tools/NAME.py as a module (tools/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_in_session(cmd: list[str], log: Path, env: dict, timeout: float = 600) -> int:
    """Run `cmd` with its output in `log` (a file, not a pipe: a killed run's helper processes may
    keep pipes open); afterwards kill its whole session, as a scheduler does to a killed job's
    leftovers. Returns the exit code."""
    with log.open("w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
