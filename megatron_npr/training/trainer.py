"""The Megatron-Core side of every stage that updates the model (SFT now, RL next): parallel state,
model, distributed optimizer, lr schedule, checkpoints and HF export, behind one object.

    dp_rank, dp_size = init_parallel(cfg.parallel, seed)     # before the data: the loader needs dp
    trainer = MegatronTrainer.build(cfg.model, cfg.parallel, cfg.optim, total_steps, seed, ckpt_dir)
    train_state = trainer.resume()                           # None, or what the newest save was given
    metrics = trainer.step(microbatches, loss_fn)            # one optimizer step
    logprobs = trainer.logprobs(microbatches)                # forward only, last pipeline stage
    trainer.save(step, train_state, tokenizer)
    for bucket in trainer.hf_tensors(): ...                  # the whole model, HF names, on rank 0
    trainer.export_hf(out_dir, tokenizer)                    # the same, written as an HF folder
    trainer.broadcast_weights(group)                         # the same, to rollout engines (SGLang's wire)

Loss functions follow Megatron's per-token contract (`calculate_per_token_loss=True`):
`loss_fn(batch, logprobs) -> (loss_sum, token_count, {name: [sum, count]})`. Megatron divides the
gradients by the token count of the whole global batch (every DP rank and microbatch), so packing
and gradient accumulation never change the objective; each metric is reported as sum / count over
the global batch. `token_nll_loss` is SFT's.
"""
from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist
from torch import Tensor

from ..sections import ModelSection, OptimSection, ParallelSection, torch_dtype
from .checkpointing import clean_partial_checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint

if TYPE_CHECKING:
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.models.gpt import GPTModel
    from megatron.core.optimizer import MegatronOptimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    from ..models import NPRBatch

log = logging.getLogger(__name__)

LossFn = Callable[["NPRBatch", Tensor], tuple[Tensor, Tensor, dict[str, Tensor]]]


def token_nll_loss(batch: NPRBatch, logprobs: Tensor) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
    """SFT: the negative log-likelihood of the batch's target tokens, summed; reported as `loss`."""
    _, valid = batch.targets()
    nll = -(logprobs * valid).sum()
    count = valid.sum().to(torch.int)
    return nll, count, {"loss": torch.stack([nll.detach(), count.float()])}


def init_parallel(parallel: ParallelSection, seed: int) -> tuple[int, int]:
    """torch.distributed and Megatron's TP/PP/DP groups (kept when they already exist at this
    layout), and the torch seed. Returns (dp_rank, dp_size): this rank's share of a global batch."""
    from megatron.core import parallel_state as ps

    from ..distributed import init_distributed, push_cpu_device_mode

    if not ps.model_parallel_is_initialized():
        init_distributed(parallel.tp, parallel.pp, seed)
    else:
        push_cpu_device_mode()
        have = (ps.get_tensor_model_parallel_world_size(), ps.get_pipeline_model_parallel_world_size())
        if have != (parallel.tp, parallel.pp):
            raise ValueError(f"parallel state is already tp={have[0]} pp={have[1]}, config asks tp={parallel.tp} "
                             f"pp={parallel.pp}")
        torch.manual_seed(seed)
    return ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()


def _build_model(model: ModelSection, parallel: ParallelSection, hf_config: dict,
                 dtype: torch.dtype) -> DistributedDataParallel:
    """This rank's stage of the model with the HF weights, wrapped for the distributed optimizer."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    from ..checkpoint import open_hf_weights
    from ..checkpoint.megatron_io import load_hf_into_model
    from ..models import build_model, transformer_config_from_hf

    config = transformer_config_from_hf(hf_config, tp=parallel.tp, pp=parallel.pp, dtype=dtype,
                                        attention_backend=model.attention_backend, recompute=parallel.recompute)
    config.calculate_per_token_loss = True  # token-mean over the global batch, see module docstring
    gpt = build_model(config)
    with open_hf_weights(model.hf_dir) as weights:
        load_hf_into_model(gpt, weights, hf_config)
    return DistributedDataParallel(config, DistributedDataParallelConfig(
        use_distributed_optimizer=True, grad_reduce_in_fp32=True), gpt)


def _build_optimizer(model: DistributedDataParallel, o: OptimSection, dtype: torch.dtype,
                     total_steps: int) -> tuple[MegatronOptimizer, OptimizerParamScheduler]:
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    optimizer = get_megatron_optimizer(OptimizerConfig(
        optimizer="adam", lr=o.lr, min_lr=o.min_lr, weight_decay=o.weight_decay, adam_beta1=o.beta1,
        adam_beta2=o.beta2, adam_eps=o.eps, clip_grad=o.clip_grad, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, params_dtype=dtype, use_distributed_optimizer=True), [model])
    warmup = min(o.warmup_steps, max(total_steps - 1, 0))
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if warmup else o.lr, max_lr=o.lr, min_lr=o.min_lr, lr_warmup_steps=warmup,
        lr_decay_steps=max(total_steps, 1), lr_decay_style=o.schedule, start_wd=o.weight_decay,
        end_wd=o.weight_decay, wd_incr_steps=max(total_steps, 1), wd_incr_style="constant")
    return optimizer, scheduler


def _loss_forward(loss_fn: LossFn):
    """Megatron's forward_step_func: this stage's output, and the loss of the last stage."""
    from ..models import token_logprobs

    def forward_step(data_iterator, model):
        batch = _on_model_device(next(data_iterator), model)
        return token_logprobs(model, batch), partial(loss_fn, batch)

    return forward_step


def _logprobs_forward(data_iterator, model):
    from ..models import token_logprobs

    batch = _on_model_device(next(data_iterator), model)
    return token_logprobs(model, batch), lambda output, non_loss_data=True: output.detach()


def _on_model_device(batch: NPRBatch, model) -> NPRBatch:
    """Loaders build batches on the CPU; the model may live on a GPU."""
    return batch.to(next(model.parameters()).device)


@dataclass
class MegatronTrainer:
    model: DistributedDataParallel  # this rank's pipeline stage and TP shard
    optimizer: MegatronOptimizer
    scheduler: OptimizerParamScheduler
    hf_config: dict  # config.json of the model the weights came from (saved with every checkpoint)
    checkpoint_dir: Path
    keep_last: int = 2

    @classmethod
    def build(cls, model: ModelSection, parallel: ParallelSection, optim: OptimSection, total_steps: int,
              seed: int, checkpoint_dir: str | Path, keep_last: int = 2) -> MegatronTrainer:
        """Collective: parallel state (see init_parallel), the model from `model.hf_dir`, Adam with
        the lr schedule over `total_steps`. Nothing is resumed yet: call `resume()`."""
        from ..checkpoint import read_hf_config

        init_parallel(parallel, seed)
        hf_config = read_hf_config(model.hf_dir)
        dtype = torch_dtype(model.dtype)
        ddp = _build_model(model, parallel, hf_config, dtype)
        optimizer, scheduler = _build_optimizer(ddp, optim, dtype, total_steps)
        return cls(ddp, optimizer, scheduler, hf_config, Path(checkpoint_dir), keep_last)

    @property
    def module(self) -> GPTModel:
        return self.model.module

    # ---------------------------------------------------------------- compute
    def step(self, microbatches: Sequence[NPRBatch], loss_fn: LossFn = token_nll_loss) -> dict:
        """One optimizer step over this rank's microbatches of a global batch. Returns, on every
        rank: each metric of `loss_fn` (sum / count over the global batch), then lr, grad_norm,
        skipped (the optimizer refused the step: non-finite gradients) and step_time_s."""
        started = time.perf_counter()
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        outputs = self._schedule(microbatches, _loss_forward(loss_fn), forward_only=False)
        ok, grad_norm, _ = self.optimizer.step()
        self.scheduler.step(increment=1)
        metrics = _reduce_metrics(outputs)
        return {**metrics, "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm or 0.0),
                "skipped": not ok, "step_time_s": time.perf_counter() - started}

    def logprobs(self, microbatches: Sequence[NPRBatch]) -> list[Tensor]:
        """log p(next token) [b, s] (fp32) of each microbatch, without gradients, on the last
        pipeline stage (every TP rank); an empty list on the other stages. Use `batch.targets()`
        for where a next token counts. The model has no dropout: these are the training forward's."""
        with torch.no_grad():
            return self._schedule(microbatches, _logprobs_forward, forward_only=True)

    def _schedule(self, microbatches: Sequence[NPRBatch], forward_step, forward_only: bool) -> list:
        from megatron.core.pipeline_parallel import get_forward_backward_func

        first = microbatches[0]
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(microbatches), model=[self.model],
            num_microbatches=len(microbatches), seq_length=first.tokens.shape[1],
            micro_batch_size=first.tokens.shape[0], forward_only=forward_only, collect_non_loss_data=forward_only)

    # ---------------------------------------------------------------- checkpoints and export
    def save(self, step: int, train_state: dict, tokenizer=None) -> Path:
        """Collective: checkpoint_dir/step_XXXXXXXX with model, optimizer, schedule, RNG and
        `train_state` (JSON-able: step, loader state, config, ...); keeps the newest `keep_last`."""
        return save_checkpoint(self.checkpoint_dir, step, self.module, self.optimizer, self.scheduler, train_state,
                               self.hf_config, tokenizer=tokenizer, keep_last=self.keep_last)

    def resume(self) -> dict | None:
        """Collective: restore the newest complete checkpoint (removing half-written ones) and
        return the train_state saved with it; None when there is none."""
        clean_partial_checkpoints(self.checkpoint_dir)
        path = latest_checkpoint(self.checkpoint_dir)
        if path is None:
            return None
        train_state = load_checkpoint(path, self.module, self.optimizer, self.scheduler)
        log.info("resumed from %s", path)
        return train_state

    def hf_tensors(self, bucket_bytes: int = 512 * 2**20) -> Iterator[list[tuple[str, Tensor]]]:
        """Collective, every rank must run it to the end: the whole model as HF-named tensors in
        lists of at most `bucket_bytes` (one larger tensor alone), gathered in process over TP and
        PP. The lists come out on global rank 0 only; other ranks get none. Bitwise the weights."""
        from ..checkpoint.megatron_io import hf_buckets

        return hf_buckets(self.module, self.hf_config, bucket_bytes)

    def broadcast_weights(self, group, *, flattened: bool = True, bucket_bytes: int = 512 * 2**20) -> int:
        """Collective over the trainer's ranks: the whole model as HF-named buckets to the rollout
        engines of `group` (a `rollout.weight_transport.init_weight_group`, in SGLang's
        `update_weights_from_distributed` format), sent by global rank 0, its rank 0; the other
        trainer ranks pass `group=None` and only take part in the gather. Returns tensors sent."""
        from ..rollout.weight_transport import send_weights

        buckets = self.hf_tensors(bucket_bytes)
        if dist.get_rank() != 0:
            for _ in buckets:  # yields nothing here, but runs this rank's part of the gather
                pass
            return 0
        if group is None:
            raise ValueError("broadcast_weights: global rank 0 sends, so it needs the weight group")
        return send_weights(buckets, group, flattened=flattened)

    def export_hf(self, out_dir: str | Path, tokenizer=None) -> Path:
        """Collective: the model as an HF folder (weights, config.json, `tokenizer`), gathered in
        process on any TP/PP layout; global rank 0 writes it atomically."""
        from ..checkpoint import write_hf_weights
        from ..io import atomic_output_dir

        out = Path(out_dir)
        tensors = (pair for bucket in self.hf_tensors() for pair in bucket)
        if dist.get_rank() == 0:
            with atomic_output_dir(out) as tmp:
                write_hf_weights(tmp, tensors)
                (tmp / "config.json").write_text(json.dumps(self.hf_config, indent=2) + "\n")
                if tokenizer is not None:
                    tokenizer.save_pretrained(tmp)
        else:
            for _ in tensors:  # yields nothing here, but runs this rank's part of the gather
                pass
        dist.barrier()
        return out


def _reduce_metrics(outputs: list[dict[str, Tensor]]) -> dict[str, float]:
    """sum / count of each [sum, count] metric over every microbatch and rank. Only the last
    pipeline stage has outputs, so the names come from the last rank and the other stages add
    zeros; TP copies scale a sum and its count alike."""
    names = [list(outputs[0]) if outputs else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(names, src=dist.get_world_size() - 1)
    names = names[0]
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    totals = torch.zeros(len(names), 2, dtype=torch.float64, device=device)  # NCCL reduces GPU tensors only
    for out in outputs:
        totals += torch.stack([out[name].double().to(device) for name in names])
    if dist.get_world_size() > 1:
        dist.all_reduce(totals)
    return {name: (totals[k, 0] / totals[k, 1].clamp(min=1)).item() for k, name in enumerate(names)}
