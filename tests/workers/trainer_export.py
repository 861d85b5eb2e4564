"""MegatronTrainer on 4 CPU ranks (gloo), launched by tests/test_trainer.py with torchrun:

    torchrun --nproc_per_node 4 trainer_export.py --untied D1 --tied D2 --out DIR

Global rank 0 writes what `hf_tensors` gathered to DIR/<name>.safetensors and the bucket layout
(names and bytes per bucket) to DIR/buckets.json; the last rank writes DIR/metrics.json.

    tp2pp2_start   TP2 x PP2, right after loading D1 (equals D1 bitwise)
    tp2pp2_trained after one step with a custom loss; the checkpoint of that step is DIR/ckpt
    tp2pp2_broken  the same, after swapping layer 2's linear_proj TP shards and nudging one
                   element of layer 0's fc1 on TP rank 1 (the negative control)
    tp2, pp2       TP2 x DP2 and PP2 x DP2 from D1;  tied_tp2pp2  TP2 x PP2 from D2 (tied embeddings)
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
from safetensors.torch import save_file  # noqa: E402

from megatron_npr.distributed import destroy_distributed  # noqa: E402
from megatron_npr.sections import ModelSection, OptimSection, ParallelSection  # noqa: E402
from megatron_npr.training.trainer import MegatronTrainer, token_nll_loss  # noqa: E402
from model_fixtures import npr_batch  # noqa: E402

BUCKET_BYTES = 48 * 1024  # several buckets even for this tiny model


def build(hf_dir, tp, pp, out):
    ps.destroy_model_parallel()  # a new layout on the same ranks
    return MegatronTrainer.build(ModelSection(hf_dir, dtype="fp32"), ParallelSection(tp, pp),
                                 OptimSection(lr=1e-2, min_lr=1e-3, weight_decay=0.0), total_steps=2, seed=0,
                                 checkpoint_dir=os.path.join(out, "ckpt"))


def export(trainer, name, out, layout):
    buckets = list(trainer.hf_tensors(BUCKET_BYTES))
    if dist.get_rank() == 0:
        save_file({n: t.contiguous() for bucket in buckets for n, t in bucket}, os.path.join(out, f"{name}.safetensors"))
        layout[name] = [[(n, t.numel() * t.element_size()) for n, t in bucket] for bucket in buckets]
    else:
        assert not buckets, "only global rank 0 gets tensors"


def loss_with_counts(batch, logprobs):
    """SFT's loss plus a second metric: the mean number of target tokens per microbatch."""
    nll, count, metrics = token_nll_loss(batch, logprobs)
    return nll, count, {**metrics, "tokens_per_microbatch": torch.stack([count.float(), torch.tensor(1.0)])}


def local_param(trainer, suffix):
    return dict(trainer.module.named_parameters())[suffix]


def break_weights(trainer):
    """Swap layer 2's linear_proj shards between the TP ranks of stage 1 (its local layer 0);
    nudge the first element of layer 0's fc1 on TP rank 1 of stage 0 (gate row ffn/2 in HF)."""
    stage, tp_rank = ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank()
    with torch.no_grad():
        if stage == 1:
            proj = local_param(trainer, "decoder.layers.0.self_attention.linear_proj.weight")
            shards = [torch.empty_like(proj) for _ in range(2)]
            dist.all_gather(shards, proj.detach().clone(), group=ps.get_tensor_model_parallel_group())
            proj.copy_(shards[1 - tp_rank])
        elif tp_rank == 1:
            fc1 = local_param(trainer, "decoder.layers.0.mlp.linear_fc1.weight")
            fc1[0, 0] = torch.nextafter(fc1[0, 0], torch.tensor(float("inf")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--untied", required=True)
    ap.add_argument("--tied", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    layout = {}

    trainer = build(args.untied, 2, 2, args.out)
    export(trainer, "tp2pp2_start", args.out, layout)
    batches = [npr_batch(seed=1), npr_batch(seed=2)]
    logprobs = trainer.logprobs(batches)
    metrics = trainer.step(batches, loss_with_counts)
    trainer.save(1, {"step": 1, "note": "train_state round trip"})
    export(trainer, "tp2pp2_trained", args.out, layout)
    train_state = trainer.resume()  # the checkpoint just written, loaded back
    break_weights(trainer)
    export(trainer, "tp2pp2_broken", args.out, layout)
    if dist.get_rank() == dist.get_world_size() - 1:  # last stage: the log-probs are here
        assert len(logprobs) == 2 and logprobs[0].shape == (2, 96)
        valid = [b.targets()[1] for b in batches]
        nll = sum(-(lp * v).sum().double() for lp, v in zip(logprobs, valid))
        count = sum(int(v.sum()) for v in valid)
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump({"step": metrics, "logprobs_loss": (nll / count).item(), "counts": [int(v.sum()) for v in valid],
                       "train_state": train_state}, f)
    elif ps.is_pipeline_first_stage():
        assert logprobs == [], "log-probs exist on the last pipeline stage only"

    for name, hf_dir, tp, pp in [("tp2", args.untied, 2, 1), ("pp2", args.untied, 1, 2),
                                 ("tied_tp2pp2", args.tied, 2, 2)]:
        del trainer
        trainer = build(hf_dir, tp, pp, args.out)
        export(trainer, name, args.out, layout)
    if dist.get_rank() == 0:
        with open(os.path.join(args.out, "buckets.json"), "w") as f:
            json.dump(layout, f)
    dist.barrier()
    destroy_distributed()


if __name__ == "__main__":
    main()
