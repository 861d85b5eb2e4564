"""Packed parallel SFT (stage 2): NPR trajectories packed into rows, the branch mask and shared
positions per document, trained by `MegatronTrainer` (Megatron-Core, distributed optimizer),
resumable to the step.

    data = load_sft_data(cfg, *init_parallel(...))     # vocabulary, samples, PackedLoader
    trainer = MegatronTrainer.build(...); trainer.resume()
    while step < total: trainer.step(loader.next_step().microbatches); log; save every N steps
    final save, loss plot, summary.json, optional HF export (in process, on any TP/PP layout)

Loss: `token_nll_loss`, the token mean over the whole global batch (see trainer.py), so packing
and gradient accumulation never change the objective.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from ..config import config_to_dict
from ..data.tokenizer import NPRVocab
from ..io import write_json_atomic
from .checkpointing import crash_point, step_dir_name
from .loader import PackedLoader, Step
from .preemption import StopRequest
from .run_log import MetricsLogger, plot_curves, read_history
from .sft_config import SFTConfig
from .trainer import MegatronTrainer, init_parallel


@dataclass
class SFTData:
    vocab: NPRVocab
    loader: PackedLoader  # this DP rank's view of the packed rows
    dropped: dict  # DropStats.to_json() of the records left out


def load_sft_data(cfg: SFTConfig, dp_rank: int, dp_size: int) -> SFTData:
    from ..checkpoint import read_hf_config
    from ..data.prompts import instruction_text
    from ..data.tokenizer import load_vocab
    from .sft_data import load_sft_samples

    vocab = load_vocab(cfg.model.hf_dir, cfg.model.tokenizer)
    vocab.check_fits(read_hf_config(cfg.model.hf_dir)["vocab_size"], cfg.model.hf_dir)
    samples, drops = load_sft_samples(cfg.data.path, vocab, max_depth=cfg.data.max_depth,
                                      max_tokens=cfg.data.max_tokens,
                                      instruction=instruction_text(cfg.data.instruction))
    if not samples:
        raise ValueError(f"{cfg.data.path}: no usable SFT samples ({drops.summary()})")
    rows = cfg.train.rows_per_step(cfg.data.max_tokens, dp_size)
    loader = PackedLoader(samples, cfg.data.max_tokens, rows, dp_rank=dp_rank, dp_size=dp_size,
                          micro_rows=cfg.train.micro_rows, seed=cfg.train.seed, pad_id=vocab.pad_id)
    return SFTData(vocab, loader, drops.to_json())


def train_step(trainer: MegatronTrainer, batch: Step) -> dict:
    """One optimizer step on a loader step; the metrics line of metrics.jsonl."""
    out = trainer.step(batch.microbatches)  # loss, lr, grad_norm, skipped, step_time_s
    elapsed = out.pop("step_time_s")
    return {"step": batch.step + 1, **out, "loss_tokens": batch.global_loss_tokens,
            "real_tokens": batch.real_tokens, "packing_efficiency": batch.real_tokens / batch.capacity,
            "epoch": batch.epoch, "tokens_per_s": batch.real_tokens / elapsed, "step_time_s": elapsed}


def _is_logger() -> bool:
    return not dist.is_initialized() or dist.get_rank() == dist.get_world_size() - 1  # last stage has the loss


def run_sft(cfg: SFTConfig, progress: bool = True) -> dict:
    """The whole `npr sft`: train (resuming if possible), checkpoint, plot, export. Returns a summary."""
    from tqdm import tqdm

    out_dir = Path(cfg.train.out_dir)
    data = load_sft_data(cfg, *init_parallel(cfg.parallel, cfg.train.seed))
    loader = data.loader
    total = cfg.train.steps or loader.steps_for_epochs(cfg.train.epochs)
    trainer = MegatronTrainer.build(cfg.model, cfg.parallel, cfg.optim, total, cfg.train.seed,
                                    checkpoint_dir=out_dir / "checkpoints", keep_last=cfg.train.keep_last)

    def save(step: int) -> Path:
        state = {"step": step, "loader": loader.state_dict(), "config": config_to_dict(cfg)}
        return trainer.save(step, state, tokenizer=data.vocab.tokenizer)

    resumed = trainer.resume()
    step = resumed["step"] if resumed else 0
    if resumed:
        loader.load_state_dict(resumed["loader"])
    logger = MetricsLogger(out_dir, read_history(out_dir, step), enabled=_is_logger())
    bar = tqdm(total=total, initial=step, desc="sft", unit="step", disable=not (progress and _is_logger()),
               dynamic_ncols=True)
    with StopRequest.installed() as stop:  # a preemption signal: checkpoint at the end of the step, exit
        while step < total:
            metrics = train_step(trainer, loader.next_step())
            step = metrics["step"]
            logger.log(metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.4f}", lr=f"{metrics['lr']:.2e}",
                            tok_s=f"{metrics['tokens_per_s']:.0f}", pack=f"{metrics['packing_efficiency']:.1%}")
            crash_point("after_step", step)
            due = cfg.train.save_every and step % cfg.train.save_every == 0
            if due and step < total:
                save(step)
            if step < total and stop.agreed():  # every rank stops at this step
                path = trainer.checkpoint_dir / step_dir_name(step) if due else save(step)
                bar.close()
                logger.close()
                return {"preempted": True, "step": step, "steps": total, "checkpoint": str(path)}
    bar.close()
    final = save(step)
    logger.close()
    summary = {"steps": total, "final_checkpoint": str(final), "dropped": data.dropped,
               "packing_efficiency": loader.packing_efficiency, "rows_per_epoch": loader.rows_per_epoch,
               "final_loss": logger.history[-1]["loss"] if logger.history else None}
    if _is_logger():
        plot_curves(logger.history, out_dir / "loss.png", title=f"SFT {Path(cfg.data.path).name}")
        write_json_atomic(out_dir / "summary.json", summary, sort_keys=False)
    if cfg.train.export_hf:
        summary["export_hf"] = str(trainer.export_hf(cfg.train.export_hf, data.vocab.tokenizer))
    return summary
