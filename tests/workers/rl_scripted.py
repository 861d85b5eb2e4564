"""A tiny RL setup whose rewards are not trivial, for tests/test_rl_loop.py, and its worker entry.

A random tiny Qwen3 writes no valid NPR structure, so every DAPO reward would be the same format
penalty and every PAPO rollout would be dropped. `ScriptedSamples` wraps the real `NPREngine`:
sample k of every problem replays `scripts[problem][k]` (the engine still decodes and scores
every token, forks and joins in parallel mode); a short prefix then goes on sampling freely. So
each group holds the canonical solution (+1), a wrong answer (-1) and free samples (an invalid
format for DAPO, dropped by PAPO), while every log-prob still comes from the real engine.

    torchrun --nproc_per_node 2 rl_scripted.py CONFIG.yaml [key=value ...] [--skip-sync K]

runs `run_rl` with the scripted engine (built on rank 0 only, or on every engine rank with
`rollout.placement=split`); `--skip-sync K` makes the engine ignore its K-th weight update (the
negative control of the fidelity tests).
"""
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from megatron_npr.seeding import stream_seed  # noqa: E402

PROBLEMS = 6
FREE_PREFIXES = ("So", "Then")  # free samples start with one replayed token


def write_tiny_setup(root: Path, tokenizer) -> tuple[Path, Path]:
    """(hf_dir, problems.jsonl): a 1-layer random Qwen3 over the real tokenizer, and two-part sums."""
    from megatron_npr.checkpoint.tiny import TinyQwen3, write_random_qwen3
    from megatron_npr.data.synth import make_synth_dataset

    hf_dir = write_random_qwen3(root / "hf", tokenizer, TinyQwen3(hidden_size=32, num_hidden_layers=1, head_dim=8,
                                                                  intermediate_size=64, seed=3))
    data = root / "problems.jsonl"
    data.write_text("".join(json.dumps(p.to_json() | {"solution": s}) + "\n"
                            for p, s in make_synth_dataset(PROBLEMS, (2, 2), 1, seed=5)))
    return hf_dir, data


def rl_config(hf_dir, data, out_dir, algorithm="dapo", **rl) -> dict:
    return {"model": {"hf_dir": str(hf_dir), "dtype": "fp32"},
            "data": {"path": str(data), "source": "synth", "instruction": "none"},
            "optim": {"lr": 1e-2, "min_lr": 1e-3, "weight_decay": 0.0, "clip_grad": 1.0},
            "sampling": {"n": 3, "temperature": 1.0, "max_new_tokens": 80},
            "engine": {"kv_slots": 1 << 13, "dtype": "fp32"},
            "rl": {"out_dir": str(out_dir), "algorithm": algorithm, "steps": 3, "prompts_per_step": 2,
                   "max_tokens": 512, "seed": 7, "dump_rollouts": True, **rl}}


class ScriptedSamples:
    """The real engine, sample k of each prompt replaying scripts[prompt][k] (see the module doc)."""

    def __init__(self, engine, vocab, data_path: Path, skip_sync: int | None = None):
        self.engine, self.skip_sync, self.updates = engine, skip_sync, 0
        def encode(text):
            return vocab.tokenizer.encode(text, add_special_tokens=False)

        self.scripts = {}
        for line in Path(data_path).read_text().splitlines():
            record = json.loads(line)
            solution, answer = record["solution"], record["answer"]
            wrong = solution.replace(f"\\boxed{{{answer}}}", f"\\boxed{{{int(answer) + 1}}}")
            prompt = tuple(vocab.prompt_ids(record["question"], ""))
            self.scripts[prompt] = [encode(solution) + [vocab.end_of_turn_id], encode(wrong) + [vocab.end_of_turn_id],
                                    *[encode(p) for p in FREE_PREFIXES]]

    def generate(self, prompts, params, *, seeds):
        n = params.n
        replay = [self.scripts[tuple(p)][k] for p in prompts for k in range(n)]
        return self.engine.generate([list(p) for p in prompts for _ in range(n)], dataclasses.replace(params, n=1),
                                    replay=replay, seeds=[stream_seed(s, k) for s in seeds for k in range(n)])

    def update_weights(self, named_tensors):
        self.updates += 1
        if self.updates == self.skip_sync:  # the negative control: this bucket never reaches the engine,
            return len(list(named_tensors))  # though the engine says it does (the silent failure)
        return self.engine.update_weights(named_tensors)

    def __getattr__(self, name):  # the rest of the RolloutBackend (memory hooks, update session) is the engine's
        return getattr(self.engine, name)


def plain_engine(cfg, vocab):
    """The configured NPREngine, built with an already loaded vocabulary (loading one takes seconds)."""
    from megatron_npr.checkpoint import open_hf_weights, read_hf_config
    from megatron_npr.rollout import NPREngine

    e = cfg.engine.section(cfg.model)
    with open_hf_weights(e.hf_dir) as weights:
        return NPREngine(read_hf_config(e.hf_dir), weights, tags=vocab.tags, eos_ids=vocab.eos_ids,
                         label_ids=vocab.label_ids, kv_slots=e.kv_slots, dtype=e.torch_dtype, device=e.device)


def scripted_engine(cfg, vocab, skip_sync=None) -> ScriptedSamples:
    return ScriptedSamples(plain_engine(cfg, vocab), vocab, cfg.data.path, skip_sync)


class DiesAt(ScriptedSamples):
    """An engine rank whose process dies in its `die_at`-th generate call (a lost node)."""

    def generate(self, prompts, params, *, seeds):
        self.calls = getattr(self, "calls", 0) + 1
        if self.calls == self.die_at:
            os._exit(5)
        return super().generate(prompts, params, seeds=seeds)


def scripted_engine_of(cfg) -> ScriptedSamples:
    """`rollout.engine_factory: rl_scripted:scripted_engine_of` (with tests/workers on PYTHONPATH):
    the scripted engine wherever the config's engines run, e.g. in `npr launch`'s engine step."""
    return scripted_engine(cfg, cfg.model.vocab())


def scripted_engine_from_config(config_path: str, overrides: tuple = (), skip_sync=None,
                                die_at: int | None = None) -> ScriptedSamples:
    """The scripted engine of a config file: what a spawned engine rank builds (picklable as a
    functools.partial of this module-level function). With `die_at`, engine rank 2 dies there."""
    import multiprocessing

    from megatron_npr.config import load_config
    from megatron_npr.rl.config import RLConfig

    cfg = load_config(RLConfig, config_path, list(overrides))
    engine = scripted_engine(cfg, cfg.model.vocab(), skip_sync)
    if die_at and multiprocessing.current_process().name == "npr-engine-2":
        engine.__class__, engine.die_at = DiesAt, die_at
    return engine


def main(argv):
    import torch.distributed as dist

    from megatron_npr.config import load_config
    from megatron_npr.rl.config import RLConfig
    from megatron_npr.rl.loop import run_rl

    skip = die_at = None
    if "--skip-sync" in argv:
        k = argv.index("--skip-sync")
        skip, argv = int(argv[k + 1]), argv[:k] + argv[k + 2:]
    if "--engine-dies-at" in argv:
        k = argv.index("--engine-dies-at")
        die_at, argv = int(argv[k + 1]), argv[:k] + argv[k + 2:]
    cfg = load_config(RLConfig, argv[0], argv[1:])
    rank0 = int(os.environ.get("RANK", "0")) == 0
    vocab = cfg.model.vocab()
    if cfg.rollout.placement == "split":  # every engine rank builds its own scripted engine
        import functools
        factory = functools.partial(scripted_engine_from_config, argv[0], tuple(argv[1:]), skip, die_at)
        summary = run_rl(cfg, progress=False, engine_factory=factory, vocab=vocab)
    else:
        engine = scripted_engine(cfg, vocab, skip) if rank0 else None
        summary = run_rl(cfg, progress=False, engine=engine, vocab=vocab)
    if dist.is_initialized():
        dist.barrier()
    if rank0:
        print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
