"""Weight buckets for SGLang's colocated tensor path (`Engine.update_weights_from_tensor`).

What SGLang 0.5.21 does with a payload (shared/research/sglang_backend.md, section 2b, "Tensor
path"): the request carries `serialized_named_tensors`, one entry per TP rank, and TP rank r's
scheduler deserializes only entry r. Deserializing goes through `MultiprocessingSerializer`, a
`ForkingPickler` with torch's reductions: a CUDA tensor travels as a CUDA-IPC handle and a CPU tensor
as a shared-memory file descriptor, so no tensor bytes are copied and the receiver maps the
producer's memory. The entry is then either

- `[(HF name, tensor), ...]` (`load_format=None`), handed to `model.load_weights`; every rank gets
  every full tensor and shards it itself; or
- `{"flattened_tensor": ..., "metadata": [FlattenedTensorMetadata]}` (`"flattened_bucket"`), which
  `FlattenedTensorBucket` views back into named tensors before `load_weights`.

SGLang answers before the device is synchronised, so the producer must keep its tensors (for a
flattened bucket: the flat buffer it built) alive until the engine call has returned; `Payloads`
carries them. The offline `Engine` serializes a `load_format=None` bucket itself (one copy per TP
rank); a flattened bucket must arrive already serialized, one payload per rank, which is what
`serialize_bucket(..., flattened=True)` builds. With SGLang importable its own serializer and
bucket classes are used; without it (CPU tests against tests/fake_sglang.py) a stand-in with the
same layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.multiprocessing  # noqa: F401 - registers torch's tensor reductions with ForkingPickler
from multiprocessing.reduction import ForkingPickler
from torch import Tensor

from .weight_transport import flatten


@dataclass(frozen=True)
class FlatMeta:
    """One tensor of a flattened bucket (our stand-in for SGLang's FlattenedTensorMetadata): the
    bytes [start_idx, end_idx) of the uint8 buffer hold it."""
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    start_idx: int
    end_idx: int
    numel: int


class Payloads(list):
    """One serialized payload per TP rank; `buffers` are the tensors the payloads point into, which
    must stay alive until the engine call that consumes them has returned."""

    def __init__(self, payloads, buffers):
        super().__init__(payloads)
        self.buffers = list(buffers)


def sglang_classes():
    """SGLang's (MultiprocessingSerializer, FlattenedTensorBucket), or (None, None) without SGLang."""
    try:
        from sglang.srt.utils import MultiprocessingSerializer
        from sglang.srt.weight_sync.tensor_bucket import FlattenedTensorBucket
    except Exception:  # noqa: BLE001 - not installed, or not importable on this machine
        return None, None
    return MultiprocessingSerializer, FlattenedTensorBucket


def serialize_bucket(bucket: Sequence[tuple[str, Tensor]], tp_size: int, flattened: bool) -> Payloads:
    """`tp_size` payloads of `bucket` (every rank receives every full tensor)."""
    if tp_size < 1:
        raise ValueError(f"tp_size must be at least 1, got {tp_size}")
    bucket = [(name, t.detach().contiguous()) for name, t in bucket]
    if not bucket:
        raise ValueError("cannot serialize an empty weight bucket")
    serializer, bucket_cls = sglang_classes()
    if flattened and bucket_cls is not None:
        flat_bucket = bucket_cls(named_tensors=bucket)
        obj = {"flattened_tensor": flat_bucket.get_flattened_tensor(), "metadata": flat_bucket.get_metadata()}
        buffers = [obj["flattened_tensor"]]
    elif flattened:
        obj, buffers = _flatten_here(bucket)
    else:
        obj, buffers = bucket, [t for _, t in bucket]
    dump = serializer.serialize if serializer is not None else _dumps
    return Payloads([dump(obj) for _ in range(tp_size)], buffers)


def deserialize_payload(payload) -> list[tuple[str, Tensor]]:
    """One rank's payload back into [(name, tensor)], whichever format it holds (the receiver's side)."""
    serializer, bucket_cls = sglang_classes()
    obj = serializer.deserialize(payload) if serializer is not None else ForkingPickler.loads(payload)
    if isinstance(obj, dict):
        if set(obj) != {"flattened_tensor", "metadata"}:
            raise ValueError(f"a flattened payload holds flattened_tensor and metadata, got {sorted(obj)}")
        if obj["metadata"] and not isinstance(obj["metadata"][0], FlatMeta) and bucket_cls is not None:
            return bucket_cls(flattened_tensor=obj["flattened_tensor"], metadata=obj["metadata"]).reconstruct_tensors()
        return _unflatten_here(obj["flattened_tensor"], obj["metadata"])
    if not isinstance(obj, list) or not all(isinstance(x, tuple) and len(x) == 2 for x in obj):
        raise ValueError(f"a payload holds [(name, tensor)] or a flattened bucket, got {type(obj).__name__}")
    return obj


def _dumps(obj) -> bytes:
    return bytes(ForkingPickler.dumps(obj))


def _flatten_here(bucket):
    flat, metas, at = flatten(bucket), [], 0
    for name, t in bucket:
        size = t.numel() * t.element_size()
        metas.append(FlatMeta(name, tuple(t.shape), t.dtype, at, at + size, size))
        at += size
    return {"flattened_tensor": flat, "metadata": metas}, [flat]


def _unflatten_here(flat: Tensor, metas: Sequence[FlatMeta]) -> list[tuple[str, Tensor]]:
    out = []
    for m in metas:
        chunk = flat[m.start_idx:m.end_idx]
        if m.start_idx % m.dtype.itemsize:
            chunk = chunk.clone()  # a view as a wider dtype needs an aligned offset
        out.append((m.name, chunk.view(m.dtype).reshape(m.shape)))
    return out
