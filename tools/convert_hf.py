"""Convert Qwen3 checkpoints between HF and Megatron distributed checkpoints.

    python tools/convert_hf.py hf-to-mcore --hf-dir DIR --out DIR [--tp N] [--pp M] [--add-npr-tokens] [--dtype D]
    python tools/convert_hf.py mcore-to-hf --ckpt DIR --out DIR [--max-shard-gb G]
    python tools/convert_hf.py verify --hf-dir DIR --ckpt DIR [--tol T]

A distributed checkpoint loads at any TP/PP. Outputs are written to a temporary sibling folder
and renamed only when complete; errors print one line and exit 1.
"""
import argparse
import json
import os
import sys
import warnings

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # conversion runs on CPU ranks (gloo)
warnings.filterwarnings("ignore")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="convert_hf.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-mcore", help="HF safetensors folder -> Megatron distributed checkpoint")
    a.add_argument("--hf-dir", required=True)
    a.add_argument("--out", required=True)
    a.add_argument("--tp", type=int, default=1)
    a.add_argument("--pp", type=int, default=1)
    a.add_argument("--add-npr-tokens", action="store_true",
                   help="add the 8 NPR tags to the tokenizer and initialise their embedding rows")
    a.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="default: the HF config's")
    b = sub.add_parser("mcore-to-hf", help="Megatron distributed checkpoint -> HF safetensors folder")
    b.add_argument("--ckpt", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--max-shard-gb", type=float, default=5.0)
    c = sub.add_parser("verify", help="compare logits of an HF folder and a checkpoint")
    c.add_argument("--hf-dir", required=True)
    c.add_argument("--ckpt", required=True)
    c.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args(argv)

    from megatron_npr.checkpoint import CheckpointError
    from megatron_npr.checkpoint import convert
    from megatron_npr.io import OutputError
    from megatron_npr.models import ModelConfigError
    try:
        if args.command == "hf-to-mcore":
            out = convert.hf_to_mcore(args.hf_dir, args.out, args.tp, args.pp, args.add_npr_tokens, args.dtype)
            print(f"wrote {out} (tp={args.tp}, pp={args.pp}; loadable at any TP/PP)")
        elif args.command == "mcore-to-hf":
            print(f"wrote {convert.mcore_to_hf(args.ckpt, args.out, int(args.max_shard_gb * 2**30))}")
        else:
            result = convert.verify(args.hf_dir, args.ckpt, args.tol)
            print(json.dumps(result))
            return 0 if result["ok"] else 1
    except (CheckpointError, ModelConfigError, OutputError, OSError) as e:  # OutputError: --out not empty
        print(f"convert_hf.py {args.command}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
