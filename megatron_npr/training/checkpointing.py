"""Resumable training checkpoints: model, optimizer, lr schedule, data-loader state and RNG.

Layout under `out_dir/checkpoints/`:

    step_00000010/      a Megatron dist checkpoint (model at top level, so `mcore_to_hf` and
                        `load_checkpoint_single` read it directly) + npr_checkpoint.json + tokenizer
    latest              the name of the newest complete checkpoint

Every rank writes into a hidden `.step_X.tmp` folder; only when all ranks are done does rank 0
rename it and then replace `latest` (both atomic), so a run killed at any moment leaves the last
good checkpoint untouched. Half-written folders are removed on the next start.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

from ..checkpoint.megatron_io import NPR_META, is_weight_name
from ..io import atomic_write_text

LATEST = "latest"
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def crash_point(point: str, step: int) -> None:
    """Tests kill a run at a chosen point with NPR_TEST_CRASH=point:step (exit without cleanup),
    or send it the preemption signal with NPR_TEST_SIGNAL=point:step[,point:step...]."""
    if os.environ.get("NPR_TEST_CRASH") == f"{point}:{step}":
        os._exit(17)
    if f"{point}:{step}" in os.environ.get("NPR_TEST_SIGNAL", "").split(","):
        import signal
        os.kill(os.getpid(), signal.SIGUSR1)


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None."""
    root = Path(root)
    pointer = root / LATEST
    if not pointer.is_file():
        return None
    name = pointer.read_text().strip()
    path = root / name
    if not _STEP_DIR.match(name) or not (path / NPR_META).is_file():
        raise RuntimeError(f"{pointer} names {name!r}, which is not a complete checkpoint; remove {pointer} "
                           "to start over, or point it at an existing step_* folder")
    return path


def latest_step(root: str | Path) -> int | None:
    """The step of the newest complete checkpoint under `root`, or None."""
    path = latest_checkpoint(root)
    return int(_STEP_DIR.match(path.name).group(1)) if path else None


def clean_partial_checkpoints(root: str | Path) -> None:
    """Remove folders left by a save that was killed (rank 0 only)."""
    root = Path(root)
    if _is_rank0() and root.is_dir():
        for p in root.glob(".step_*.tmp"):
            shutil.rmtree(p, ignore_errors=True)
    _barrier()


def _model_sharded(model) -> dict:
    # everything, TE extra state included, exactly as `save_dist_checkpoint` writes it, so that
    # `load_checkpoint_single` and the converter read a training checkpoint unchanged
    return dict(model.sharded_state_dict())


def _optim_metadata() -> dict:
    # the distributed optimizer's own buffers: parallel save and load, no gather (same TP/PP/DP on resume)
    return {"distrib_optim_sharding_type": "dp_reshardable"}


def save_checkpoint(root: str | Path, step: int, model, optimizer, scheduler, train_state: dict,
                    hf_config: dict, tokenizer=None, keep_last: int = 2) -> Path:
    """Collective. `model` is the unwrapped GPTModel; `train_state` is JSON-able (loader state, ...)."""
    from megatron.core import dist_checkpointing

    root = Path(root)
    final, tmp = root / step_dir_name(step), root / f".{step_dir_name(step)}.tmp"
    if _is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    model_sd = _model_sharded(model)
    state = dict(model_sd)
    _materialise_adam_state(optimizer)  # an optimizer that never stepped (e.g. every RL step skipped) saves too
    state["optimizer"] = optimizer.sharded_state_dict(model_sd, metadata=_optim_metadata())
    state["npr_train"] = {"scheduler": scheduler.state_dict(), "train_state": train_state,
                          "rng": torch.get_rng_state(), "adam_step": _adam_step(optimizer)}
    dist_checkpointing.save(state, str(tmp), content_metadata=_optim_metadata())
    _barrier()
    crash_point("during_save", step)
    if _is_rank0():
        (tmp / NPR_META).write_text(json.dumps({"hf_config": hf_config, "step": step}, indent=2))
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "train_state.json").write_text(json.dumps(train_state, indent=2))
        if final.exists():  # a re-run of the same step (e.g. after resume): replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST, final.name + "\n")
        _prune(root, keep_last)
    _barrier()
    return final


def _prune(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.iterdir() if _STEP_DIR.match(p.name))
    for p in steps[:-keep_last]:
        shutil.rmtree(p, ignore_errors=True)


def _materialise_adam_state(optimizer) -> None:
    """A fresh torch Adam has no per-parameter state until its first step, and without Apex/TE the
    distributed optimizer reads `step` from that state to describe what it will load. Empty
    entries of the right shapes are created here; loading overwrites every one of them."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state.update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))


def _adam_step(optimizer) -> float:
    steps = {float(st["step"]) for opt in getattr(optimizer, "chained_optimizers", [optimizer])
             for st in opt.optimizer.state.values() if "step" in st}
    if len(steps) > 1:
        raise RuntimeError(f"optimizer parameters disagree on the Adam step: {sorted(steps)}")
    return steps.pop() if steps else 0.0


def _restore_adam_steps(optimizer, step: float) -> None:
    """Without Apex/TE, Megatron's load does not bring back torch Adam's per-parameter `step`
    (it ends up 0, or one tensor shared by all parameters and incremented once per parameter).
    The step is saved explicitly and every parameter gets its own copy."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for state in opt.optimizer.state.values():
            state["step"] = torch.tensor(float(step))


def load_checkpoint(path: str | Path, model, optimizer, scheduler) -> dict:
    """Collective: restore model, optimizer, schedule and RNG; returns the saved train_state."""
    from megatron.core import dist_checkpointing

    _materialise_adam_state(optimizer)
    model_sd = _model_sharded(model)
    request = dict(model_sd)
    request["optimizer"] = optimizer.sharded_state_dict(model_sd, is_loading=True, metadata=_optim_metadata())
    request["npr_train"] = {"scheduler": None, "train_state": None, "rng": None, "adam_step": None}
    state = dist_checkpointing.load(request, str(path))
    extra, opt_state = state.pop("npr_train"), state.pop("optimizer")
    state.pop("content_metadata", None)  # dist_checkpointing hands back what save recorded
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [m for m in missing if is_weight_name(m)]
    if missing or unexpected:
        raise RuntimeError(f"{path}: checkpoint does not fit the model: missing {missing[:5]}, "
                           f"unexpected {list(unexpected)[:5]}")
    with torch.no_grad():  # it copies into views of the parameters
        optimizer.load_state_dict(opt_state)
    _restore_adam_steps(optimizer, extra["adam_step"])
    scheduler.load_state_dict(extra["scheduler"])
    torch.set_rng_state(extra["rng"])
    return extra["train_state"]
