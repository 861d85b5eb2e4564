"""Atomic file output: what a killed process leaves is either the old file or the new one.

- `atomic_write_text` / `write_json_atomic`: a temporary sibling, fsynced, renamed over the target.
- `append_jsonl`: whole lines appended, flushed and fsynced (resumable logs and outputs).
- `atomic_output_dir`: a folder built under a temporary sibling name, renamed when complete.
"""
from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
from pathlib import Path
from typing import IO, Iterable, Iterator


def atomic_write_text(path: str | Path, text: str, *, make_parents: bool = True) -> Path:
    path = Path(path)
    if make_parents:
        path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def write_json_atomic(path: str | Path, payload, *, indent: int | None = 2, sort_keys: bool = True) -> Path:
    return atomic_write_text(path, json.dumps(payload, indent=indent, sort_keys=sort_keys) + "\n")


def write_jsonl_atomic(path: str | Path, rows: Iterable[dict], *, make_parents: bool = True) -> Path:
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                             make_parents=make_parents)


def append_jsonl(f: IO[str], rows: Iterable[dict]) -> None:
    """Append rows to an open text file as JSON lines, then flush and fsync."""
    for row in rows:
        f.write(json.dumps(row, ensure_ascii=False) + "\n")
    f.flush()
    os.fsync(f.fileno())


class OutputError(OSError):
    """An output folder that cannot be written (exists and is not empty, or cannot be moved in place)."""


def output_taken(path: str | Path) -> bool:
    """Whether an output may not be written at `path`: something is there that is not an empty folder."""
    target = Path(path)
    return target.exists() and (not target.is_dir() or any(target.iterdir()))


@contextlib.contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder that becomes `out` only if the block succeeds; on any
    error it is deleted, so a failed job leaves no partial output. An existing empty `out` is
    replaced; a non-empty one is refused."""
    target = Path(out)
    if output_taken(target):
        raise OutputError(f"output {target} already exists and is not an empty folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    while True:  # os.mkdir (not mkdtemp) so the folder gets normal umask permissions
        temp = target.parent / f".{target.name}.tmp-{secrets.token_hex(4)}"
        try:
            temp.mkdir()
            break
        except FileExistsError:
            continue
    try:
        yield temp
        try:
            os.replace(temp, target)  # atomic; replaces only an empty folder
        except OSError as exc:
            raise OutputError(f"cannot move finished output to {target}: {exc}") from None
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
