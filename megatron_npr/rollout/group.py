"""`EngineGroup`: rollout engines on their own ranks, driven from the trainer's rank 0.

The trainer's global rank 0 is rank 0 of two groups built beside its default one
(`distributed.init_weight_group`, TCP rendezvous, gloo for control):

- the control group (rank 0 + one rank per engine): pickled messages over point-to-point
  send/recv, every reply awaited with a timeout, so an engine that died or hangs is named and
  the RL step fails (the run resumes from its last checkpoint) instead of hanging;
- the weight group (rank 0 + every engine TP rank, `rank_offset + tp_rank`): SGLang 0.5.21's
  `update_weights_from_distributed` wire (`weight_transport`), NCCL on GPUs, gloo on CPU. A
  torch engine rank receives itself; an SGLang engine's scheduler processes join it.

Requests are spread over engines in contiguous shares of the prompt list, each prompt with its
own seed, and come back in prompt order: the same seeds give the same rollouts whatever the number
of engines. Engines are started by rank 0 (`launch="spawn"`, one process each, on this node) or
by the job's launcher (`launch="external"`: each runs `serve_engine` and connects to rank 0).
An engine rank is anything with the RolloutBackend methods; `join_weight_group` and
`receive_weights` come from the backend itself (SGLang) or from `TorchEngineMember`.
"""
from __future__ import annotations

import logging
import os
import pickle
import socket
import time
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from ..distributed import init_weight_group
from .weight_transport import WeightMeta, broadcast_bucket, describe, receive_bucket

log = logging.getLogger(__name__)
IDLE_WAIT_S = 7 * 24 * 3600.0  # an engine waits this long for its next request (training runs between)


class EngineGroupError(RuntimeError):
    """An engine rank failed, died or did not answer in time; the message names it."""


# ---------------------------------------------------------------- messages
def send_message(obj, dst: int, group, timeout_s: float) -> None:
    payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
    for t in (torch.tensor([payload.numel()], dtype=torch.long), payload):
        dist.isend(t, dst=dst, group=group).wait(timedelta(seconds=timeout_s))


def recv_message(src: int, group, timeout_s: float):
    size = torch.empty(1, dtype=torch.long)
    dist.irecv(size, src=src, group=group).wait(timedelta(seconds=timeout_s))
    payload = torch.empty(int(size), dtype=torch.uint8)
    dist.irecv(payload, src=src, group=group).wait(timedelta(seconds=timeout_s))
    return pickle.loads(payload.numpy().tobytes())


def _ensure_default_group() -> None:
    """The group helper needs a default group; in a process without one, a size-1 one will do."""
    if not dist.is_initialized():
        dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def contiguous_shares(count: int, parts: int) -> list[range]:
    """`count` items in `parts` contiguous, near-equal ranges (in order)."""
    return [range(k * count // parts, (k + 1) * count // parts) for k in range(parts)]


# ---------------------------------------------------------------- the trainer's side
class EngineGroup:
    """A RolloutBackend whose engines run on other ranks (see the module doc)."""

    def __init__(self, control, weights, engines: list[dict], *, flattened: bool, timeout_s: float,
                 generate_timeout_s: float, processes=(), weight_group_name: str):
        self.control, self.weights, self.engines = control, weights, engines
        self.flattened, self.timeout_s, self.generate_timeout_s = flattened, timeout_s, generate_timeout_s
        self.processes, self.weight_group_name = list(processes), weight_group_name
        self.broken: str | None = None  # why the channel is out of step (an engine died or hung)

    @classmethod
    def start(cls, make_engine=None, *, engines: int, host: str = "127.0.0.1", port: int = 0, launch: str = "spawn",
              weight_backend: str = "gloo", flattened: bool = True, timeout_s: float = 600.0,
              generate_timeout_s: float = 3600.0) -> EngineGroup:
        """Rank 0's side: start (or wait for) `engines` engine ranks, build both groups."""
        from ..distributed import free_port

        _ensure_default_group()
        port = port or free_port()
        processes = []
        if launch == "spawn":
            import multiprocessing as mp
            ctx = mp.get_context("spawn")
            processes = [ctx.Process(target=serve_engine, args=(make_engine, host, port, k + 1, engines + 1, timeout_s),
                                     name=f"npr-engine-{k + 1}", daemon=True) for k in range(engines)]
            for p in processes:
                p.start()
        elif launch != "external":
            raise ValueError(f"rollout.launch must be spawn or external, got {launch!r}")
        try:
            control = _while_alive(processes, timeout_s, init_weight_group, host, port, engines + 1, 0,
                                   f"npr_control_{port}", "gloo", timeout_s)
            hello = [recv_message(k + 1, control, timeout_s) for k in range(engines)]
            weight_port = free_port()
            weight_name = f"npr_weights_{weight_port}"  # a group name can be created once per process
            world, offset = 1 + sum(h["tp_size"] for h in hello), 1
            for k, h in enumerate(hello):
                send_message(("join_weight_group", (host, weight_port, offset, world, weight_name, weight_backend),
                              {}), k + 1, control, timeout_s)
                h["rank_offset"], offset = offset, offset + h["tp_size"]
            weights = _while_alive(processes, timeout_s, init_weight_group, host, weight_port, world, 0, weight_name,
                                   weight_backend, timeout_s)
            group = cls(control, weights, hello, flattened=flattened, timeout_s=timeout_s,
                        generate_timeout_s=generate_timeout_s, processes=processes, weight_group_name=weight_name)
            group._replies("join_weight_group", range(engines), timeout_s)
        except Exception as e:
            for p in processes:
                p.kill()
            raise EngineGroupError(f"rollout group at {host}:{port} ({engines} engines, launch={launch}) did not "
                                   f"start: {e}") from e
        log.info("rollout group: %d engines (%s)", engines, ", ".join(cls._name(h) for h in hello))
        return group

    # ---------------------------------------------------------------- RolloutBackend
    def generate(self, prompts, params, *, seeds=None):
        if seeds is None:  # per-prompt seeds make the result independent of the shares
            from ..seeding import stream_seed
            seeds = [stream_seed(params.seed, i) for i in range(len(prompts))]
        shares = [s for s in contiguous_shares(len(prompts), len(self.engines)) if len(s)]
        busy = []
        for k, share in enumerate(shares):
            self._send(k, "generate", ([prompts[i] for i in share], params), {"seeds": [seeds[i] for i in share]})
            busy.append(k)
        return [r for part in self._replies("generate", busy, self.generate_timeout_s) for r in part]

    def update_weights(self, named_tensors) -> int:
        bucket = list(named_tensors)
        metas = describe(bucket)
        self._broadcast("receive_weights", (metas, self.flattened, self.weight_group_name))
        try:
            broadcast_bucket(bucket, metas, self.weights, flattened=self.flattened)
        except Exception as e:
            raise EngineGroupError(f"weight broadcast of {len(bucket)} tensors to the rollout group failed: {e}") from e
        for k, loaded in enumerate(self._replies("receive_weights", range(len(self.engines)))):
            if loaded != len(bucket):
                raise EngineGroupError(f"{self._name(self.engines[k])} loaded {loaded} of {len(bucket)} tensors")
        return len(bucket)

    def begin_weight_update(self) -> None:
        self._all("begin_weight_update", ())

    def end_weight_update(self, version: int) -> None:
        self._all("end_weight_update", (version,))

    def release_memory(self, tags=None) -> None:
        self._all("release_memory", (tags,))

    def resume_memory(self, tags=None) -> None:
        self._all("resume_memory", (tags,))

    def close(self) -> None:
        for k in range(len(self.engines)):
            try:
                self._send(k, "stop", ())
            except Exception:  # noqa: BLE001 - an engine that is already gone needs no stop
                pass
        for p in self.processes:
            p.join(timeout=30)
            if p.is_alive():
                p.kill()
        for group in (self.control, self.weights):
            dist.destroy_process_group(group)

    # ---------------------------------------------------------------- messages to engines
    def _all(self, command: str, args: tuple) -> list:
        self._broadcast(command, args)
        return self._replies(command, range(len(self.engines)))

    def _broadcast(self, command: str, args: tuple) -> None:
        for k in range(len(self.engines)):
            self._send(k, command, args)

    def _send(self, k: int, command: str, args: tuple, kwargs: dict | None = None) -> None:
        try:
            send_message((command, args, kwargs or {}), k + 1, self.control, self.timeout_s)
        except Exception as e:
            self.broken = f"{self._name(self.engines[k])} did not take {command!r}: {self._why(k, e)}"
            raise EngineGroupError(self.broken) from e

    def _replies(self, command: str, engines, timeout_s: float | None = None) -> list:
        """Each engine's answer to `command`, in order, within `timeout_s` of now. An engine that
        raised is reported after the others have answered (the channel stays in step); one that
        died or hung leaves the group unusable."""
        if self.broken:
            raise EngineGroupError(f"the rollout group is unusable after an earlier failure: {self.broken}")
        timeout_s = timeout_s or self.timeout_s
        deadline, out, errors = time.monotonic() + timeout_s, [], []
        for k in engines:
            try:
                status, value = recv_message(k + 1, self.control, max(deadline - time.monotonic(), 1.0))
            except Exception as e:
                self.broken = (f"{self._name(self.engines[k])} did not answer {command!r} within {timeout_s:.0f} s: "
                               f"{self._why(k, e)}")
                raise EngineGroupError(self.broken) from e
            if status != "ok":
                errors.append(f"{self._name(self.engines[k])} failed in {command!r}:\n{value}")
            out.append(value)
        if errors:
            raise EngineGroupError("\n".join(errors))
        return out

    def _why(self, k: int, error: Exception) -> str:
        if k < len(self.processes) and not self.processes[k].is_alive():
            return f"its process exited with code {self.processes[k].exitcode}"
        return f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"

    @staticmethod
    def _name(hello: dict) -> str:
        return f"engine rank {hello['rank']} ({hello['backend']} on {hello['host']}, pid {hello['pid']})"


def _while_alive(processes, timeout_s: float, fn, *args):
    """fn(*args) (a rendezvous), abandoned as soon as one of the spawned engine `processes` exits:
    an engine that fails while starting is named at once, not after the rendezvous timeout."""
    import threading

    result: dict = {}
    def call():
        try:
            result["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised in the caller's thread
            result["error"] = e
    thread = threading.Thread(target=call, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout_s + 5
    while thread.is_alive() and time.monotonic() < deadline:
        thread.join(0.2)
        dead = [p for p in processes if not p.is_alive()]
        if dead and thread.is_alive():
            raise EngineGroupError(f"{dead[0].name} exited with code {dead[0].exitcode} before joining the group "
                                   "(its traceback is above)")
    if "error" in result:
        raise result["error"]
    if "value" not in result:
        raise EngineGroupError(f"rendezvous did not finish within {timeout_s:.0f} s")
    return result["value"]


# ---------------------------------------------------------------- an engine's side
class TorchEngineMember:
    """The weight-group side of an engine that receives in its own process (the torch engine)."""

    def __init__(self, engine):
        self.engine, self.group = engine, None

    def join_weight_group(self, master_address, master_port, rank_offset, world_size, group_name, backend):
        self.group = init_weight_group(master_address, master_port, world_size, rank_offset, group_name, backend)

    def receive_weights(self, metas: list[WeightMeta], flattened: bool, group_name: str) -> int:
        return self.engine.update_weights(receive_bucket(metas, self.group, flattened=flattened))


def serve_engine(make_engine, host: str, port: int, rank: int, world: int, timeout_s: float = 600.0) -> None:
    """An engine rank: build the engine, join rank 0's control group at host:port as `rank`, and
    answer requests until told to stop (or until rank 0 is gone)."""
    _ensure_default_group()
    engine = make_engine()
    member = engine if hasattr(engine, "receive_weights") else TorchEngineMember(engine)
    control = init_weight_group(host, port, world, rank, f"npr_control_{port}", "gloo", timeout_s)
    send_message({"rank": rank, "host": socket.gethostname(), "pid": os.getpid(), "backend": type(engine).__name__,
                  "tp_size": getattr(engine, "tp_size", 1)}, 0, control, timeout_s)
    while True:
        try:
            message = recv_message(0, control, IDLE_WAIT_S)
        except Exception:  # noqa: BLE001 - rank 0 is gone: nothing left to serve
            break
        command, args, kwargs = message
        if command == "stop":
            break
        try:
            target = member if command in ("join_weight_group", "receive_weights") else engine
            reply = ("ok", getattr(target, command)(*args, **kwargs))
        except Exception:  # noqa: BLE001 - reported to rank 0, which fails the step
            reply = ("error", traceback.format_exc())
        send_message(reply, 0, control, timeout_s)
    close = getattr(engine, "close", None)
    if close is not None:
        close()
