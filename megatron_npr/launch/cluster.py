"""Cluster settings in one place: every knob a site may need, read from the environment with a
documented default (`SETTINGS`; the README's table is this list). `npr launch` resolves them once
on the batch host; the ranks inherit what they need through srun's environment.
"""
from __future__ import annotations

import shlex
from dataclasses import dataclass, field

from ..training.preemption import signal_name

# (variable, default, what it does): the README's "cluster settings" table
SETTINGS = (
    ("NPR_SOCKET_IFNAME", "", "network interface for NCCL's and Gloo's bootstrap sockets (NCCL_SOCKET_IFNAME, "
                             "GLOO_SOCKET_IFNAME), e.g. `ib0`; empty: the libraries choose"),
    ("NPR_IB_HCA", "", "InfiniBand HCAs for NCCL (NCCL_IB_HCA), e.g. `mlx5_0,mlx5_1`; empty: all"),
    ("NPR_RENDEZVOUS_TIMEOUT_S", "600", "a rank that cannot reach the master in this time exits naming the "
                                        "host and port it tried"),
    ("NPR_COLLECTIVE_TIMEOUT_S", "7200", "process-group timeout; long because RL ranks wait in a broadcast "
                                         "while rank 0 generates"),
    ("NPR_MASTER_PORT", "", "the rendezvous port; empty: 15000 + 2 * (job id mod 7500), the engines' port "
                            "one above it"),
    ("NPR_RUNS_DIR", "runs", "logs go to <runs>/<job name>-<job id>/ (plan, launcher log, one log per node)"),
    ("NPR_GPUS_PER_NODE", "", "ranks per node; empty: SLURM_GPUS_ON_NODE / SLURM_GPUS_PER_NODE"),
    ("NPR_SRUN_ARGS", "", "extra srun arguments for every step, e.g. a container: `--container-image=... "
                          "--container-mounts=/data:/data`"),
    ("NPR_NODE_SETUP", "", "a shell file sourced on each node before its ranks start (modules, venv, "
                           "NCCL tuning)"),
    ("NPR_PREEMPT_SIGNAL", "USR1", "the signal of `#SBATCH --signal=B:USR1@600`; ranks also stop on SIGTERM"),
    ("NPR_PYTHON", "", "the Python that runs the ranks; empty: the launcher's own"),
)


def setting(env: dict, name: str) -> str:
    defaults = {n: d for n, d, _ in SETTINGS}
    return env.get(name, defaults[name]).strip()


def _positive(env: dict, name: str) -> float:
    text = setting(env, name)
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if value <= 0:
        raise ValueError(f"{name}={text!r} must be > 0")
    return value


@dataclass
class ClusterSettings:
    socket_ifname: str = ""
    ib_hca: str = ""
    rendezvous_timeout_s: float = 600.0
    collective_timeout_s: float = 7200.0
    master_port: int | None = None
    runs_dir: str = "runs"
    gpus_per_node: int | None = None
    srun_args: list[str] = field(default_factory=list)
    node_setup: str = ""
    preempt_signal: str = "SIGUSR1"
    python: str = ""

    @classmethod
    def from_env(cls, env: dict) -> ClusterSettings:
        """The settings of `env` (os.environ); a malformed value is refused naming its variable."""
        port = setting(env, "NPR_MASTER_PORT")
        if port and not (port.isdigit() and 1024 <= int(port) < 65535):
            raise ValueError(f"NPR_MASTER_PORT={port!r} must be a port number in 1024..65534")
        gpus = setting(env, "NPR_GPUS_PER_NODE")
        if gpus and not (gpus.isdigit() and int(gpus) >= 1):
            raise ValueError(f"NPR_GPUS_PER_NODE={gpus!r} must be a positive integer")
        return cls(socket_ifname=setting(env, "NPR_SOCKET_IFNAME"), ib_hca=setting(env, "NPR_IB_HCA"),
                   rendezvous_timeout_s=_positive(env, "NPR_RENDEZVOUS_TIMEOUT_S"),
                   collective_timeout_s=_positive(env, "NPR_COLLECTIVE_TIMEOUT_S"),
                   master_port=int(port) if port else None, runs_dir=setting(env, "NPR_RUNS_DIR") or "runs",
                   gpus_per_node=int(gpus) if gpus else None,
                   srun_args=shlex.split(setting(env, "NPR_SRUN_ARGS")),
                   node_setup=setting(env, "NPR_NODE_SETUP"),
                   preempt_signal=signal_name(setting(env, "NPR_PREEMPT_SIGNAL")),
                   python=setting(env, "NPR_PYTHON"))

    def rank_env(self) -> dict[str, str]:
        """What every rank's environment gets (the libraries' own variable names)."""
        env = {"NPR_RENDEZVOUS_TIMEOUT_S": f"{self.rendezvous_timeout_s:g}",
               "NPR_COLLECTIVE_TIMEOUT_S": f"{self.collective_timeout_s:g}",
               "NPR_PREEMPT_SIGNAL": self.preempt_signal, "NPR_STOP_ON_SIGTERM": "1",
               "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "CUDA_DEVICE_MAX_CONNECTIONS": "1"}
        if self.socket_ifname:
            env |= {"NCCL_SOCKET_IFNAME": self.socket_ifname, "GLOO_SOCKET_IFNAME": self.socket_ifname}
        if self.ib_hca:
            env["NCCL_IB_HCA"] = self.ib_hca
        return env
