"""Process groups for Megatron-Core, and the shim that lets it run on CPU (gloo).

Megatron-Core 0.16 hard-codes CUDA in many places: buffers allocated on
`torch.cuda.current_device()`, literal `device="cuda"` in schedules and optimizers, the CUDA RNG
API in its tensor-parallel RNG tracker. `install_cpu_shim()` redirects those to the CPU. It does
nothing when CUDA is available, so the same code and tests run unchanged on GPUs.
"""
from __future__ import annotations

import os
import socket

import torch

_SHIM_ACTIVE = False
_DEVICE_MODE = None


class _CudaDevicesToCpu(torch.overrides.TorchFunctionMode):
    """Maps `device="cuda"`, `.to("cuda")` and `.cuda()` to the CPU; reports CPU tensors as
    `torch.cuda.*Tensor` to the optimizer's type assertions."""

    @staticmethod
    def _cpu(device):
        if isinstance(device, int) or (isinstance(device, str) and device.startswith("cuda")):
            return "cpu"
        if isinstance(device, torch.device) and device.type == "cuda":
            return torch.device("cpu")
        return device

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func is torch.Tensor.cuda:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            name = func(*args)
            return name if ".cuda." in name else name.replace("torch.", "torch.cuda.", 1)
        if "device" in kwargs:
            kwargs["device"] = self._cpu(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1 and isinstance(args[1], (str, torch.device, int)):
            args = (args[0], self._cpu(args[1]), *args[2:])
        return func(*args, **kwargs)


def install_cpu_shim() -> bool:
    """Make Megatron-Core usable on a CPU-only torch (idempotent). Returns True if active."""
    global _SHIM_ACTIVE
    if torch.cuda.is_available():
        return False
    if _SHIM_ACTIVE:
        push_cpu_device_mode()
        return True
    from megatron.core.tensor_parallel import random as mp_random

    torch.cuda.current_device = lambda: "cpu"
    # torch.manual_seed calls torch.cuda.manual_seed_all, so only the narrower hooks are patched
    torch.cuda.manual_seed = lambda seed: torch.default_generator.manual_seed(int(seed))
    torch.cuda.get_rng_state = lambda device="cuda": torch.get_rng_state()
    torch.cuda.set_rng_state = lambda state, device="cuda": torch.set_rng_state(state)
    torch.cuda.synchronize = lambda device=None: None
    mp_random._get_cuda_rng_state = lambda device="cuda", clone=False, graph_safe=False: torch.get_rng_state()
    mp_random._set_cuda_rng_state = lambda state, device=-1, graph_safe=False: torch.set_rng_state(state)
    _SHIM_ACTIVE = True
    push_cpu_device_mode()
    return True


def push_cpu_device_mode() -> None:
    """Map literal CUDA devices to the CPU on this thread until `pop_cpu_device_mode`."""
    global _DEVICE_MODE
    if _SHIM_ACTIVE and _DEVICE_MODE is None:
        _DEVICE_MODE = _CudaDevicesToCpu()
        _DEVICE_MODE.__enter__()


def pop_cpu_device_mode() -> None:
    """Undo `push_cpu_device_mode` (e.g. after in-process tests, so later code runs at full speed)."""
    global _DEVICE_MODE
    if _DEVICE_MODE is not None:
        _DEVICE_MODE.__exit__(None, None, None)
        _DEVICE_MODE = None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(tp: int = 1, pp: int = 1, seed: int = 1234) -> None:
    """torch.distributed (NCCL with GPUs, else gloo) plus Megatron's TP/PP/DP groups. Works under
    torchrun/srun (env vars set) and in a plain single process (world of one)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    install_cpu_shim()
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if "TORCHELASTIC_RUN_ID" in os.environ:  # torchrun: its agent made the rendezvous store
            dist.init_process_group(backend, timeout=collective_timeout())
        elif "RANK" in os.environ:  # srun tasks (`npr launch`), or any launcher that sets the env://
            rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            dist.init_process_group(backend, store=rendezvous_store(rank, world), rank=rank, world_size=world,
                                    timeout=collective_timeout())
        else:  # a world of one, rendezvous passed directly: child processes inherit no RANK/MASTER_PORT
            dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    world = dist.get_world_size()
    if world % (tp * pp):
        raise ValueError(f"world size {world} is not a multiple of tp*pp = {tp}*{pp}")
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)


def _seconds(key: str, default: float) -> float:
    value = os.environ.get(key, "")
    try:
        seconds = float(value) if value.strip() else default
    except ValueError:
        raise ValueError(f"{key}={value!r} is not a number of seconds") from None
    if seconds <= 0:
        raise ValueError(f"{key}={value!r} must be > 0")
    return seconds


def collective_timeout():
    """NPR_COLLECTIVE_TIMEOUT_S (default 7200 s): how long a collective may wait. Long because RL
    ranks wait in a broadcast while rank 0 generates a whole batch of rollouts."""
    from datetime import timedelta
    return timedelta(seconds=_seconds("NPR_COLLECTIVE_TIMEOUT_S", 7200.0))


def rendezvous_store(rank: int, world: int):
    """The env:// rendezvous (MASTER_ADDR:MASTER_PORT, rank 0 serves it), bounded by
    NPR_RENDEZVOUS_TIMEOUT_S (default 600 s): a rank that cannot reach the master, or a master that
    does not see every rank, raises RendezvousError naming this host, the address and the ranks."""
    from datetime import timedelta

    import torch.distributed as dist

    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    if not addr or not port.isdigit():
        raise RendezvousError(f"rank {rank}: MASTER_ADDR={addr!r} and MASTER_PORT={port!r} must name the "
                              "master's host and port (set by `npr launch`, torchrun or your launcher)")
    timeout_s = _seconds("NPR_RENDEZVOUS_TIMEOUT_S", 600.0)
    try:
        return dist.TCPStore(addr, int(port), world, is_master=rank == 0, timeout=timedelta(seconds=timeout_s),
                             wait_for_workers=True)
    except Exception as e:  # noqa: BLE001 - re-raised with the address
        what = (f"rank 0 serves the rendezvous at {addr}:{port} but not all {world} ranks arrived"
                if rank == 0 else f"rank {rank} could not reach the master {addr}:{port}")
        raise RendezvousError(f"{what} within {timeout_s:.0f} s (this host: {socket.gethostname()}; "
                              f"NPR_RENDEZVOUS_TIMEOUT_S sets the limit): {str(e).splitlines()[0]}") from e


def destroy_distributed() -> None:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    ps.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


class RendezvousError(RuntimeError):
    """A rank could not join a process group: the message names the address it tried."""


def init_weight_group(master_address: str, master_port: int, world_size: int, rank: int,
                      group_name: str = "weight_update_group", backend: str = "gloo",
                      timeout_s: float = 300.0):
    """A process group of its own (TCP rendezvous at master_address:master_port), outside any
    default group the process may have: the trainer is rank 0, engine ranks rank_offset + tp_rank,
    as SGLang's `init_weights_update_group` builds its side. A rank that cannot reach the master
    within `timeout_s` raises with the address it tried. (torch has no public way to build a
    group beside the default one; SGLang's side uses the same helper, so both are built alike.)"""
    from datetime import timedelta

    import torch.distributed as dist
    from torch.distributed.distributed_c10d import PrefixStore, _new_process_group_helper, _world

    timeout = timedelta(seconds=timeout_s)
    try:
        store = dist.TCPStore(master_address, master_port, world_size, is_master=rank == 0, timeout=timeout)
    except Exception as e:  # noqa: BLE001 - re-raised with the address
        raise RendezvousError(f"weight group {group_name!r}: rank {rank} could not reach "
                              f"{master_address}:{master_port} within {timeout_s:.0f} s ({e})") from e
    group, _ = _new_process_group_helper(world_size, rank, [], backend, PrefixStore(group_name, store),
                                         group_name=group_name, timeout=timeout)
    _world.pg_group_ranks[group] = {i: i for i in range(world_size)}
    return group
