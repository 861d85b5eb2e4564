"""KV slot pool: reference-counted slots with reservations.

Every token of every live sequence owns one KV slot. A fork does not copy the prefix: each branch
takes a reference on the prefix slots and releases it at the join, when the trunk adopts the
branches' own slots. Admission reserves a sample's worst case (prompt + max_new_tokens) up front,
so an admitted sample never waits for memory; samples that do not fit wait to be admitted.
"""
from __future__ import annotations

import torch


class PoolError(RuntimeError):
    """Broken accounting (double free, over-allocation): always a bug, never user input."""


class SlotPool:
    def __init__(self, num_slots: int):
        if num_slots <= 0:
            raise ValueError(f"the KV pool needs a positive number of slots, got {num_slots}")
        self.num_slots = num_slots
        self.refcount = torch.zeros(num_slots, dtype=torch.int32)
        self._free = list(range(num_slots - 1, -1, -1))  # a stack: O(1) per allocation
        self.reserved = 0

    @property
    def free(self) -> int:
        return len(self._free)

    def try_reserve(self, slots: int) -> bool:
        if self.reserved + slots > self.num_slots:
            return False
        self.reserved += slots
        return True

    def unreserve(self, slots: int) -> None:
        if slots > self.reserved:
            raise PoolError(f"unreserving {slots} slots, only {self.reserved} reserved")
        self.reserved -= slots

    def allocate(self, count: int) -> torch.Tensor:
        if count > len(self._free):
            raise PoolError(f"allocating {count} slots with {len(self._free)} free (reservation bypassed)")
        slots = torch.tensor([self._free.pop() for _ in range(count)], dtype=torch.long)
        self.refcount[slots] = 1
        return slots

    def retain(self, slots: torch.Tensor) -> None:
        if (self.refcount[slots] <= 0).any():
            raise PoolError("retaining a free slot")
        self.refcount.index_add_(0, slots, torch.ones_like(slots, dtype=torch.int32))

    def release(self, slots: torch.Tensor) -> None:
        if slots.numel() == 0:
            return
        if slots.unique().numel() != slots.numel() or (self.refcount[slots] <= 0).any():
            raise PoolError("double free of a KV slot")
        self.refcount[slots] -= 1
        self._free.extend(slots[self.refcount[slots] == 0].tolist())

    def reset(self) -> None:
        """Free every slot and reservation: after a generate call that failed part way (its
        streams are gone, and the pool is only ever used by one call at a time)."""
        self.refcount.zero_()
        self._free = list(range(self.num_slots - 1, -1, -1))
        self.reserved = 0

    def assert_empty(self) -> None:
        """After a generate call: every slot free, nothing reserved."""
        if self.free != self.num_slots or self.reserved or self.refcount.any():
            raise PoolError(f"KV pool leak: {self.num_slots - self.free} slots in use, {self.reserved} reserved")
