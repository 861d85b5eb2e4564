"""`npr sft`, `npr rl`, `npr engine`, `npr sample`, `npr eval` and `npr pipeline`: config file + key=value overrides."""
from __future__ import annotations

import json

from .cli import _fail


def _config(cls, args):
    from pathlib import Path

    from .config import load_config
    path, overrides = args.config, list(args.overrides)
    if path and "=" in path and not Path(path).exists():  # `npr pipeline key=value`: no file given
        path, overrides = None, [path, *overrides]
    return load_config(cls, path, overrides)


def _run(args, cls, body) -> int:
    """Load the config, run `body(cfg)`; bad configs and bad inputs exit 2 with one clear line."""
    from .config import ConfigError
    from .data.problems import ProblemFormatError
    from .distributed import RendezvousError
    from .io import OutputError

    try:
        cfg = _config(cls, args)
    except ConfigError as e:
        return _fail(str(e), 2)
    try:
        return body(cfg)
    except RendezvousError as e:  # an unreachable master: the address, not a hang or a traceback
        return _fail(str(e), 1)
    except (FileNotFoundError, OutputError, ProblemFormatError, ValueError) as e:  # bad inputs: one line
        return _fail(str(e), 2)


def _exit_code(summary: dict) -> int:
    """0, or for a run stopped at a checkpoint on a signal (run it again to resume) PREEMPTED_EXIT,
    or under `npr launch` 0 and the launcher's marker file (srun would take 75 for a failed rank)."""
    from .training.preemption import preempted_exit
    return preempted_exit(summary) if summary.get("preempted") else 0


def cmd_sft(args) -> int:
    from .training.sft import run_sft
    from .training.sft_config import SFTConfig

    def body(cfg):
        if args.export_hf:
            cfg.train.export_hf = args.export_hf
        summary = run_sft(cfg, progress=not args.quiet)
        print(json.dumps(summary, indent=2))
        return _exit_code(summary)
    return _run(args, SFTConfig, body)


def cmd_rl(args) -> int:
    from .rl.config import RLConfig
    from .rl.loop import run_rl

    def body(cfg):
        summary = run_rl(cfg, progress=not args.quiet)
        print(json.dumps(summary, indent=2))
        return _exit_code(summary)
    return _run(args, RLConfig, body)


def cmd_engine(args) -> int:
    from .rl.config import RLConfig
    from .rl.rollouts import engine_factory_of
    from .rollout.group import serve_engine

    def body(cfg):
        r = cfg.rollout
        if r.placement != "split" or r.launch != "external":
            return _fail("npr engine serves an RL run with rollout.placement=split and rollout.launch=external", 2)
        if not 1 <= args.rank <= r.engines:
            return _fail(f"--rank {args.rank}: engine ranks are 1..rollout.engines={r.engines}", 2)
        serve_engine(engine_factory_of(cfg), r.host, r.port, args.rank, r.engines + 1, r.timeout_s)
        return 0
    return _run(args, RLConfig, body)


def cmd_sample(args) -> int:
    from .training.rejection import RejectionConfig, run_rejection_sampling

    def body(cfg):
        stats = run_rejection_sampling(cfg, progress=not args.quiet)
        print(stats.table())
        return 0
    return _run(args, RejectionConfig, body)


def cmd_eval(args) -> int:
    from .eval.runner import EvalConfig, run_eval

    def body(cfg):
        print(run_eval(cfg).table())
        return 0
    return _run(args, EvalConfig, body)


def cmd_pipeline(args) -> int:
    from .pipeline.config import PipelineConfig
    from .pipeline.run import run_pipeline

    def body(cfg):
        import subprocess
        try:
            run_pipeline(cfg)
        except subprocess.CalledProcessError as e:
            return _fail(f"a pipeline stage failed: `{' '.join(map(str, e.cmd))}` exited {e.returncode} "
                         "(its output is above); re-run to resume from that stage")
        return 0
    return _run(args, PipelineConfig, body)


def add_commands(sub) -> None:
    specs = [("sft", cmd_sft, "packed parallel SFT on Megatron-Core (stage 2)", True),
             ("rl", cmd_rl, "RL on Megatron-Core: DAPO (stage 1) or PAPO (stage 3), resumable", True),
             ("engine", cmd_engine, "one rollout engine rank of an `npr rl` run (rollout.launch=external)", True),
             ("sample", cmd_sample, "rejection sampling with the engine (stage 2), resumable JSONL", True),
             ("eval", cmd_eval, "accuracy, format validity, trigger rate and speedup of a model", True),
             ("pipeline", cmd_pipeline, "the recipe end to end on a tiny model (default: built-in tiny config)", False)]
    for name, func, help_text, needs_config in specs:
        p = sub.add_parser(name, help=help_text)
        p.add_argument("config", nargs=None if needs_config else "?", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-6")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        if name == "engine":
            p.add_argument("--rank", type=int, required=True, help="this engine's rank in the rollout group (1..engines)")
        if name == "sft":
            p.add_argument("--export-hf", help="write an HF folder of the final model here")
        p.set_defaults(func=func)
