"""`python no_spawn_cli.py ARGS...` runs `npr ARGS...` in a process that cannot start child
processes: `subprocess.Popen` (behind `subprocess.run` too) raises. Tests launch torchrun workers
through it to show that a command does all its work in process (e.g. `npr sft --export-hf` at TP2).
"""
import os
import subprocess
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


class _NoChildProcesses(subprocess.Popen):
    def __init__(self, args, *_, **__):
        raise RuntimeError(f"this test process may not start child processes, but was asked to run {args!r}")


subprocess.Popen = _NoChildProcesses

if __name__ == "__main__":
    from megatron_npr.cli import main
    sys.exit(main(sys.argv[1:]))
