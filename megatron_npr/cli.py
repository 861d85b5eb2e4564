"""The `npr` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EXAMPLE_TRAJECTORY = Path(__file__).resolve().parent.parent / "examples" / "trajectory_math.txt"


def _fail(message: str, code: int = 1) -> int:
    print(f"npr: {message}", file=sys.stderr)
    return code


def cmd_inspect(args: argparse.Namespace) -> int:
    from .data.tokenizer import load_tokenizer
    from .report import analyse, describe, draw_mask, tokenize_trajectory
    from .topology import TopologyError

    path = Path(args.text_file) if args.text_file else EXAMPLE_TRAJECTORY
    if not args.text_file and not path.is_file():
        return _fail(f"the bundled example {path} is missing (installed without the examples/ "
                     "folder?); pass --text-file", 2)
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        return _fail(f"cannot read {path}: {e}", 2)
    try:
        tokenizer, tags = load_tokenizer(args.tokenizer)
    except (OSError, ValueError) as e:
        return _fail(str(e), 2)
    token_ids, response_start = tokenize_trajectory(text, tokenizer)
    try:
        traj = analyse(token_ids, response_start, tags, args.max_depth)
    except TopologyError as e:
        lo, hi = max(response_start, e.index - 8), min(len(token_ids), e.index + 8)
        context = tokenizer.decode(token_ids[lo:e.index]) + " >>>" + tokenizer.decode(token_ids[e.index:hi])
        return _fail(f"{path}: invalid NPR structure: {e.reason} at token {e.index}"
                     f"{': ' + e.message if e.message else ''}\n  near: {context!r}")
    except ValueError as e:  # bad arguments such as --max-depth 0
        return _fail(str(e), 2)
    print(f"file: {path}")
    print(describe(traj))
    if args.png:
        try:
            print(f"mask: {draw_mask(traj, args.png)}")
        except OSError as e:
            return _fail(f"cannot write {args.png}: {e}", 2)
    return 0


def cmd_data_synth(args: argparse.Namespace) -> int:
    from .data.synth import make_synth_dataset
    from .io import write_jsonl_atomic

    try:
        pairs = make_synth_dataset(args.n, tuple(args.parts), args.digits, args.seed)
    except ValueError as e:
        return _fail(str(e), 2)
    out = Path(args.out)
    rows = [problem.to_json() | ({"solution": solution} if args.solutions else {}) for problem, solution in pairs]
    try:
        write_jsonl_atomic(out, rows, make_parents=False)  # all or nothing
    except OSError as e:
        return _fail(f"cannot write {out}: {e}", 2)
    print(f"wrote {len(pairs)} problems to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="npr", description="Native Parallel Reasoner training on Megatron-Core")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="parse one trajectory, print its structure, draw its mask")
    p.add_argument("--text-file", help="chat text (prompt up to '<|im_start|>assistant\\n', then the response) "
                                        "or a bare response; default: the bundled example")
    p.add_argument("--tokenizer", help="HF tokenizer folder (default: the bundled Qwen3 tokenizer)")
    p.add_argument("--png", help="write the attention mask picture here")
    p.add_argument("--max-depth", type=int, default=1, help="deepest nesting of blocks allowed (default 1)")
    p.set_defaults(func=cmd_inspect)
    data = sub.add_parser("data", help="datasets").add_subparsers(dest="data_command", required=True)
    d = data.add_parser("synth", help="synthetic multi-part sums (JSONL), optionally with NPR solutions")
    d.add_argument("--out", required=True)
    d.add_argument("--n", type=int, default=1000)
    d.add_argument("--parts", type=int, nargs=2, default=[2, 4], metavar=("MIN", "MAX"))
    d.add_argument("--digits", type=int, default=1)
    d.add_argument("--seed", type=int, default=0)
    d.add_argument("--solutions", action="store_true", help="add canonical NPR-format solutions")
    d.set_defaults(func=cmd_data_synth)
    from .cli_train import add_commands
    from .launch.launcher import add_launch_commands
    from .launch.plan_cli import add_plan_command
    add_commands(sub)
    add_launch_commands(sub)
    add_plan_command(sub)
    return parser


# Megatron-Core warns once per module that it falls back to torch without Transformer Engine or
# Apex: expected on a CPU, where neither can run, so silenced there (and only there, only those).
MEGATRON_FALLBACK_WARNING = r"(Transformer Engine and )?Apex (is|are) not installed"


def quiet_expected_cpu_warnings() -> None:
    import warnings

    import torch
    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=MEGATRON_FALLBACK_WARNING, category=UserWarning,
                                module=r"megatron\.")


def take_trailing_overrides(parser, args, extra: list[str]) -> None:
    """argparse stops taking positionals at the first option, so `key=value` overrides written
    after one (`npr plan CFG --nodes 8 rl.steps=3`) arrive in `extra`; anything else is an error."""
    target = next((n for n in ("overrides", "args") if isinstance(getattr(args, n, None), list)), None)
    bad = [a for a in extra if target is None or "=" not in a or a.startswith("-")]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    if extra:
        getattr(args, target).extend(extra)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    take_trailing_overrides(parser, args, extra)
    quiet_expected_cpu_warnings()
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
