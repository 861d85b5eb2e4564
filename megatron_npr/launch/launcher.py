"""`npr launch STAGE CONFIG [key=value ...] [--dry-run]`: what every `slurm/*.sh` script runs on the
batch host.

    settings + allocation -> config (validated) -> paths checked -> plan printed and saved
      -> srun the engine step (RL with external engines) and the training step
      -> forward the preemption signal -> the ranks checkpoint and exit PREEMPTED_EXIT
      -> `scontrol requeue` -> the requeued job resumes from that checkpoint

Logs: `<NPR_RUNS_DIR>/<job name>-<job id>/`: plan.json, launcher.log, node-<host>.log per node
(one line per rank output, prefixed with the rank), engines-<host>.log.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from ..training.preemption import MARKER_VARIABLE, PREEMPTED_EXIT
from .cluster import ClusterSettings
from .plan_text import LaunchPlan, build_plan
from .slurm import Allocation, AllocationError, engine_layout, srun_command

DISTRIBUTED = ("sft", "rl")  # one rank per GPU; the other stages run as one task
STAGES = ("sft", "rl", "sample", "eval", "convert")


class LaunchError(RuntimeError):
    """A launch refused before any rank started (names the variable, key or path)."""


def launch(stage: str, args: list[str], *, dry_run: bool = False, env: dict | None = None,
           nodes: int | None = None, gpus_per_node: int | None = None, gpu: str = "h100",
           model: str | None = None) -> int:
    """Resolve, print and save the plan; unless `dry_run`, run it. Returns the exit code."""
    env = dict(os.environ if env is None else env)
    settings = ClusterSettings.from_env(env)
    if dry_run and nodes:
        alloc = Allocation.planned(nodes, gpus_per_node or settings.gpus_per_node or 8)
    else:  # scontrol as the job's PATH finds it
        alloc = Allocation.from_env(env, settings, shutil.which("scontrol", path=env.get("PATH")) or "scontrol")
    plan = build_plan(stage, args, alloc, settings, gpu=gpu, model=model, estimate=dry_run)
    log_dir = Path(settings.runs_dir) / alloc.log_name
    log = _Log(None if dry_run and nodes else log_dir / "launcher.log")
    log.write(plan.text())
    if dry_run:
        if not nodes:
            plan.save(log_dir / "plan.json")
        return 0
    if plan.missing:
        raise LaunchError("missing on the batch host " + alloc.hosts[0] + ": "
                          + "; ".join(f"{k}={p}" for k, p in plan.missing)
                          + " (every node must see the same paths: is the shared file system mounted?)")
    plan.save(log_dir / "plan.json")
    return run_plan(plan, alloc, settings, log_dir, log, env)


def run_plan(plan: LaunchPlan, alloc: Allocation, settings: ClusterSettings, log_dir: Path, log,
             job_env: dict) -> int:
    """The engine step (if any), the training step, signal forwarding, engine shutdown, requeue."""
    python = settings.python or sys.executable
    marker = log_dir / "preempted.json"  # written by rank 0 when the ranks stopped at a checkpoint
    marker.unlink(missing_ok=True)
    env = {**job_env, **settings.rank_env(), "MASTER_ADDR": alloc.master_addr,
           "MASTER_PORT": str(alloc.master_port(settings)), "TQDM_MININTERVAL": "30", MARKER_VARIABLE: str(marker)}
    rank_cmd = [python, "-m", "megatron_npr.cli", "launch-rank", plan.stage, *plan.rank_args]
    gpus = alloc.gpus_per_node if alloc.gpus_from_slurm else None
    engines = None
    if plan.engines:
        engine_nodes, per_node = engine_layout(plan.engines, alloc.nodes)
        cmd = srun_command(settings, nodes=engine_nodes, tasks_per_node=per_node, gpus_per_node=gpus,
                           output=str(log_dir / "engines-%N.log"), kill_on_bad_exit=False,
                           command=[python, "-m", "megatron_npr.cli", "launch-rank", "engine", *plan.rank_args])
        log.write("$ " + " ".join(cmd))
        engines = subprocess.Popen(cmd, env=env)
    nodes, per_node = (alloc.nodes, alloc.gpus_per_node) if plan.stage in DISTRIBUTED else (1, 1)
    cmd = srun_command(settings, nodes=nodes, tasks_per_node=per_node, output=str(log_dir / "node-%N.log"),
                       kill_on_bad_exit=True, command=rank_cmd, gpus_per_node=gpus and per_node)
    log.write("$ " + " ".join(cmd))
    trainer = subprocess.Popen(cmd, env=env)
    with _forwarding_signals(trainer, settings.preempt_signal, log):
        code = _wait(trainer, engines, log, log_dir)
    if engines is not None:
        _stop(engines, grace_s=120, log=log)
    log.write(f"training step exited {code}")
    if marker.is_file() or code == PREEMPTED_EXIT:
        return _requeue(alloc, log, env)
    return code


class _forwarding_signals:
    """While the training step runs, the preemption signal and SIGTERM reaching the launcher (the
    batch step of `#SBATCH --signal=B:USR1@600`) go on to srun, which passes them to every rank."""

    def __init__(self, proc: subprocess.Popen, preempt_signal: str, log):
        self.proc, self.log, self.previous = proc, log, {}
        self.names = tuple(dict.fromkeys((preempt_signal, "SIGTERM")))

    def _forward(self, signum, frame) -> None:  # noqa: ARG002
        self.log.write(f"{signal.Signals(signum).name} received: passed to the ranks, which checkpoint and stop")
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def __enter__(self):
        for name in self.names:
            self.previous[name] = signal.signal(getattr(signal, name), self._forward)
        return self

    def __exit__(self, *exc):
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)


def _wait(trainer: subprocess.Popen, engines: subprocess.Popen | None, log, log_dir: Path) -> int:
    """The training step's exit code; an engine step that fails first ends it (instead of the
    trainer waiting out rollout.timeout_s for engines that will never answer)."""
    while trainer.poll() is None:
        if engines is not None and engines.poll() not in (None, 0):
            log.write(f"the engine step exited {engines.returncode} while training ran (see "
                      f"{log_dir}/engines-*.log): stopping the training step")
            trainer.terminate()
            try:
                return trainer.wait(timeout=60) or 1
            except subprocess.TimeoutExpired:
                trainer.kill()
                return trainer.wait() or 1
        time.sleep(1.0)
    return trainer.returncode


def _stop(proc: subprocess.Popen, grace_s: float, log) -> None:
    """Engines leave when the trainer closes the rollout group; after a failure they may not."""
    deadline = time.monotonic() + grace_s
    while proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.5)
    if proc.poll() is None:
        log.write(f"the engine step is still running {grace_s:.0f} s after training ended: stopping it")
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def _requeue(alloc: Allocation, log, env: dict) -> int:
    """The ranks stopped at a checkpoint on request: put the job back in the queue (it needs
    `#SBATCH --requeue`); the next attempt resumes from the checkpoint."""
    try:
        out = subprocess.run(["scontrol", "requeue", alloc.job_id], capture_output=True, text=True, timeout=60,
                             env=env)
    except (OSError, subprocess.TimeoutExpired) as e:
        out = subprocess.CompletedProcess([], 1, "", str(e))
    if out.returncode:
        log.write(f"`scontrol requeue {alloc.job_id}` failed ({out.stderr.strip()}): the checkpoint is saved; "
                  "submit the same script again to resume")
        return PREEMPTED_EXIT
    log.write(f"job {alloc.job_id} requeued: the next attempt resumes from the checkpoint")
    return 0


class _Log:
    """Prints, and appends to launcher.log (the sbatch output file may be elsewhere)."""

    def __init__(self, path: Path | None):
        self.path = path
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, text: str) -> None:
        print(text, flush=True)
        if self.path:
            with self.path.open("a") as f:
                f.write(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {text}\n")


def main(args) -> int:
    """The `npr launch` command (argparse namespace from cli.py)."""
    from ..config import ConfigError
    try:
        return launch(args.stage, list(args.args), dry_run=args.dry_run, nodes=args.nodes,
                      gpus_per_node=args.gpus_per_node, gpu=args.gpu, model=args.model)
    except (AllocationError, LaunchError, ConfigError, FileNotFoundError, ValueError) as e:
        print(f"npr launch: {e}", file=sys.stderr)
        return 2


def add_launch_commands(sub) -> None:
    p = sub.add_parser("launch", help="run a stage on the SLURM allocation: one rank per GPU, engines per node, "
                                      "requeue on preemption (what slurm/*.sh run)")
    p.add_argument("stage", choices=STAGES)
    p.add_argument("args", nargs="*", help="CONFIG [key=value ...] (convert: -- the convert_hf.py arguments)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved plan and the estimate, start nothing")
    p.add_argument("--nodes", type=int, help="with --dry-run outside an allocation: the nodes to plan for")
    p.add_argument("--gpus-per-node", type=int, help="with --dry-run --nodes: GPUs per node (default 8)")
    p.add_argument("--gpu", default="h100", choices=("h100", "h200", "cpu"), help="the estimate's GPU")
    p.add_argument("--model", help="the estimate's model when model.hf_dir is not here: a folder or a preset")
    p.set_defaults(func=main)
    r = sub.add_parser("launch-rank", help="(internal) one srun task of `npr launch`")
    r.add_argument("stage", choices=(*STAGES, "engine"))
    r.add_argument("args", nargs="*")
    r.set_defaults(func=lambda a: __import__("megatron_npr.launch.rank", fromlist=["main"]).main(a.stage, a.args))
