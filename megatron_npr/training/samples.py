"""Token ids -> a training sample (ids, loss mask, layout, extras), the one way every stage builds
them: SFT records read from disk and RL rollouts held in memory.

The loss mask is the response minus every token the parallel engine inserts (each branch's
`<step>` + label, each block's `<takeaway>`): the model never samples those, so they are never
trained (DESIGN section 2).
"""
from __future__ import annotations

from typing import Mapping, Sequence

import torch

from ..topology import Layout, PackSample, inserted_mask_from_structure, layout_from_structure, parse_structure


def to_sample(prompt_ids: Sequence[int], response_ids: Sequence[int], vocab, *, max_depth: int = 1,
              forced: Sequence[bool] | None = None, layout: Layout | None = None,
              extras: Mapping[str, torch.Tensor] | None = None, sample_cls=PackSample, **fields) -> PackSample:
    """A training sample from token ids.

    - `layout=None` (SFT): the response is parsed with the topology module (TopologyError if it is
      not a valid NPR structure), trained under its branch layout, and the inserted tokens are
      found from the structure and `vocab.label_ids`; `forced` is optional and masked as well.
    - `layout` given (an engine rollout: its own layout, the causal one for a sequential decode):
      trained under that layout, with the engine's `forced` mask (required) left out of the loss.
    `extras` are per-response-token fields ([len(response_ids)]), placed at the response
    positions of the sample (zero on the prompt); `sample_cls`/`fields` build a subclass."""
    ids = [int(t) for t in prompt_ids] + [int(t) for t in response_ids]
    r0 = len(prompt_ids)
    loss_mask = torch.arange(len(ids)) >= r0
    if layout is None:
        structure = parse_structure(ids, vocab.tags, r0, max_depth)
        loss_mask &= ~inserted_mask_from_structure(ids, structure, vocab.label_ids)
        layout = layout_from_structure(structure, max_depth)
    elif forced is None:
        raise ValueError("to_sample: a sample with the engine's layout needs the engine's forced mask")
    elif layout.num_tokens != len(ids):
        raise ValueError(f"to_sample: layout of {layout.num_tokens} tokens for {len(ids)} token ids")
    if forced is not None:
        if len(forced) != len(response_ids):
            raise ValueError(f"to_sample: {len(forced)} forced flags for {len(response_ids)} response tokens")
        loss_mask[r0:] &= ~torch.as_tensor(list(forced), dtype=torch.bool)
    placed = {}
    for name, values in (extras or {}).items():
        values = torch.as_tensor(values)
        if values.shape != (len(response_ids),):
            raise ValueError(f"to_sample: extra {name!r} has shape {tuple(values.shape)}, expected "
                             f"[{len(response_ids)}] (one per response token)")
        placed[name] = torch.cat([values.new_zeros(r0), values])
    return sample_cls(torch.tensor(ids, dtype=torch.long), loss_mask, layout, placed, **fields)
