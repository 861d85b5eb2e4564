"""The files a stage reads and writes, found in its config (or convert_hf.py's arguments), so a
launch can name a path that a node does not see before any rank starts on it."""
from __future__ import annotations

import dataclasses
import os

INPUT_FIELDS = ("hf_dir", "path")            # model.hf_dir, data.path, engine.hf_dir, ...
OUTPUT_FIELDS = ("out_dir", "out", "export_hf")
CONVERT_INPUTS, CONVERT_OUTPUTS = ("--hf-dir", "--ckpt"), ("--out",)


def config_paths(cfg, prefix: str = "") -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(inputs, outputs) as (key, path) pairs, walking the config's sections."""
    inputs, outputs = [], []
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            more_in, more_out = config_paths(value, key + ".")
            inputs += more_in
            outputs += more_out
        elif isinstance(value, str) and value.strip():
            if f.name in INPUT_FIELDS:
                inputs.append((key, value))
            elif f.name in OUTPUT_FIELDS:
                outputs.append((key, value))
    return inputs, outputs


def convert_paths(argv: list[str]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    pairs = list(zip(argv, argv[1:]))
    return ([(k, v) for k, v in pairs if k in CONVERT_INPUTS], [(k, v) for k, v in pairs if k in CONVERT_OUTPUTS])


def missing_paths(inputs, outputs) -> list[tuple[str, str]]:
    """Inputs that do not exist, and outputs whose nearest existing ancestor is not writable."""
    missing = [(k, p) for k, p in inputs if not os.path.exists(p)]
    for key, path in outputs:
        parent = os.path.abspath(path)
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.access(parent, os.W_OK):
            missing.append((key, f"{path} (not writable: {parent})"))
    return missing


def stage_paths(stage: str, cfg, argv: list[str]):
    return convert_paths(argv) if stage == "convert" else config_paths(cfg)
