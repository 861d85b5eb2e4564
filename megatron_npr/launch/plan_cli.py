"""`npr plan CONFIG [key=value ...] --nodes N --gpus-per-node G`: the estimate of estimate.py,
printed as a table (or JSON). Exit 0: fits; 3: does not fit; 2: bad input (named key or path)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import yaml

EXIT_FITS, EXIT_BAD_INPUT, EXIT_DOES_NOT_FIT = 0, 2, 3


def add_plan_command(sub) -> argparse.ArgumentParser:
    """Register `plan` on an argparse subparsers object; the handler is `cmd_plan`."""
    from .estimate_model import PRESETS
    from .estimate_shape import GPUS

    p = sub.add_parser("plan", help="memory per GPU and time per step of an SFT or RL config, before running it")
    p.add_argument("config", help="an SFT (train:) or RL (rl:) YAML config")
    p.add_argument("overrides", nargs="*", help="key=value overrides, as for the stage itself")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--gpus-per-node", type=int, required=True)
    p.add_argument("--gpu", default="h100", choices=sorted(GPUS))
    p.add_argument("--model", default=None, help=f"model dims: a folder with config.json, or {', '.join(PRESETS)} "
                                                 "(default: model.hf_dir)")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilisation assumed for training")
    p.add_argument("--json", action="store_true", help="print the estimate as one JSON object")
    p.set_defaults(func=cmd_plan)
    return p


def load_any_config(path: str, overrides: list[str]):
    """An SFTConfig or RLConfig, told apart by the top-level `train:` / `rl:` section."""
    from ..config import ConfigError, load_config

    try:
        data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    keys = set(data) if isinstance(data, dict) else set()
    keys |= {o.partition("=")[0].split(".")[0] for o in overrides}
    if "rl" in keys and "train" not in keys:
        from ..rl.config import RLConfig
        return load_config(RLConfig, path, overrides)
    if "train" in keys and "rl" not in keys:
        from ..training.sft_config import SFTConfig
        return load_config(SFTConfig, path, overrides)
    raise ConfigError(f"{path}: needs exactly one of the top-level sections 'train' (SFT) or 'rl' (RL)")


def cmd_plan(args) -> int:
    from ..config import ConfigError
    from .estimate import PlanInputError, estimate, resolve_model_config

    try:
        cfg = load_any_config(args.config, list(args.overrides))
        est = estimate(cfg, args.nodes, args.gpus_per_node, gpu=args.gpu,
                       model_config=resolve_model_config(cfg, args.model), mfu=args.mfu)
    except (ConfigError, PlanInputError) as e:
        print(f"npr plan: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    if args.json:
        print(json.dumps(est.to_json(), indent=2))
    else:
        print("\n".join(est.lines()))
    return EXIT_FITS if est.fits else EXIT_DOES_NOT_FIT


def main(argv: list[str] | None = None) -> int:
    """`python -m megatron_npr.launch.plan_cli ...` (the same as `npr plan ...`)."""
    parser = argparse.ArgumentParser(prog="npr")
    add_plan_command(parser.add_subparsers(dest="command", required=True))
    args, extra = parser.parse_known_args(["plan", *(sys.argv[1:] if argv is None else argv)])
    from ..cli import take_trailing_overrides
    take_trailing_overrides(parser, args, extra)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
