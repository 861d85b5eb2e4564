"""Stopping a run cleanly when the cluster asks: a signal sets a flag, every rank agrees on it at
the end of a step, the run saves a checkpoint (atomically, `checkpointing.save_checkpoint`) and
exits with `PREEMPTED_EXIT`, which the launcher answers by requeueing the job; the requeued job
resumes from that checkpoint like any other restart.

    with StopRequest.installed() as stop:     # SIGUSR1 (SLURM's --signal), SIGTERM under `npr launch`
        while step < total:
            ...one step...
            if stop.agreed():                 # collective: the same answer on every rank
                save(step); return PREEMPTED

Signals only set a flag: nothing is interrupted mid-collective, so a second signal, or one during
the save, changes nothing (the save in progress finishes; if the process is killed during it,
the previous checkpoint is still the newest complete one).
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped at a checkpoint on request; run again to resume
MARKER_VARIABLE = "NPR_PREEMPT_MARKER"  # set by `npr launch`: the file a stopped run writes


def signal_name(name: str, key: str = "NPR_PREEMPT_SIGNAL") -> str:
    """`USR1` / `SIGUSR1` -> `SIGUSR1`; an unknown name is refused, naming `key`."""
    full = name.strip().upper()
    full = full if full.startswith("SIG") else f"SIG{full}"
    if not isinstance(getattr(signal, full, None), signal.Signals):
        raise ValueError(f"{key}={name!r} is not a signal name (e.g. USR1, USR2, TERM)")
    return full


def stop_signals() -> tuple[str, ...]:
    """NPR_PREEMPT_SIGNAL (default USR1), plus SIGTERM when NPR_STOP_ON_SIGTERM=1 (set for the
    ranks `npr launch` starts: SLURM's preemption sends SIGTERM). Elsewhere SIGTERM keeps its
    default action, so torchrun and test harnesses can still end a stuck rank with it."""
    names = [signal_name(os.environ.get("NPR_PREEMPT_SIGNAL", "USR1"))]
    if os.environ.get("NPR_STOP_ON_SIGTERM") == "1":
        names.append("SIGTERM")
    return tuple(dict.fromkeys(names))


_EARLY: list[str] = []  # stop signals that arrived before the training loop installed its handlers


def record_early_signals() -> None:
    """Called first thing in a launched rank: a stop signal during start-up (imports, model load)
    is remembered and honoured after the first step instead of killing the process."""
    for name in stop_signals():
        signal.signal(getattr(signal, name), lambda signum, frame: _EARLY.append(signal.Signals(signum).name))


class StopRequest:
    """A stop requested by a signal on any rank, agreed on by all ranks at step boundaries."""

    def __init__(self):
        self.received: list[str] = list(_EARLY)

    @classmethod
    @contextlib.contextmanager
    def installed(cls, names: tuple[str, ...] | None = None):
        """Handlers for `names` (default `stop_signals()`) while the block runs, the previous ones
        after it; outside the main thread (where Python cannot install handlers) a request that
        never fires."""
        stop, previous = cls(), {}
        if threading.current_thread() is threading.main_thread():
            for name in names or stop_signals():
                previous[name] = signal.signal(getattr(signal, name), stop._handle)
        try:
            yield stop
        finally:
            for name, handler in previous.items():
                signal.signal(getattr(signal, name), handler)

    def _handle(self, signum, frame) -> None:  # noqa: ARG002 - the signal module's signature
        name = signal.Signals(signum).name
        if not self.received:
            log.warning("%s received: the run stops after this step, at a checkpoint", name)
        self.received.append(name)

    @property
    def requested(self) -> bool:
        """Whether this rank received a stop signal."""
        return bool(self.received)

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a stop signal (a signal that
        reached only some ranks still stops all of them at the same step)."""
        if not (dist.is_initialized() and dist.get_world_size() > 1):
            return self.requested
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        flag = torch.tensor([1 if self.requested else 0], dtype=torch.int32, device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def preempted_exit(summary: dict) -> int:
    """The exit code of a run that stopped on request: PREEMPTED_EXIT, or, when `npr launch` set
    NPR_PREEMPT_MARKER, 0 (global rank 0 writes that file with the summary), so that srun does not
    take the stop for a failed rank and kill the others."""
    marker = os.environ.get(MARKER_VARIABLE)
    if not marker:
        return PREEMPTED_EXIT
    if os.environ.get("RANK", "0") == "0":
        from ..io import write_json_atomic
        write_json_atomic(marker, summary, sort_keys=False)
    return 0
