"""Reading and writing the safetensors weights of HF model folders (single file or sharded).

Weights are read one tensor at a time and written one shard at a time, so a conversion never needs
the whole model in memory. Pickled `.bin` weights are deliberately not supported. The folder's
config.json is read by `models.qwen3_hf.read_hf_config`.
"""
from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..models.qwen3_hf import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFWeights(Mapping):
    """Lazy view of an HF folder's safetensors weights: lists names, loads one tensor per lookup.

    Use as a context manager (or call close()) to release the open files."""

    def __init__(self, folder: Path, file_of: dict[str, Path]):
        self.folder = folder
        self._file_of = file_of
        self._handles: dict[Path, object] = {}

    def names(self) -> list[str]:
        return list(self._file_of)

    def file_of(self, name: str) -> Path:
        return self._file_of[name]

    def _handle(self, path: Path):
        if path not in self._handles:
            self._handles[path] = _open_safetensors(path)
        return self._handles[path]

    def __getitem__(self, name: str) -> torch.Tensor:
        path = self._file_of[name]  # KeyError for unknown names, as a Mapping should
        try:
            return self._handle(path).get_tensor(name)
        except SafetensorError as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {path}: {exc}") from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, name: object) -> bool:
        return name in self._file_of

    def close(self) -> None:
        self._handles.clear()  # safe_open handles release their mmap when dropped

    def __enter__(self) -> HFWeights:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _open_safetensors(path: Path):
    if not path.is_file():
        raise CheckpointError(f"weights file {path} does not exist")
    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{path} is not a valid safetensors file (corrupt or truncated?): "
                              f"{exc}") from None


def open_hf_weights(hf_dir: str | os.PathLike) -> HFWeights:
    """Open the weights of an HF folder: `model.safetensors`, or `model.safetensors.index.json` plus
    its shards (the single file wins when both exist, as in transformers). Every file's header is
    checked up front so a corrupt shard fails here, naming the file."""
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise CheckpointError(f"HF model folder {folder} does not exist")
    single, index_path = folder / SINGLE_FILE, folder / INDEX_FILE
    if single.is_file():
        return HFWeights(folder, {name: single for name in _open_safetensors(single).keys()})
    if not index_path.is_file():
        pickles = sorted(p.name for p in folder.glob("*.bin"))
        hint = f" (found {', '.join(pickles)}: pickled .bin weights are not read; convert to safetensors)" \
            if pickles else ""
        raise CheckpointError(f"{folder} has no {SINGLE_FILE} or {INDEX_FILE}{hint}")
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
        file_of = {name: folder / shard for name, shard in weight_map.items()}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid safetensors index: {exc!r}") from None
    for shard in sorted(set(file_of.values())):
        present = set(_open_safetensors(shard).keys())
        missing = sorted(name for name, path in file_of.items() if path == shard and name not in present)
        if missing:
            raise CheckpointError(f"{shard} lacks {len(missing)} tensor(s) that {index_path.name} "
                                  f"assigns to it, e.g. {missing[0]!r}")
    return HFWeights(folder, file_of)


# ---- writing -------------------------------------------------------------------------------------

def _shard_name(number: int, total: int) -> str:
    return f"model-{number:05d}-of-{total:05d}.safetensors"


def _for_saving(tensor: torch.Tensor, seen_storages: set[int]) -> torch.Tensor:
    """A CPU contiguous tensor owning its storage: safetensors refuses tensors sharing memory, and
    mapping outputs are often views (fc1 halves, split qkv) of one larger tensor."""
    tensor = tensor.detach().to("cpu").contiguous()
    storage = tensor.untyped_storage()
    if storage.nbytes() != tensor.nbytes or storage.data_ptr() in seen_storages:
        tensor = tensor.clone()
    seen_storages.add(tensor.untyped_storage().data_ptr())
    return tensor


def write_hf_weights(out_dir: str | os.PathLike, tensors: Iterable[tuple[str, torch.Tensor]],
                     max_shard_bytes: int = 5 * 2**30) -> dict[str, str]:
    """Stream (name, tensor) pairs into safetensors shards in transformers' layout; returns the
    weight map (name -> file). At most one shard is held in memory; a tensor larger than
    max_shard_bytes gets a shard of its own. Refuses a folder that already has model weights."""
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    stale = sorted(p.name for p in folder.glob("model*.safetensors*"))
    if stale:
        raise CheckpointError(f"{folder} already holds weights ({stale[0]}, ...); write into an empty folder")
    # Shards get temporary names until their count is known.
    temp_names: list[str] = []
    shard_of: dict[str, int] = {}
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = total_params = 0
    seen_storages: set[int] = set()

    def flush() -> None:
        nonlocal pending, pending_bytes, seen_storages
        temp = f".model-part-{len(temp_names) + 1:05d}.safetensors.tmp"
        save_file(pending, str(folder / temp), metadata={"format": "pt"})
        temp_names.append(temp)
        pending, pending_bytes, seen_storages = {}, 0, set()

    try:
        for name, tensor in tensors:
            if name in shard_of:
                raise CheckpointError(f"tensor {name!r} given twice")
            size = tensor.numel() * tensor.element_size()
            if pending and pending_bytes + size > max_shard_bytes:
                flush()
            pending[name] = _for_saving(tensor, seen_storages)
            shard_of[name] = len(temp_names)
            pending_bytes += size
            total_bytes += size
            total_params += tensor.numel()
        if not shard_of:
            raise CheckpointError(f"no tensors to write into {folder}")
        flush()
        total = len(temp_names)
        final_names = [SINGLE_FILE] if total == 1 else [_shard_name(n, total) for n in range(1, total + 1)]
        for temp, final in zip(temp_names, final_names):
            os.replace(folder / temp, folder / final)
    except BaseException:
        for temp in temp_names:
            (folder / temp).unlink(missing_ok=True)
        raise
    weight_map = {name: final_names[shard] for name, shard in shard_of.items()}
    if total > 1:
        index = {"metadata": {"total_parameters": total_params, "total_size": total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return weight_map
