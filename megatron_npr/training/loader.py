"""Deterministic packed-row batches for data-parallel SFT, resumable mid-epoch.

The samples are packed once (first-fit-decreasing) into rows of at most `max_tokens`. The loader
then serves an endless stream of rows: epoch e is every row once, in an order drawn from a
generator seeded by (seed, e); the stream is epoch 0, then epoch 1, ... A global step takes the
next `rows_per_step` rows of the stream; DP rank r gets the r-th contiguous slice of them, split
into microbatches of `micro_rows`. Everything depends only on (rows, seed, step), so every rank
computes the same stream without communicating, and a resumed run continues exactly.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models.batch import NPRBatch
from ..topology import PackedRow, PackingError, pack


@dataclass
class Step:
    """This rank's part of one global step, plus totals over the whole global step."""
    microbatches: list[NPRBatch]  # this rank's rows, micro_rows per batch, padded to max_tokens
    row_indices: tuple[int, ...]  # which packed rows (indices into PackedLoader.rows), this rank only
    global_loss_tokens: int  # trained targets over all ranks: normalise the summed loss by this
    real_tokens: int  # non-padding tokens over all ranks
    capacity: int  # rows_per_step * max_tokens
    epoch: int  # epoch of the step's first row
    step: int  # 0-based index of this global step


def _epoch_seed(seed: int, epoch: int) -> int:
    """A 63-bit generator seed from (seed, epoch): nearby pairs give unrelated orders."""
    digest = hashlib.sha256(f"npr-loader:{seed}:{epoch}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _row_loss_tokens(row: PackedRow) -> int:
    """Targets NPRBatch.targets() counts for this row (the same code the loss uses)."""
    return int(NPRBatch.from_rows([row]).targets()[1].sum())


def _fingerprint(rows: Sequence[PackedRow], max_tokens: int) -> str:
    """Hash of the packing: row length, member samples, their lengths and tokens. A resume on other
    data, another tokenizer or another max_tokens changes it."""
    h = hashlib.sha256(f"max_tokens={max_tokens};rows={len(rows)}".encode())
    for row in rows:
        lengths = [b - a for a, b in zip(row.doc_offsets, row.doc_offsets[1:])]
        h.update(f"|{row.sample_indices}:{lengths}".encode())
        h.update(row.token_ids.to(torch.int64).numpy().tobytes())
    return h.hexdigest()[:16]


def _pack_or_explain(samples: Sequence, max_tokens: int) -> list[PackedRow]:
    try:
        return pack(samples, max_tokens)
    except PackingError as e:
        if not e.overlong:
            raise
        named = ", ".join(f"sample #{i}" + (f" (line {samples[i].line})" if hasattr(samples[i], "line") else "")
                          + f": {n} tokens" for i, n in e.overlong[:10])
        named += f" and {len(e.overlong) - 10} more" if len(e.overlong) > 10 else ""
        raise PackingError(f"PackedLoader: {len(e.overlong)} sample(s) longer than max_tokens={max_tokens} "
                           f"cannot be packed ({named}); raise max_tokens or load the data with "
                           f"max_tokens={max_tokens} so they are dropped", e.overlong) from None


class PackedLoader:
    def __init__(self, samples: Sequence, max_tokens: int, rows_per_step: int, dp_rank: int = 0, dp_size: int = 1,
                 micro_rows: int = 1, seed: int = 0, pad_id: int = 0):
        if not samples:
            raise ValueError("PackedLoader: no samples")
        if dp_size < 1 or not 0 <= dp_rank < dp_size or micro_rows < 1 or rows_per_step < 1:
            raise ValueError(f"PackedLoader: need dp_size >= 1, 0 <= dp_rank < dp_size, micro_rows >= 1 and "
                             f"rows_per_step >= 1; got dp_rank={dp_rank}, dp_size={dp_size}, "
                             f"micro_rows={micro_rows}, rows_per_step={rows_per_step}")
        if rows_per_step % (dp_size * micro_rows):
            raise ValueError(f"PackedLoader: rows_per_step={rows_per_step} is not a multiple of "
                             f"dp_size*micro_rows = {dp_size}*{micro_rows}")
        self.max_tokens, self.rows_per_step, self.seed, self.pad_id = max_tokens, rows_per_step, seed, pad_id
        self.dp_rank, self.dp_size, self.micro_rows = dp_rank, dp_size, micro_rows
        self.rows = _pack_or_explain(samples, max_tokens)
        self.row_loss_tokens = [_row_loss_tokens(r) for r in self.rows]
        self.fingerprint = _fingerprint(self.rows, max_tokens)
        self.step = 0  # the next global step to serve
        self._orders: dict[int, list[int]] = {}

    # ---------------------------------------------------------------- sizes
    @property
    def rows_per_epoch(self) -> int:
        return len(self.rows)

    @property
    def packing_efficiency(self) -> float:
        """Real tokens / (rows * max_tokens) over one epoch."""
        return sum(r.num_tokens for r in self.rows) / (len(self.rows) * self.max_tokens)

    def steps_for_epochs(self, epochs: float) -> int:
        """Global steps that cover `epochs` passes over the rows (rounded up, at least 1)."""
        if epochs <= 0:
            raise ValueError(f"epochs must be > 0, got {epochs}")
        return max(1, math.ceil(epochs * self.rows_per_epoch / self.rows_per_step - 1e-9))

    # ---------------------------------------------------------------- the stream
    def epoch_order(self, epoch: int) -> list[int]:
        """Row indices of epoch `epoch`, in the order served."""
        if epoch not in self._orders:
            if len(self._orders) > 2:  # a step spans at most a few epochs; keep memory flat
                self._orders.pop(min(self._orders))
            g = torch.Generator().manual_seed(_epoch_seed(self.seed, epoch))
            self._orders[epoch] = torch.randperm(len(self.rows), generator=g).tolist()
        return self._orders[epoch]

    def step_rows(self, step: int) -> list[int]:
        """Row indices of the whole global step `step` (all ranks, rank 0's slice first)."""
        n, first = len(self.rows), step * self.rows_per_step
        return [self.epoch_order(g // n)[g % n] for g in range(first, first + self.rows_per_step)]

    def next_step(self) -> Step:
        rows = self.step_rows(self.step)
        share = self.rows_per_step // self.dp_size
        mine = rows[self.dp_rank * share:(self.dp_rank + 1) * share]
        micro = [NPRBatch.from_rows([self.rows[i] for i in mine[k:k + self.micro_rows]], length=self.max_tokens,
                                    pad_id=self.pad_id) for k in range(0, len(mine), self.micro_rows)]
        step = Step(micro, tuple(mine), sum(self.row_loss_tokens[i] for i in rows),
                    sum(self.rows[i].num_tokens for i in rows), self.rows_per_step * self.max_tokens,
                    self.step * self.rows_per_step // len(self.rows), self.step)
        self.step += 1
        return step

    # ---------------------------------------------------------------- resuming
    def state_dict(self) -> dict:
        return {"step": self.step, "seed": self.seed, "fingerprint": self.fingerprint,
                "rows_per_step": self.rows_per_step}

    def load_state_dict(self, state: dict) -> None:
        """Continue after the last step served by the loader that saved `state`."""
        mismatches = [f"{key}: saved {state.get(key)!r}, now {value!r}"
                      for key, value in (("fingerprint", self.fingerprint), ("seed", self.seed),
                                         ("rows_per_step", self.rows_per_step)) if state.get(key, value) != value]
        if "fingerprint" not in state or "step" not in state:
            raise ValueError(f"PackedLoader.load_state_dict: not a loader state (keys {sorted(state)})")
        if mismatches:
            raise ValueError("PackedLoader.load_state_dict: the saved loader served other rows ("
                             + "; ".join(mismatches) + "): resume with the same data, tokenizer, max_tokens, "
                             "seed and global batch, or start a new run")
        self.step = int(state["step"])
