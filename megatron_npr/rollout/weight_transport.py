"""Trainer -> rollout engine weights over a process group, on the wire exactly as SGLang 0.5.21's
`update_weights_from_distributed` receives them (../shared/research/sglang_backend.md, section 2b):

- the trainer is rank 0 of a dedicated group (`distributed.init_weight_group`); engine ranks are
  `rank_offset + tp_rank`;
- a bucket is announced as (name, dtype, shape) triples, then broadcast from rank 0 either
  tensor by tensor in list order (`flattened=False`) or as one uint8 tensor holding every
  tensor's bytes in list order (`flattened=True`); exact dtype and shape, no conversion;
- every engine rank receives every full (unsharded) HF-named tensor.

SGLang gets the triples through its API call; our own torch-engine receivers get them over the
group itself (`announce` / `next_announcement`). The sender checks a bucket against what it
announced and the receiver checks what arrives against its model, so a wrong dtype, shape, name
or order is named instead of silently loading garbage (or hanging in a broadcast of the wrong size).
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor


class TransportError(RuntimeError):
    """A weight stream that does not match what was announced or what the receiver's model holds."""


@dataclass(frozen=True)
class WeightMeta:
    name: str
    dtype: str  # torch dtype name without "torch." ("bfloat16"), as SGLang's API takes it
    shape: tuple[int, ...]

    @classmethod
    def of(cls, name: str, tensor: Tensor) -> WeightMeta:
        return cls(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise TransportError(f"{self.name}: unknown dtype {self.dtype!r}")
        return dtype

    @property
    def nbytes(self) -> int:
        return torch.Size(self.shape).numel() * self.torch_dtype.itemsize

    def empty(self, device) -> Tensor:
        return torch.empty(self.shape, dtype=self.torch_dtype, device=device)


def describe(bucket: Sequence[tuple[str, Tensor]]) -> list[WeightMeta]:
    return [WeightMeta.of(name, t) for name, t in bucket]


def check_bucket(metas: Sequence[WeightMeta], bucket: Sequence[tuple[str, Tensor]]) -> None:
    """The sender's check: `bucket` is exactly what `metas` announced, in order."""
    if len(metas) != len(bucket):
        raise TransportError(f"announced {len(metas)} tensors, the bucket holds {len(bucket)}")
    for k, (meta, (name, tensor)) in enumerate(zip(metas, bucket)):
        actual = WeightMeta.of(name, tensor)
        if actual != meta:
            raise TransportError(f"tensor {k}: announced {meta}, about to send {actual}")


def check_expected(metas: Sequence[WeightMeta], shapes: Mapping[str, Sequence[int]],
                   dtype: torch.dtype | None = None) -> None:
    """The receiver's check: every announced tensor is one its model holds (`shapes`: HF name ->
    shape), with that shape, and with `dtype` when one is required (the transport converts nothing)."""
    for meta in metas:
        if meta.name not in shapes:
            raise TransportError(f"{meta.name}: not a tensor of the receiving model")
        if meta.shape != tuple(shapes[meta.name]):
            raise TransportError(f"{meta.name}: announced shape {list(meta.shape)}, the model holds "
                                 f"{list(shapes[meta.name])}")
        if dtype is not None and meta.torch_dtype != dtype:
            raise TransportError(f"{meta.name}: announced {meta.dtype}, the receiver expects "
                                 f"{str(dtype).removeprefix('torch.')}")


def flatten(bucket: Sequence[tuple[str, Tensor]]) -> Tensor:
    """Every tensor's bytes in list order, as one uint8 tensor (SGLang's flattened bucket)."""
    return torch.cat([t.contiguous().reshape(-1).view(torch.uint8) for _, t in bucket])


def unflatten(flat: Tensor, metas: Sequence[WeightMeta]) -> list[tuple[str, Tensor]]:
    total = sum(m.nbytes for m in metas)
    if total != flat.numel():
        raise TransportError(f"flattened bucket of {flat.numel()} bytes for {total} announced")
    out, offset = [], 0
    for meta in metas:
        chunk = flat[offset:offset + meta.nbytes]
        if offset % meta.torch_dtype.itemsize:
            chunk = chunk.clone()  # a view needs its offset aligned to the element size
        out.append((meta.name, chunk.view(meta.torch_dtype).reshape(meta.shape)))
        offset += meta.nbytes
    return out


def broadcast_bucket(bucket: Sequence[tuple[str, Tensor]], metas: Sequence[WeightMeta], group, *,
                     flattened: bool, src: int = 0) -> None:
    """Sender: the bucket on the wire (checked against `metas` first)."""
    check_bucket(metas, bucket)
    if flattened:
        dist.broadcast(flatten(bucket), src=src, group=group)
        return
    tensors = [t.contiguous() for _, t in bucket]  # kept alive until every broadcast is done
    for handle in [dist.broadcast(t, src=src, group=group, async_op=True) for t in tensors]:
        handle.wait()


def receive_bucket(metas: Sequence[WeightMeta], group, *, flattened: bool, src: int = 0,
                   device="cpu") -> list[tuple[str, Tensor]]:
    """Receiver: the tensors `metas` announced, as they arrive (exact dtype and shape)."""
    if flattened:
        flat = torch.empty(sum(m.nbytes for m in metas), dtype=torch.uint8, device=device)
        dist.broadcast(flat, src=src, group=group)
        return unflatten(flat, metas)
    tensors = [meta.empty(device) for meta in metas]
    for handle in [dist.broadcast(t, src=src, group=group, async_op=True) for t in tensors]:
        handle.wait()
    return [(meta.name, t) for meta, t in zip(metas, tensors)]


def announce(metas: Sequence[WeightMeta] | None, group, src: int = 0) -> None:
    """Our receivers' metadata channel: the next bucket's triples (None: the update is over)."""
    dist.broadcast_object_list([None if metas is None else list(metas)], src=src, group=group)


def next_announcement(group, src: int = 0) -> list[WeightMeta] | None:
    box = [None]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def send_weights(buckets, group, *, flattened: bool = True) -> int:
    """Rank 0 of `group`: every bucket (lists of (HF name, tensor)) to every other rank, then the
    end marker. Returns the number of tensors sent."""
    count = 0
    for bucket in buckets:
        metas = describe(bucket)
        announce(metas, group)
        broadcast_bucket(bucket, metas, group, flattened=flattened)
        count += len(bucket)
    announce(None, group)
    return count


def receive_weights(group, *, flattened: bool = True, shapes=None, dtype=None, device="cpu"):
    """An engine rank: yields each bucket's [(name, tensor)] until the sender's end marker; with
    `shapes` (and `dtype`) every announcement is checked (`check_expected`) before receiving."""
    while (metas := next_announcement(group)) is not None:
        if shapes is not None:
            check_expected(metas, shapes, dtype)
        yield receive_bucket(metas, group, flattened=flattened, device=device)
