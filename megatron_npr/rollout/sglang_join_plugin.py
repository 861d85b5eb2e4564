"""The exact NPR join for SGLang 0.5.21, as an out-of-tree plugin: DESIGN and skeleton only.

Status: not registered, not active, never run on a GPU. `SGLangBackend(join="exact")` is refused
until the engine-side pieces below are written and validated; what runs on a CPU (the hint, the
request, the position arithmetic) is implemented here. Design from the research note
(shared/research/sglang_backend.md, section 4).

Why: over the public API a branch is exact (the radix cache shares the prefix's KV, positions
continue from g+1), but a join is causal: SGLang re-prefills branch 2 after branch 1 and puts the
takeaway at g+1+sum of branch lengths. NPR's takeaway attends to the prefix plus every branch's
own KV and sits at g+1+longest branch.

Plug-in point: entry-point group `sglang.srt.plugins`, e.g. `npr_join =
megatron_npr.rollout.sglang_join_plugin:register`; SGLang's `load_plugins()` calls it in the
Engine process and in every scheduler process, and it installs AROUND hooks (`HookRegistry`).

Request: `input_ids = P + b_1 + ... + b_m + [<takeaway>]` with `kv_hints` carrying one action
`npr.join/1`, payload {prefix_len, branch_lens, position_offset}. Unpatched SGLang ignores the hint
and silently joins causally, so the client must see a marker the plugin adds to `meta_info`
before it counts a join as exact.

Engine side, per join request:
1. Admission (around `Req.init_next_round_input`): `match_prefix(P + b_i)` for every branch; a
   partial match aborts with JOIN_MISS_MESSAGE (the client re-prefills `P + b_i` with
   max_new_tokens=0 and retries); `prefix_indices = P's slots + each branch's own slots`;
   `inc_lock_ref` on every branch's last node; `skip_radix_cache_insert = True`.
2. Positions: a per-request delta (`JoinHint.position_delta`, <= 0) added in `ForwardBatch.init_new`
   to the extend positions and to `clamp_position(seq_lens)` when decoding, carried through
   ScheduleBatch filter/merge and ModelWorkerBatch (overlap scheduling, CUDA graphs copy positions).
3. Release: free only [cache_protected_len, owned) (what `release_kv_cache` already does), unlock
   the branch nodes, and never insert the join into the tree (its branch slots would gain a second
   owner, and later causal requests would match non-causal KV).
4. Layout: `page_size=1` (branch boundaries are not page-aligned); no speculative decoding.
"""
from __future__ import annotations

from dataclasses import dataclass

ACTION_TYPE, ACTION_VERSION = "npr.join", 1
JOIN_MISS_MESSAGE = "npr.join: a branch is no longer in the radix cache; re-prefill it and retry"
UNVALIDATED = "unvalidated: needs a GPU run with SGLang 0.5.21"


@dataclass(frozen=True)
class JoinHint:
    """What a join request tells the plugin: the shared prefix and each branch's length."""
    prefix_len: int
    branch_lens: list[int]
    position_offset: int = 0  # the prefix's first position (0 for a whole sequence)

    def __post_init__(self):
        if self.prefix_len < 1 or not self.branch_lens or min(self.branch_lens) < 1:
            raise ValueError(f"a join needs a prefix and non-empty branches, got {self}")

    @property
    def position_delta(self) -> int:
        """Added to SGLang's causal positions from the takeaway on: g+1+max - (g+1+sum)."""
        return max(self.branch_lens) - sum(self.branch_lens)

    def takeaway_position(self) -> int:
        return self.position_offset + self.prefix_len + max(self.branch_lens)

    def to_kv_hints(self, message_id: str) -> dict:
        """The `kv_hints` envelope (KvHintsEnvelope's fields, research section 4)."""
        payload = {"prefix_len": self.prefix_len, "branch_lens": list(self.branch_lens),
                   "position_offset": self.position_offset}
        return {"protocol_version": 1, "message_id": message_id,
                "actions": [{"action_id": f"{message_id}/join", "action_type": ACTION_TYPE,
                             "action_version": ACTION_VERSION, "payload": payload}]}

    @classmethod
    def from_kv_hints(cls, envelope: dict) -> "JoinHint | None":
        for action in envelope.get("actions", []):
            if action.get("action_type") == ACTION_TYPE and action.get("action_version") == ACTION_VERSION:
                return cls(**action["payload"])
        return None


def join_request(prefix: list[int], branches: list[list[int]], takeaway_id: int, message_id: str):
    """(input_ids, kv_hints) of an exact join request."""
    hint = JoinHint(len(prefix), [len(b) for b in branches])
    return prefix + [t for b in branches for t in b] + [takeaway_id], hint.to_kv_hints(message_id)


def register() -> None:
    """The `sglang.srt.plugins` entry point: would install the hooks below."""
    import sglang  # noqa: F401 - only ever called inside SGLang's processes
    raise NotImplementedError(UNVALIDATED)


def admit_join(req, hint: JoinHint) -> None:
    """Step 1: match every branch, concatenate the slots, lock the branch nodes."""
    raise NotImplementedError(UNVALIDATED)


def shift_positions(forward_batch, deltas) -> None:
    """Step 2: add each join request's delta to its extend/decode positions."""
    raise NotImplementedError(UNVALIDATED)


def release_join(req) -> None:
    """Step 3: unlock the branch nodes; nothing is inserted into the tree."""
    raise NotImplementedError(UNVALIDATED)
