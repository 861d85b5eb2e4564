"""Peak memory and throughput of `MegatronTrainer.step` on CPU ranks (or a GPU), next to `npr plan`'s estimate.

    python tools/measure_memory.py --hf-dir DIR [key=value ...] [--steps 3] [--microbatches 1]
    torchrun --nproc_per_node 2 tools/measure_memory.py --hf-dir DIR parallel.tp=2
    python tools/measure_memory.py --write-model cpu-large --out DIR     (a random HF model to measure)

Each rank prints one JSON line: peak memory above a baseline, the estimate for its pipeline stage
(`estimate(..., gpu="cpu", stage=...)`), step times and tokens/s.

Method. The baseline is this process's resident memory (VmRSS) after torch, Megatron and the
process groups are up, right before the trainer is built. After the build the kernel's high-water
mark is reset (`echo 5 > /proc/self/clear_refs`), the steps run, and the peak is VmHWM (exact,
kept by the kernel: no sampling gaps). Measured = VmHWM - baseline: weights, grads, optimizer
states, activations, batches and temporaries, which is what the estimate counts (the estimate
excludes the fixed process overhead, which is in the baseline). glibc's malloc would keep freed
heap memory resident, so the worker runs with MALLOC_MMAP_THRESHOLD_=131072 (re-executing itself
to set it): every tensor above 128 KiB is its own mapping and leaves the RSS when freed.
On a GPU the measurement is the caching allocator's peak of allocated bytes after the build
(`torch.cuda.max_memory_allocated`, reset after the build), against the estimate for an H100/H200
in the run's dtype (bf16 for `auto`); unvalidated until the first GPU run (tools/gpu_check.sh).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
MMAP_THRESHOLD = "131072"
MODELS = {  # random Qwen3 shapes for CPU measurements (vocab padded like write_random_qwen3)
    "tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=192, vocab_size=512, tie_word_embeddings=True),
    "cpu-large": dict(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=64, intermediate_size=1536, vocab_size=32768, tie_word_embeddings=True),
}


def write_model(kind: str, out: Path) -> Path:
    """A random HF Qwen3 folder of one of MODELS (no tokenizer: the worker feeds token ids)."""
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    model = Qwen3ForCausalLM(Qwen3Config(**MODELS[kind], max_position_embeddings=32768, torch_dtype="float32"))
    model.float().save_pretrained(out, safe_serialization=True)
    return out


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _config(args):
    from megatron_npr.config import load_config
    from megatron_npr.training.sft_config import SFTConfig

    base = [f"model.hf_dir={args.hf_dir}", "model.dtype=fp32", "data.path=unused.jsonl", "train.out_dir=unused"]
    return load_config(SFTConfig, None, [*base, *args.overrides])


def _batches(cfg, vocab: int, microbatches: int, seed: int):
    """Microbatches of `train.micro_rows` rows, each one canonical NPR trajectory of
    data.max_tokens tokens (the layout `npr plan` assumes), random token ids."""
    import dataclasses

    import torch

    from megatron_npr.launch.estimate_shape import CANONICAL, canonical_layout
    from megatron_npr.models import NPRBatch
    from megatron_npr.topology import PackedRow

    length = cfg.data.max_tokens
    shape = dataclasses.replace(CANONICAL, prompt_tokens=min(CANONICAL.prompt_tokens, length // 4))
    layout = canonical_layout(shape, length - shape.prompt_tokens)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(microbatches):
        rows = []
        for _ in range(cfg.train.micro_rows):
            tokens = torch.randint(0, vocab, (layout.num_tokens,), generator=g)
            loss = torch.arange(layout.num_tokens) >= shape.prompt_tokens
            rows.append(PackedRow(tokens, loss, layout, (0,), (0, layout.num_tokens)).pad_to(length, 0))
        out.append(NPRBatch.from_rows(rows, length=length, pad_id=0))
    return out


def _gpu_kind() -> str | None:
    """The estimate's GPU for this device: None on a CPU (then VmRSS / VmHWM are measured)."""
    import torch
    if not torch.cuda.is_available():
        return None
    return "h200" if "H200" in torch.cuda.get_device_name() else "h100"


def _used_kib(gpu: str | None, peak: bool = False) -> float:
    """On a GPU the caching allocator's live (or peak) bytes: tensors only, as the estimate counts."""
    import torch
    if gpu is None:
        return _status_kib("VmHWM" if peak else "VmRSS")
    return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 1024


def measure(args) -> dict:
    import gc

    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_npr.checkpoint import read_hf_config
    from megatron_npr.launch.estimate import estimate
    from megatron_npr.training.trainer import MegatronTrainer, init_parallel

    cfg = _config(args)
    init_parallel(cfg.parallel, seed=1)
    hf = read_hf_config(cfg.model.hf_dir)
    batches = _batches(cfg, hf["vocab_size"], args.microbatches, seed=ps.get_data_parallel_rank())
    gc.collect()
    dist.barrier()
    gpu = _gpu_kind()
    baseline = _used_kib(gpu)
    trainer = MegatronTrainer.build(cfg.model, cfg.parallel, cfg.optim, total_steps=args.steps, seed=1,
                                    checkpoint_dir=args.ckpt_dir)
    gc.collect()
    if gpu is None:
        _reset_peak()
    else:  # the build's own transients are not the steady state the estimate describes
        import torch
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        trainer.step(batches)
        times.append(time.perf_counter() - started)
    peak = _used_kib(gpu, peak=True)
    world, stage = dist.get_world_size(), ps.get_pipeline_model_parallel_rank()
    global_rows = args.microbatches * cfg.train.micro_rows * ps.get_data_parallel_world_size()
    est = estimate(_estimate_config(cfg, global_rows), 1, world, gpu=gpu or "cpu", model_config=hf, stage=stage)
    tokens = global_rows * cfg.data.max_tokens
    steady = times[1:] or times
    return {"rank": dist.get_rank(), "device": gpu or "cpu", "world": world, "tp": cfg.parallel.tp,
            "pp": cfg.parallel.pp,
            "dp": ps.get_data_parallel_world_size(), "stage": stage, "max_tokens": cfg.data.max_tokens,
            "micro_rows": cfg.train.micro_rows, "microbatches": args.microbatches,
            "recompute": cfg.parallel.recompute, "backend": cfg.model.attention_backend,
            "baseline_mib": baseline / 1024, "peak_mib": (peak - baseline) / 1024,
            "estimate_mib": est.total_gib * 1024, "estimate_components_mib":
                {k: round(v * 1024, 2) for k, v in est.memory_gib.items()},
            "step_s": times, "tokens_per_step": tokens, "tokens_per_s": tokens / statistics.median(steady)}


def _estimate_config(cfg, global_rows: int):
    """The measured run as `npr plan` sees it: a global batch of exactly these rows."""
    import dataclasses
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, global_batch_rows=global_rows))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("overrides", nargs="*", help="SFT config overrides: parallel.tp=2 data.max_tokens=512 ...")
    p.add_argument("--hf-dir")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--microbatches", type=int, default=1)
    p.add_argument("--ckpt-dir", default="/tmp/npr_measure_unused")
    p.add_argument("--write-model", choices=sorted(MODELS))
    p.add_argument("--out")
    p.add_argument("--results", help="also write each rank's JSON to RESULTS/rank_N.json (ranks' stdout interleaves)")
    args = p.parse_intermixed_args(argv)
    if args.write_model:
        print(write_model(args.write_model, Path(args.out)))
        return 0
    if os.environ.get("MALLOC_MMAP_THRESHOLD_") != MMAP_THRESHOLD:  # see the module docstring
        os.environ["MALLOC_MMAP_THRESHOLD_"] = MMAP_THRESHOLD
        os.execv(sys.executable, [sys.executable, *sys.argv])
    import warnings
    warnings.filterwarnings("ignore")
    result = measure(args)
    print(json.dumps(result), flush=True)
    if args.results:
        Path(args.results).mkdir(parents=True, exist_ok=True)
        Path(args.results, f"rank_{result['rank']}.json").write_text(json.dumps(result) + "\n")
    import torch.distributed as dist
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
