"""Multi-rank checks, launched by tests/test_model_parallel.py with torchrun (gloo, CPU).

    torchrun --nproc_per_node N parallel_model.py --hf-dir D --tp T --pp P --out F [--sgd-step]

Writes one JSON object to F: max |Megatron - HF| of logits on an NPR batch at this TP/PP, and with
--sgd-step the loss and full updated weights of one SGD step (saved beside F) at TP=T and then
at TP=1 (data parallel) from the same weights.
"""
import argparse
import faulthandler
import json
import os
import sys
import warnings

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
faulthandler.dump_traceback_later(600, exit=True)  # a hang becomes a failure

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from megatron.core import parallel_state as ps  # noqa: E402
from megatron.core.pipeline_parallel import get_forward_backward_func  # noqa: E402
from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region  # noqa: E402

from megatron_npr.checkpoint import open_hf_weights, read_hf_config  # noqa: E402
from megatron_npr.checkpoint.mapping import local_to_global_name, unshard_tp  # noqa: E402
from megatron_npr.checkpoint.megatron_io import is_weight_name, load_hf_into_model  # noqa: E402
from megatron_npr.distributed import destroy_distributed, init_distributed  # noqa: E402
from megatron_npr.models import build_model, forward_logits, token_logprobs, transformer_config_from_hf  # noqa: E402
from model_fixtures import hf_reference_logits, npr_batch  # noqa: E402


def build(hf_dir, hf_cfg, tp, pp):
    model = build_model(transformer_config_from_hf(hf_cfg, tp=tp, pp=pp, dtype=torch.float32))
    with open_hf_weights(hf_dir) as weights:
        load_hf_into_model(model, weights, hf_cfg)
    return model


def run_schedule(model, batch, step, forward_only):
    return get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([batch]), model=[model], num_microbatches=1,
        seq_length=batch.tokens.shape[1], micro_batch_size=batch.tokens.shape[0], forward_only=forward_only,
        collect_non_loss_data=forward_only)


def logits_parity(hf_dir, hf_cfg, tp, pp):
    model = build(hf_dir, hf_cfg, tp, pp).eval()
    batch = npr_batch()

    def step(it, m):
        return forward_logits(m, next(it)), lambda out, non_loss_data=False: out

    with torch.no_grad():
        res = run_schedule(model, batch, step, forward_only=True)
    if not ps.is_pipeline_last_stage():
        return None
    logits = gather_from_tensor_model_parallel_region(res[0])
    from transformers import Qwen3ForCausalLM
    hf = Qwen3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    return (logits - hf_reference_logits(hf, batch)).abs().max().item()


def full_weights(model, hf_cfg):
    """Every parameter unsharded over TP, by global name (pp=1)."""
    tp_group = ps.get_tensor_model_parallel_group()
    out = {}
    for name, p in model.state_dict().items():
        if not is_weight_name(name):
            continue
        shards = [torch.empty_like(p) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(shards, p.contiguous(), group=tp_group)
        gname = local_to_global_name(name, 0, hf_cfg["num_hidden_layers"], 1)
        out[gname] = unshard_tp(gname, shards)  # replicated tensors must agree across ranks
    return out


def sgd_step(hf_dir, hf_cfg, tp):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model = build(hf_dir, hf_cfg, tp, 1)
    before = full_weights(model, hf_cfg)
    config = model.config
    model = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="sgd", lr=0.5, sgd_momentum=0.0, weight_decay=0.0,
                                                 clip_grad=1.0, params_dtype=torch.float32), [model])
    batch = npr_batch()

    def step(it, m):
        b = next(it)
        valid = b.targets()[1]

        def loss_func(logprobs):
            loss = -(logprobs * valid).sum() / valid.sum()
            return loss, {"loss": loss.detach()}

        return token_logprobs(m, b), loss_func

    model.zero_grad_buffer()
    opt.zero_grad()
    losses = run_schedule(model, batch, step, forward_only=False)
    _, grad_norm, _ = opt.step()
    after = full_weights(model.module, hf_cfg)
    moved = max((after[k] - before[k]).abs().max().item() for k in after)
    return losses[0]["loss"].item(), grad_norm, after, moved


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hf-dir", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--pp", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sgd-step", action="store_true")
    args = ap.parse_args()
    hf_cfg = read_hf_config(args.hf_dir)
    init_distributed(args.tp, args.pp)
    result = {"tp": args.tp, "pp": args.pp, "logits_max_diff": logits_parity(args.hf_dir, hf_cfg, args.tp, args.pp)}
    if args.sgd_step:
        for tp in (args.tp, 1):  # the second run is TP=1 with data parallelism over the same ranks
            ps.destroy_model_parallel()
            ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=1)
            loss, grad_norm, weights, moved = sgd_step(args.hf_dir, hf_cfg, tp)
            result[f"sgd_tp{tp}"] = {"loss": loss, "grad_norm": grad_norm, "max_update": moved}
            if dist.get_rank() == 0:
                torch.save(weights, f"{args.out}.tp{tp}.pt")
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result["logits_max_diff"])
    result["logits_max_diff"] = max(d for d in gathered if d is not None)
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
