"""Packed parallel SFT (stage 2): NPR trajectories packed into rows, the branch mask and shared
positions per document, Megatron-Core model + distributed optimizer, resumable to the step.

    run = setup_sft(cfg)
    for step in range(run.step, run.total_steps):
        metrics = train_step(run, run.loader.next_step())    # forward/backward over microbatches
        log, save every N steps
    save, loss plot, optional HF export

Loss: token-mean over the whole global batch (every DP rank and microbatch), via Megatron's
per-token loss mode, so packing and gradient accumulation never change the objective.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist

from ..config import config_to_dict
from .checkpointing import clean_partial_checkpoints, crash_point, latest_checkpoint, load_checkpoint, save_checkpoint
from .sft_config import SFTConfig

log = logging.getLogger(__name__)


@dataclass
class SFTRun:
    cfg: SFTConfig
    model: object  # DDP-wrapped GPTModel (this rank's stage)
    optimizer: object
    scheduler: object
    loader: object
    hf_config: dict
    tokenizer: object
    total_steps: int
    step: int = 0
    out_dir: Path = Path(".")
    history: list[dict] = field(default_factory=list)
    drop_summary: dict = field(default_factory=dict)


def _dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[name]


def _ensure_distributed(cfg: SFTConfig) -> None:
    from megatron.core import parallel_state as ps

    from ..distributed import init_distributed, push_cpu_device_mode

    if not ps.model_parallel_is_initialized():
        init_distributed(cfg.parallel.tp, cfg.parallel.pp, cfg.train.seed)
        return
    push_cpu_device_mode()
    have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
    if have != (cfg.parallel.tp, cfg.parallel.pp):
        raise ValueError(f"parallel state is already tp={have[0]} pp={have[1]}, config asks tp={cfg.parallel.tp} "
                         f"pp={cfg.parallel.pp}")
    torch.manual_seed(cfg.train.seed)


def _build_model_and_optimizer(cfg: SFTConfig, hf_config: dict, total_steps: int):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ..checkpoint import open_hf_weights
    from ..checkpoint.megatron_io import load_hf_into_model
    from ..models import build_model, transformer_config_from_hf

    dtype = _dtype(cfg.model.dtype)
    config = transformer_config_from_hf(hf_config, tp=cfg.parallel.tp, pp=cfg.parallel.pp, dtype=dtype,
                                        attention_backend=cfg.model.attention_backend)
    config.calculate_per_token_loss = True  # token-mean over the global batch, see module docstring
    model = build_model(config)
    with open_hf_weights(cfg.model.hf_dir) as weights:
        load_hf_into_model(model, weights, hf_config)
    model = DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True), model)
    o = cfg.optim
    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16,
        params_dtype=dtype, use_distributed_optimizer=True), [model])
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, 1), lr_decay_style=o.schedule, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")
    return model, optimizer, scheduler


def setup_sft(cfg: SFTConfig) -> SFTRun:
    """Distributed state, data, model, optimizer; resumes from the newest checkpoint in out_dir."""
    from megatron.core import parallel_state as ps

    from ..checkpoint import read_hf_config
    from ..data.prompts import instruction_text
    from ..data.tokenizer import load_tokenizer, tokenizer_dir_for
    from .loader import PackedLoader
    from .sft_data import load_sft_samples

    _ensure_distributed(cfg)
    out_dir = Path(cfg.train.out_dir)
    tokenizer, tags = load_tokenizer(tokenizer_dir_for(cfg.model.hf_dir, cfg.model.tokenizer))
    hf_config = read_hf_config(cfg.model.hf_dir)
    if max(tags.ids) >= hf_config["vocab_size"]:
        raise ValueError(f"{cfg.model.hf_dir}: vocab_size {hf_config['vocab_size']} has no rows for the NPR tags "
                         f"{tags.ids}; convert it with `tools/convert_hf.py hf-to-mcore --add-npr-tokens`")
    samples, drops = load_sft_samples(cfg.data.path, tokenizer, tags, max_depth=cfg.data.max_depth,
                                      max_tokens=cfg.data.max_tokens,
                                      instruction=instruction_text(cfg.data.instruction))
    if not samples:
        raise ValueError(f"{cfg.data.path}: no usable SFT samples ({drops.summary()})")
    dp, dp_rank = ps.get_data_parallel_world_size(), ps.get_data_parallel_rank()
    rows = cfg.train.rows_per_step(cfg.data.max_tokens, dp)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    loader = PackedLoader(samples, cfg.data.max_tokens, rows, dp_rank=dp_rank, dp_size=dp,
                          micro_rows=cfg.train.micro_rows, seed=cfg.train.seed, pad_id=pad_id)
    total = cfg.train.steps or loader.steps_for_epochs(cfg.train.epochs)
    model, optimizer, scheduler = _build_model_and_optimizer(cfg, hf_config, total)
    run = SFTRun(cfg, model, optimizer, scheduler, loader, hf_config, tokenizer, total, out_dir=out_dir,
                 drop_summary=drops.to_json())
    ckpt_root = out_dir / "checkpoints"
    clean_partial_checkpoints(ckpt_root)
    resume = latest_checkpoint(ckpt_root)
    if resume is not None:
        state = load_checkpoint(resume, _unwrap(model), optimizer, scheduler)
        loader.load_state_dict(state["loader"])
        run.step = state["step"]
        log.info("resumed from %s at step %d", resume, run.step)
    run.history = _read_history(out_dir / "metrics.jsonl", run.step)
    return run


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


def _forward_step(data_iterator, model):
    from ..models import token_logprobs

    batch = next(data_iterator)
    _, valid = batch.targets()
    logprobs = token_logprobs(model, batch)

    def loss_func(output):
        nll = -(output * valid).sum()
        count = valid.sum().to(torch.int)
        return nll, count, {"nll_count": torch.stack([nll.detach(), count.float()])}

    return logprobs, loss_func


def train_step(run: SFTRun, step) -> dict:
    """One optimizer step over this rank's microbatches of a global step."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    started = time.perf_counter()
    run.model.zero_grad_buffer()
    run.optimizer.zero_grad()
    first = step.microbatches[0]
    outputs = get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(step.microbatches), model=[run.model],
        num_microbatches=len(step.microbatches), seq_length=first.tokens.shape[1],
        micro_batch_size=first.tokens.shape[0], forward_only=False)
    ok, grad_norm, _ = run.optimizer.step()
    run.scheduler.step(increment=1)
    totals = torch.zeros(2, dtype=torch.float64)
    for out in outputs:
        totals += out["nll_count"].double()
    if dist.is_initialized():  # non-last pipeline stages add zeros; TP copies scale both sums alike
        dist.all_reduce(totals)
    elapsed = time.perf_counter() - started
    return {"step": step.step + 1, "loss": (totals[0] / totals[1].clamp(min=1)).item(),
            "lr": run.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm or 0.0),
            "skipped": not ok, "loss_tokens": step.global_loss_tokens, "real_tokens": step.real_tokens,
            "packing_efficiency": step.real_tokens / step.capacity, "epoch": step.epoch,
            "tokens_per_s": step.real_tokens / elapsed, "step_time_s": elapsed}


def _read_history(path: Path, upto: int) -> list[dict]:
    """Metrics of steps <= upto from an earlier (possibly killed) run; later lines are dropped."""
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["step"] <= upto]


def _is_logger() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1  # last stage has the loss


def _save(run: SFTRun) -> Path:
    state = {"step": run.step, "loader": run.loader.state_dict(), "config": config_to_dict(run.cfg)}
    return save_checkpoint(run.out_dir / "checkpoints", run.step, _unwrap(run.model), run.optimizer, run.scheduler,
                           state, run.hf_config, tokenizer=run.tokenizer, keep_last=run.cfg.train.keep_last)


def run_sft(cfg: SFTConfig, progress: bool = True) -> dict:
    """The whole `npr sft`: train (resuming if possible), checkpoint, plot, export. Returns a summary."""
    from tqdm import tqdm

    from .run_log import MetricsLogger, plot_curves

    run = setup_sft(cfg)
    logger = MetricsLogger(run.out_dir, run.history, enabled=_is_logger())
    bar = tqdm(total=run.total_steps, initial=run.step, desc="sft", unit="step",
               disable=not (progress and _is_logger()), dynamic_ncols=True)
    while run.step < run.total_steps:
        metrics = train_step(run, run.loader.next_step())
        run.step = metrics["step"]
        logger.log(metrics)
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                        tok_s=f"{metrics['tokens_per_s']:.0f}", pack=f"{metrics['packing_efficiency']:.1%}")
        crash_point("after_step", run.step)
        every = cfg.train.save_every
        if every and run.step % every == 0 and run.step < run.total_steps:
            _save(run)
    bar.close()
    final = _save(run)
    logger.close()
    summary = {"steps": run.total_steps, "final_checkpoint": str(final), "dropped": run.drop_summary,
               "packing_efficiency": run.loader.packing_efficiency, "rows_per_epoch": run.loader.rows_per_epoch,
               "final_loss": logger.history[-1]["loss"] if logger.history else None}
    if _is_logger():
        plot_curves(logger.history, run.out_dir / "loss.png", title=f"SFT {Path(cfg.data.path).name}")
        (run.out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    if cfg.train.export_hf:
        summary["export_hf"] = str(export_hf(run, final, cfg.train.export_hf))
    return summary


def export_hf(run: SFTRun, checkpoint: Path, out_dir: str) -> Path:
    """HF folder of the trained model: in process when one rank holds all weights, else through
    the converter on rank 0 (a separate single-process job reading the final checkpoint)."""
    import subprocess
    import sys

    from megatron.core import parallel_state as ps

    from ..checkpoint import atomic_output_dir, write_hf_weights
    from ..checkpoint.megatron_io import export_hf_from_model

    out = Path(out_dir)
    whole = ps.get_tensor_model_parallel_world_size() == 1 and ps.get_pipeline_model_parallel_world_size() == 1
    if dist.get_rank() == 0:
        if whole:
            with atomic_output_dir(out) as tmp:
                write_hf_weights(tmp, export_hf_from_model(_unwrap(run.model), run.hf_config))
                (tmp / "config.json").write_text(json.dumps(run.hf_config, indent=2) + "\n")
                run.tokenizer.save_pretrained(tmp)
        else:
            code = "import sys; from megatron_npr.checkpoint.convert import mcore_to_hf; mcore_to_hf(*sys.argv[1:])"
            subprocess.run([sys.executable, "-c", code, str(checkpoint), str(out)], check=True)
    dist.barrier()
    return out
