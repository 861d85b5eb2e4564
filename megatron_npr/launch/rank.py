"""`npr launch-rank STAGE ARGS`: one srun task of `npr launch`. SLURM's task variables become the
env:// ones torch.distributed reads, the stage's paths are checked on this node (a node without
the shared file system is named, not left to fail later), then the stage's own command runs."""
from __future__ import annotations

import os
import signal
import socket
import sys

# SLURM task variable -> torch.distributed variable
TASK_VARIABLES = (("SLURM_PROCID", "RANK"), ("SLURM_NTASKS", "WORLD_SIZE"), ("SLURM_LOCALID", "LOCAL_RANK"),
                  ("SLURM_NODEID", "GROUP_RANK"))


def rank_env(env: dict) -> dict[str, str]:
    """RANK, WORLD_SIZE, LOCAL_RANK, GROUP_RANK and LOCAL_WORLD_SIZE of this srun task."""
    missing = [s for s, _ in TASK_VARIABLES if not env.get(s, "").isdigit()]
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not set: `npr launch-rank` runs as an srun task of `npr launch`")
    out = {torch_name: env[slurm] for slurm, torch_name in TASK_VARIABLES}
    per_node = env.get("SLURM_NTASKS_PER_NODE", "").split("(")[0].split(",")[0]
    out["LOCAL_WORLD_SIZE"] = per_node if per_node.isdigit() else "1"
    return out


def _fail(message: str, code: int = 2) -> int:
    print(f"npr launch-rank: {message}", file=sys.stderr, flush=True)
    return code


def check_paths_here(stage: str, args: list[str]) -> str | None:
    """A message naming this host and the stage's paths it cannot see, or None."""
    from .paths import missing_paths, stage_paths
    from .plan_text import load_stage_config

    cfg = load_stage_config("rl" if stage == "engine" else stage, args)
    missing = missing_paths(*stage_paths(stage, cfg, args))
    if not missing:
        return None
    return (f"on host {socket.gethostname()} (rank {os.environ.get('RANK', '?')}): "
            + "; ".join(f"{k}={p} does not exist" for k, p in missing)
            + " (is the shared file system mounted on every node?)")


def main(stage: str, args: list[str]) -> int:
    from ..training.preemption import record_early_signals, stop_signals
    if stage == "engine":  # engine k of the engine step is rank k + 1 of the rollout group, no trainer rank
        engine_rank = int(os.environ.get("SLURM_PROCID", "0")) + 1
        for name in stop_signals():  # engines stop when the trainer closes the group, after its checkpoint
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    else:
        record_early_signals()
        os.environ.update(rank_env(os.environ))
    problem = check_paths_here(stage, args)
    if problem:
        return _fail(problem)
    if stage == "convert":
        return _convert(args)
    from ..cli import main as npr
    if stage == "engine":
        return npr(["engine", *args, "--rank", str(engine_rank)])
    return npr([stage, *args])


def _convert(args: list[str]) -> int:
    """tools/convert_hf.py from the submit directory (a checkout: the tools are not installed)."""
    import runpy
    tool = os.path.join(os.environ.get("SLURM_SUBMIT_DIR", os.getcwd()), "tools", "convert_hf.py")
    if not os.path.exists(tool):
        return _fail(f"{tool} not found: submit convert.sh from the repository's root")
    sys.argv = [tool, *args]
    try:
        runpy.run_path(tool, run_name="__main__")
    except SystemExit as e:
        return int(e.code or 0)
    return 0
