"""Rollouts -> training samples -> packed rows -> this DP rank's microbatches, and the trainer's
log-probs mapped back onto each rollout (the train/inference mismatch).

Every sample is the engine's own token ids under the engine's own layout (never re-tokenized):
a parallel rollout trains under its branch layout, a sequential one causally, and an invalid
sequential rollout (DAPO trains it with its negative reward) under the causal layout of the
decode that produced it. The loss mask is the sampled response: `to_sample` leaves the prompt and
every engine-inserted token out. Per-token extras, aligned with the tokens (the value at the
position of the token, zero on the prompt): `advantages` (the rollout's advantage on each
response token) and `old_logprobs` (the engine's, or the trainer's when recomputed).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist

from ..eval.metrics import check_structure
from ..models import NPRBatch
from ..rollout import Rollout, logprob_mismatch
from ..topology import Layout, PackedRow, pack
from ..training.samples import to_sample
from .losses import align_with_tokens

REGIONS = ("trunk", "branch", "takeaway")  # where a response token sits in its structure


def training_layout(rollout: Rollout) -> Layout:
    """The layout a rollout trains under: the engine's, or for a sequential decode without one
    (truncated or malformed) the causal layout it was decoded with."""
    if rollout.layout is not None:
        return rollout.layout
    if rollout.positions == list(range(len(rollout.token_ids))) and not any(rollout.forced_mask):
        return Layout.causal(len(rollout.token_ids))
    raise ValueError(f"a parallel rollout that ended with {rollout.finish_reason!r} has no layout to train "
                     "under; the algorithm must drop it before training")


def rollout_sample(rollout: Rollout, advantage: float, vocab):
    r0, ids = rollout.response_start, rollout.token_ids
    n = len(ids) - r0
    extras = {"advantages": torch.full((n,), float(advantage)),
              "old_logprobs": torch.tensor(rollout.logprobs, dtype=torch.float32)}
    return to_sample(ids[:r0], ids[r0:], vocab, forced=rollout.forced_mask, layout=training_layout(rollout),
                     extras=extras)


def _padding_row(pad_id: int, extras: Sequence[str]) -> PackedRow:
    """A row with no sample and no loss (every rank needs the same number of microbatches)."""
    return PackedRow(torch.tensor([pad_id]), torch.zeros(1, dtype=torch.bool), Layout.causal(1), (-1,), (0, 1),
                     {name: torch.zeros(1) for name in extras})


@dataclass
class TrainBatch:
    """One optimizer step's global batch, and this rank's share of it."""
    rollouts: list[Rollout]  # the samples of the batch, in sample-index order
    rows: list[PackedRow]  # every rank's rows (padded to a multiple of dp * micro_rows)
    mine: list[int]  # indices into `rows` of this rank's rows, in microbatch order
    microbatches: list[NPRBatch]

    @property
    def real_tokens(self) -> int:
        return sum(len(r.token_ids) for r in self.rollouts)

    def response_logprobs(self, trainer_logprobs: list[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Sample index -> the trainer's log-prob of each of its response tokens, for the samples
        of this rank (empty off the last pipeline stage). `trainer_logprobs[m][j, t]` is
        log p(token t+1) of row j of microbatch m."""
        out = {}
        rows_per_mb = self.microbatches[0].tokens.shape[0] if self.microbatches else 1
        for m, lp in enumerate(trainer_logprobs):
            for j in range(lp.shape[0]):
                row = self.rows[self.mine[m * rows_per_mb + j]]
                for k, i in enumerate(row.sample_indices):
                    if i >= 0:
                        lo, r = row.doc_offsets[k], self.rollouts[i]
                        out[i] = lp[j, lo + r.response_start - 1:lo + len(r.token_ids) - 1].detach().cpu()
        return out


def build_batch(rollouts: Sequence[Rollout], advantages: Sequence[float], vocab, *, max_tokens: int, micro_rows: int,
                dp_rank: int, dp_size: int) -> TrainBatch:
    """Pack every rollout (first-fit-decreasing rows of `max_tokens`), pad the rows to a multiple
    of dp_size * micro_rows, and give rank r every dp_size-th row (fullest rows spread evenly).
    Every microbatch of the step has the length of the longest row (pipeline stages need one)."""
    samples = [rollout_sample(r, a, vocab) for r, a in zip(rollouts, advantages)]
    rows = pack(samples, max_tokens)
    quantum = dp_size * micro_rows
    rows += [_padding_row(vocab.pad_id, ("advantages", "old_logprobs"))] * (-len(rows) % quantum)
    length = max(r.num_tokens for r in rows)
    mine = list(range(dp_rank, len(rows), dp_size))
    microbatches = [NPRBatch.from_rows([rows[i] for i in mine[k:k + micro_rows]], length=length, pad_id=vocab.pad_id)
                    for k in range(0, len(mine), micro_rows)]
    return TrainBatch(list(rollouts), rows, mine, microbatches)


def with_old_logprobs(microbatches: list[NPRBatch], trainer_logprobs: list[torch.Tensor]) -> list[NPRBatch]:
    """The microbatches with `old_logprobs` replaced by the trainer's own (recomputed before the
    first of several updates). Off the last stage there are none, and no loss to use them."""
    if not trainer_logprobs:
        return microbatches
    return [replace(mb, extras={**mb.extras, "old_logprobs": align_with_tokens(lp.float()).to(mb.tokens.device)})
            for mb, lp in zip(microbatches, trainer_logprobs)]


def token_regions(rollout: Rollout, tags, max_depth: int = 1) -> torch.Tensor:
    """REGIONS index of every response token: inside a top-level branch, inside a takeaway, or
    the trunk (everything else, and every token of a response without a valid structure)."""
    r0 = rollout.response_start
    region = torch.zeros(len(rollout.token_ids) - r0, dtype=torch.long)
    structure, _ = check_structure(rollout, tags, max_depth)
    for block in structure.blocks if structure is not None else ():
        for branch in block.branches:
            region[branch.start - r0:branch.end - r0] = 1
        region[block.takeaway[0] - r0:block.takeaway[1] - r0] = 2
    return region


def mismatch_metrics(batches: Sequence[tuple[TrainBatch, list[torch.Tensor]]], tags, max_depth: int = 1) -> dict:
    """Engine-vs-trainer |log-prob difference| on sampled tokens (forced tokens left out by
    `logprob_mismatch`), mean and max overall and per region, over the whole global batch.
    `batches`: (batch, trainer.logprobs(batch.microbatches)) of each mini-batch."""
    from megatron.core import parallel_state as ps

    sums = torch.zeros(1 + len(REGIONS), 2, dtype=torch.float64)  # (sum, count): all, then each region
    maxes = torch.zeros(1 + len(REGIONS), dtype=torch.float64)
    for batch, trainer_logprobs in batches:
        if ps.get_tensor_model_parallel_rank() != 0:  # TP ranks hold copies of the same rows
            break
        for i, trainer in batch.response_logprobs(trainer_logprobs).items():
            rollout = batch.rollouts[i]
            diff = logprob_mismatch(rollout, trainer)
            regions = token_regions(rollout, tags, max_depth)[~torch.tensor(rollout.forced_mask, dtype=torch.bool)]
            for k, part in enumerate([diff] + [diff[regions == g] for g in range(len(REGIONS))]):
                if part.numel():
                    sums[k, 0] += part.sum()
                    sums[k, 1] += part.numel()
                    maxes[k] = max(maxes[k], part.max())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sums)
        dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
    out = {}
    for k, name in enumerate(("", *(f"_{g}" for g in REGIONS))):
        out[f"mismatch_mean{name}"] = (sums[k, 0] / sums[k, 1]).item() if sums[k, 1] else 0.0
        out[f"mismatch_max{name}"] = maxes[k].item()
    out["mismatch_tokens"] = int(sums[0, 1])
    return out
