"""SLURM -> torch.distributed: the allocation from SLURM's variables, the rendezvous address and
port, and the srun command lines of the ranks and of the rollout engines.

One process per GPU, started as srun tasks (`--ntasks-per-node=G`), not torchrun per node: SLURM
then knows every rank (`--kill-on-bad-exit` ends the step when one fails, signals reach every
rank) and each task maps SLURM_PROCID / SLURM_LOCALID / SLURM_NTASKS to RANK / LOCAL_RANK /
WORLD_SIZE itself (`rank.py`). The master is the first host of the node list.
"""
from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass

from .cluster import ClusterSettings


class AllocationError(RuntimeError):
    """The SLURM environment does not describe a usable allocation (names the variable)."""


def expand_hostlist(nodelist: str, scontrol: str = "scontrol") -> list[str]:
    """`gpu[001-003],big7` -> its host names, as `scontrol show hostnames` prints them."""
    try:
        out = subprocess.run([scontrol, "show", "hostnames", nodelist], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise AllocationError(f"cannot expand SLURM_JOB_NODELIST={nodelist!r}: `{scontrol} show hostnames` "
                              f"failed ({e}); is this a SLURM node?") from e
    hosts = out.stdout.split()
    if out.returncode or not hosts:
        raise AllocationError(f"`{scontrol} show hostnames {nodelist}` exited {out.returncode}: "
                              f"{out.stderr.strip() or 'no hosts'}")
    return hosts


def gpus_per_node(env: dict, settings: ClusterSettings) -> int:
    """Ranks per node: NPR_GPUS_PER_NODE, else SLURM_GPUS_ON_NODE, else SLURM_GPUS_PER_NODE
    (`8`, `h100:8` or `gpu:h100:8`)."""
    if settings.gpus_per_node:
        return settings.gpus_per_node
    for name in ("SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE"):
        value = env.get(name, "").strip()
        if value:
            match = re.fullmatch(r"(?:[\w-]+:)*(\d+)", value)
            if not match or int(match.group(1)) < 1:
                raise AllocationError(f"{name}={value!r}: expected a GPU count such as 8 or h100:8")
            return int(match.group(1))
    raise AllocationError("cannot tell how many GPUs each node has: submit with #SBATCH --gpus-per-node=G "
                          "(sets SLURM_GPUS_ON_NODE) or set NPR_GPUS_PER_NODE")


@dataclass
class Allocation:
    job_id: str
    job_name: str
    hosts: list[str]
    gpus_per_node: int
    restart_count: int = 0
    gpus_from_slurm: bool = False  # the job holds GPUs (steps ask for them), not a CPU job told NPR_GPUS_PER_NODE

    @classmethod
    def from_env(cls, env: dict, settings: ClusterSettings, scontrol: str = "scontrol") -> Allocation:
        """The batch job's allocation; refuses a missing or inconsistent SLURM environment."""
        missing = [k for k in ("SLURM_JOB_ID", "SLURM_JOB_NODELIST") if not env.get(k)]
        if missing:
            raise AllocationError(f"{' and '.join(missing)} not set: `npr launch` runs inside an allocation "
                                  "(sbatch slurm/...sh, or salloc); use --dry-run --nodes N --gpus-per-node G "
                                  "to see the plan elsewhere")
        hosts = expand_hostlist(env["SLURM_JOB_NODELIST"], scontrol)
        expected = env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES")
        if expected and int(expected) != len(hosts):
            raise AllocationError(f"SLURM_JOB_NUM_NODES={expected} but SLURM_JOB_NODELIST="
                                  f"{env['SLURM_JOB_NODELIST']!r} names {len(hosts)} hosts")
        if not env["SLURM_JOB_ID"].isdigit():
            raise AllocationError(f"SLURM_JOB_ID={env['SLURM_JOB_ID']!r} is not a job number")
        return cls(env["SLURM_JOB_ID"], env.get("SLURM_JOB_NAME") or "npr", hosts, gpus_per_node(env, settings),
                   int(env.get("SLURM_RESTART_COUNT") or 0),
                   gpus_from_slurm=bool(env.get("SLURM_GPUS_ON_NODE") or env.get("SLURM_GPUS_PER_NODE")))

    @classmethod
    def planned(cls, nodes: int, gpus: int, job_name: str = "plan") -> Allocation:
        """A hypothetical allocation (`--dry-run` outside SLURM): hosts node1..nodeN, job id 0."""
        if nodes < 1 or gpus < 1:
            raise AllocationError(f"--nodes {nodes} --gpus-per-node {gpus}: both must be >= 1")
        return cls("0", job_name, [f"node{i + 1}" for i in range(nodes)], gpus)

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nodes * self.gpus_per_node

    @property
    def master_addr(self) -> str:
        return self.hosts[0]

    def master_port(self, settings: ClusterSettings) -> int:
        """NPR_MASTER_PORT, else derived from the job id (two jobs sharing a first node differ,
        and the port stays below the usual ephemeral range)."""
        return settings.master_port or 15000 + 2 * (int(self.job_id) % 7500)

    def engine_port(self, settings: ClusterSettings) -> int:
        return self.master_port(settings) + 1

    @property
    def log_name(self) -> str:
        return f"{self.job_name}-{self.job_id}"


def srun_command(settings: ClusterSettings, *, nodes: int, tasks_per_node: int, output: str,
                 kill_on_bad_exit: bool, command: list[str], gpus_per_node: int | None = None) -> list[str]:
    """One srun step. `--overlap`: the engine step and the training step share the nodes' GPUs;
    `--gpus-per-node` without a per-task binding: every task sees all of its node's GPUs and
    picks LOCAL_RANK's (an engine with tp G uses them all)."""
    prefix = ["srun", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}", f"--ntasks={nodes * tasks_per_node}",
              f"--kill-on-bad-exit={int(kill_on_bad_exit)}", "--overlap", "--label", f"--output={output}",
              "--open-mode=append", *([f"--gpus-per-node={gpus_per_node}"] if gpus_per_node else []),
              *settings.srun_args]
    if settings.node_setup:  # sourced on each node before the rank's Python starts
        command = ["bash", "-c", 'source "$0" && exec "$@"', settings.node_setup, *command]
    return [*prefix, *command]


def engine_layout(engines: int, nodes: int) -> tuple[int, int]:
    """(nodes, engines per node) of the engine step: the engines spread evenly over the nodes."""
    if engines % nodes == 0:
        return nodes, engines // nodes
    if engines < nodes:
        return engines, 1
    raise AllocationError(f"rollout.engines={engines} cannot spread evenly over {nodes} nodes: use a multiple "
                          f"of {nodes}, or at most {nodes}")
