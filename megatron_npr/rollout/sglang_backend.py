"""SGLangBackend: NPR rollouts over SGLang 0.5.21's offline `Engine`, decoded client-side.

A sample is decoded with the torch scheduler's rules (scheduler.py), one SGLang request per stream
segment, every live segment of every sample batched into one `engine.generate` call per round:

- trunk: the prompt, seeded like the scheduler's trunk (`stream_seed(prompt_seed, k)`), stopping
  at eos and, in parallel mode, at `</guideline>`;
- fork: the pre-branch check is the scheduler's (1..max_branches `<plan>` since the stream's last
  `<guideline>`, depth < max_depth, else `on_bad_plan`); branch j is `prefix + <step> + label(j)`
  (inserted here, `forced_mask` True), seeded `stream_seed(stream_seed, fork, j)`, stopping at
  `</step>`, with SGLang's `repetition_penalty` (output tokens only: the step-local penalty). The
  radix cache shares the prefix's KV and positions continue from g+1: exact NPR branches.
- join (`join="causal"`): `prefix + branch_1 + ... + branch_m + <takeaway>` with a new derived
  seed. SGLang re-prefills the branches causally (branch 2 sees branch 1, the takeaway sits at
  g+1+sum of branch lengths), so every token sampled after a join is off-policy for NPR training;
  they are counted in `stats["off_policy_tokens"]`. The exact join needs the engine-side plugin
  (sglang_join_plugin.py), not yet validated on a GPU, so `join="exact"` is refused.

Exact against NPREngine (same weights, params and seeds), up to each sample's first join, when
the engine samples with our sampler (tests/fake_sglang.py): token ids, forced mask, positions,
finish reason, sampled-token log-probs, and the shared token budget (branches get generous caps
and the overrun is cut afterwards in the torch engine's lockstep order, `lockstep_cut`). Real
SGLang draws its seeded noise from (seed, position), not from a torch.Generator, so there the same
seeds give other samples from the same distributions. SGLang itself imposes two differences:
forced tokens get log-prob 0.0 (it never scores client-inserted tokens), and a branch's log-probs
are those of the repetition-penalised distribution (it penalises the logits before computing
log-probs; NPREngine reports the raw model's). Not exact: segments after a join or a refused plan
(derived seeds), and where a sample stops inside a block whose branches hold nested blocks (the
cut counts a branch's tokens in flattened order).
"""
from __future__ import annotations

import logging
import os
import sys
import time
from typing import Iterable

from torch import Tensor

from ..seeding import stream_seed
from ..topology import Layout, TopologyError, build_layout
from .backend import MEMORY_TAGS
from .npr_engine import prompt_token_ids
from .rollout import Rollout
from .sampling import SamplingParams
from .sglang_streams import Cursor, Job, Piece, Request, lockstep_cut, together
from .tensor_payload import serialize_bucket, sglang_classes
from .weight_transport import WeightMeta

logger = logging.getLogger(__name__)

SGLANG_PIN = "sglang==0.5.21"
SGLANG_DTYPES = {"auto": "auto", "fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # config -> ServerArgs
# Read by SGLang's sampler at import, in each scheduler process: log-probs of the logits before
# temperature scaling (after penalties), i.e. the raw model's at temperature 1 outside branches.
ORIGINAL_LOGPROB_ENV = "SGLANG_RETURN_ORIGINAL_LOGPROB"
EXACT_JOIN_REFUSED = ("join='exact' needs the SGLang exact-join plugin (megatron_npr/rollout/sglang_join_plugin.py), "
                      "which has not been validated on a GPU with SGLang 0.5.21; use join='causal' (off-policy "
                      "takeaways, counted in stats['off_policy_tokens'])")


def engine_args(model_dir, *, tp_size: int = 1, mem_fraction: float | None = None, seed: int = 0,
                **server_args) -> dict:
    """`sglang.Engine` keyword arguments for NPR rollouts (any ServerArgs field may be added)."""
    args = {"model_path": str(model_dir), "tp_size": tp_size, "random_seed": seed,
            "enable_memory_saver": True,  # release/resume_memory_occupation need torch_memory_saver
            "sampling_defaults": "openai",  # not the checkpoint's generation_config.json
            "skip_tokenizer_init": True,  # token ids in and out, never re-tokenized text
            "enable_deterministic_inference": True}  # without it `sampling_seed` is ignored
    if mem_fraction is not None:
        args["mem_fraction_static"] = mem_fraction
    return {**args, **server_args}


class SGLangBackend:
    """A `RolloutBackend` (backend.py) over an SGLang `Engine` (or anything with its API)."""

    def __init__(self, engine, vocab, *, join: str = "causal", tp_size: int = 1, flattened: bool | None = None):
        _check_join(join)
        self.engine, self.vocab, self.join, self.tp_size = engine, vocab, join, tp_size
        self.eos_ids = frozenset(vocab.eos_ids)
        # Flattened buckets need SGLang's FlattenedTensorBucket (or, against the test fake, ours).
        self.flattened = sglang_classes()[1] is not None if flattened is None else flattened
        self.weight_version: int | None = None
        self._released: set[str] = set()
        if os.environ.get(ORIGINAL_LOGPROB_ENV, "").lower() not in ("1", "true"):
            logger.warning("%s is not set: SGLang reports temperature-scaled log-probs unless the engine "
                           "was started with it (SGLangBackend.launch sets it)", ORIGINAL_LOGPROB_ENV)

    @classmethod
    def launch(cls, model_dir, *, tp_size: int = 1, mem_fraction: float | None = None, seed: int = 0,
               vocab=None, join: str = "causal", **server_args) -> "SGLangBackend":
        """Start `sglang.Engine` on `model_dir` (vocabulary from `load_vocab` unless given)."""
        _check_join(join)
        try:
            import sglang
        except Exception as e:  # noqa: BLE001 - missing, or broken on this machine (CUDA, triton)
            raise ImportError(f"the SGLang rollout backend needs {SGLANG_PIN}: pip install -e .[rollout] "
                              f"(import sglang failed: {e!r})") from e
        if getattr(sglang, "__version__", None) != SGLANG_PIN.split("==")[1]:
            logger.warning("SGLang %s found; this backend is written and tested against %s",
                           getattr(sglang, "__version__", "?"), SGLANG_PIN)
        if vocab is None:
            from ..data.tokenizer import load_vocab
            vocab = load_vocab(model_dir)
        os.environ[ORIGINAL_LOGPROB_ENV] = "1"  # before the scheduler processes start
        engine = sglang.Engine(**engine_args(model_dir, tp_size=tp_size, mem_fraction=mem_fraction, seed=seed,
                                             **server_args))
        return cls(engine, vocab, join=join, tp_size=tp_size)

    @classmethod
    def from_config(cls, engine, rollout, **server_args) -> "SGLangBackend":
        """From the RL config: the engine section's model, tokenizer and dtype, the rollout
        section's `tp` and `join`. (SGLang sizes its KV pool from memory, not from kv_slots.)"""
        return cls.launch(engine.hf_dir, tp_size=rollout.tp, vocab=engine.vocab(), join=rollout.join,
                          dtype=SGLANG_DTYPES[engine.dtype], **server_args)

    # ---------------------------------------------------------------- generate
    def generate(self, prompts: list[list[int]], params: SamplingParams, *,
                 seeds: list[int] | None = None) -> list[Rollout]:
        """`params.n` rollouts per prompt, prompt-major, seeded exactly as NPREngine seeds them."""
        if self._released & {"weights", "kv_cache"}:
            raise RuntimeError(f"generate after release_memory({sorted(self._released)}) without resume_memory")
        if not isinstance(prompts, (list, tuple)):
            raise ValueError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
        prompts = [prompt_token_ids(p, i, sys.maxsize) for i, p in enumerate(prompts)]
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds has {len(seeds)} entries for {len(prompts)} prompts")
        samples = []
        for i, prompt in enumerate(prompts):
            for k in range(params.n):
                seed = stream_seed(params.seed, i, k) if seeds is None else stream_seed(seeds[i], k)
                samples.append(self._sample(Job(f"prompt {i} sample {k}", params), prompt, seed))
        driver, answers = together(samples), None
        try:
            while True:
                answers = self._submit(driver.send(answers))
        except StopIteration as done:
            rollouts = done.value
        off = [r.stats["off_policy_tokens"] for r in rollouts]
        if any(r.stats["blocks"] for r in rollouts):
            logger.info("SGLang causal join: %d sampled tokens in %d of %d samples came after a join and are "
                        "off-policy for NPR training", sum(off), sum(x > 0 for x in off), len(rollouts))
        return rollouts

    def branch_seed(self, seed: int, fork: int, branch: int) -> int:
        """Branch `branch` of a stream's `fork`-th block: the torch scheduler's seed."""
        return stream_seed(seed, fork, branch)

    def _sample(self, job: Job, prompt: list[int], seed: int):
        piece = yield from self._stream(job, prompt, [], 0, seed, job.params.max_new_tokens, len(prompt), False,
                                        f"{job.name} trunk")
        return self._to_rollout(job, prompt, piece)

    def _stream(self, job, context, head, depth, seed, budget, npr_pos, off_policy, name):
        """One stream (trunk or branch): its forced `head`, then requests until it closes or
        finishes the sample; a `</guideline>` that passes the check forks a block (recursively)."""
        p, tags, cur = job.params, self.vocab.tags, Cursor(list(context), npr_pos, off_policy)
        for token in head:  # <step> + label: inserted here, never scored by SGLang
            cur.push(token, 0.0, True, tags)
            if len(cur.piece) >= budget:
                return cur.finish("length")
        requests = forks = 0
        while True:
            seg_seed = seed if requests == 0 else stream_seed(seed, requests, 0)  # j=0: never a branch's
            requests += 1
            request = self._request(job, cur.seq, depth, budget - len(cur.piece), seg_seed,
                                    f"{name} request {requests}")
            [answer] = yield [request]
            tokens, logprobs = self._check_answer(job, request, answer)
            for token, lp in zip(tokens, logprobs):
                cur.push(token, lp, False, tags)
            last, cut_short = tokens[-1], len(tokens) < request.params["max_new_tokens"]
            if last in self.eos_ids or (last not in request.stops and cut_short):  # or the model's own eos
                return cur.finish("stop" if depth == 0 else "invalid_structure", eos=True)
            if len(cur.piece) >= budget:
                return cur.finish("length")
            if last == tags["</step>"] and depth > 0:
                return cur.piece
            if not (1 <= cur.plans <= p.max_branches and depth < p.max_depth):  # the pre-branch check
                if p.on_bad_plan == "finish":
                    return cur.finish("invalid_structure")
                continue  # decode on sequentially, in a new request
            forks += 1
            if (yield from self._block(job, cur, depth, seed, forks, budget, name)):
                return cur.piece

    def _block(self, job, cur: "Cursor", depth, seed, fork, budget, name):
        """Fork `cur.plans` branches, cut them to the budget as NPREngine would, join them
        causally with a forced `<takeaway>`. Returns whether the sample finished."""
        tags, m, left, fork_pos = self.vocab.tags, cur.plans, budget - len(cur.piece), cur.npr_pos
        job.blocks.append(m)
        branches = yield from together([
            self._stream(job, cur.seq, [tags["<step>"], *self.vocab.label_ids(j)], depth + 1,
                         self.branch_seed(seed, fork, j), max(1, left - (m - 1)),  # siblings' <step>s come first
                         fork_pos, cur.off_policy, f"{name} block {fork} branch {j}") for j in range(1, m + 1)])
        kept, reason, eos_last = lockstep_cut(branches, left)
        for b, count in zip(branches, kept):
            cur.piece.take(b, count)
            cur.seq.extend(b.tokens[:count])
        if reason:
            cur.finish(reason, eos_last)
            return True
        cur.npr_pos, cur.off_policy = fork_pos + max(len(b) for b in branches), True  # SGLang joins causally
        cur.push(tags["<takeaway>"], 0.0, True, tags)
        if len(cur.piece) >= budget:
            cur.finish("length")
            return True
        return False

    def _request(self, job, seq, depth, max_new, seed, label) -> Request:
        p, tags = job.params, self.vocab.tags
        stops = set(self.eos_ids)
        if p.parallel and depth > 0:
            stops.add(tags["</step>"])
        if p.parallel and (depth < p.max_depth or p.on_bad_plan == "finish"):
            stops.add(tags["</guideline>"])  # a fork or a finish: decided here
        params = {"max_new_tokens": max_new, "temperature": p.temperature, "top_p": p.top_p, "top_k": p.top_k,
                  "stop_token_ids": sorted(stops), "sampling_seed": seed, "skip_special_tokens": False,
                  "no_stop_trim": True, "repetition_penalty": p.step_repetition_penalty if depth > 0 else 1.0}
        return Request(list(seq), params, f"{job.name}: {label}", frozenset(stops))

    def _submit(self, requests: list[Request]) -> list:
        out = self.engine.generate(input_ids=[r.input_ids for r in requests],
                                   sampling_params=[r.params for r in requests], return_logprob=True)
        if not isinstance(out, list) or len(out) != len(requests):
            raise RuntimeError(f"SGLang answered {len(out) if isinstance(out, list) else type(out).__name__} "
                               f"for a batch of {len(requests)} requests (first: {requests[0].label})")
        return out

    def _check_answer(self, job: Job, request: Request, answer) -> tuple[list[int], list[float]]:
        """The answer's sampled ids and log-probs, or an error naming the request."""
        def bad(why):
            return RuntimeError(f"malformed SGLang answer to {request.label}: {why}")

        if not isinstance(answer, dict) or not isinstance(answer.get("meta_info"), dict):
            raise bad(f"expected a dict with meta_info, got {type(answer).__name__}")
        meta, ids = answer["meta_info"], answer.get("output_ids")
        finish = meta.get("finish_reason")
        if not isinstance(finish, dict) or finish.get("type") not in ("stop", "length", "abort"):
            raise bad(f"finish_reason {finish!r}")
        if finish["type"] == "abort":
            raise RuntimeError(f"SGLang aborted {request.label}: {finish.get('message', finish)}")
        max_new, lps = request.params["max_new_tokens"], meta.get("output_token_logprobs")
        if not isinstance(ids, list) or not ids or len(ids) > max_new or \
                not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise bad(f"output_ids must be 1..{max_new} ints, got {ids!r:.200}")
        if finish["type"] == "length" and len(ids) != max_new:
            raise bad(f"a length finish after {len(ids)} of {max_new} tokens")
        if any(t in request.stops for t in ids[:-1]):
            raise bad("a stop token before the last output token")
        if not isinstance(lps, list) or len(lps) != len(ids) or \
                any(not isinstance(e, (list, tuple)) or len(e) < 2 or e[1] != t for e, t in zip(lps, ids)):
            raise bad("output_token_logprobs is not one (logprob, token id, ...) per output id")
        job.versions.append(meta.get("weight_version"))
        return ids, [float(e[0]) for e in lps]

    def _to_rollout(self, job: Job, prompt: list[int], piece: Piece) -> Rollout:
        p, ids, r0 = job.params, prompt + piece.tokens, len(prompt)
        reason, layout = piece.reason, None
        if reason == "stop" and not p.parallel:
            layout = Layout.causal(len(ids))
        elif reason == "stop":
            try:
                layout = build_layout(ids, self.vocab.tags, r0, p.max_depth)
            except TopologyError:
                reason = "invalid_structure"
            else:
                if layout.position_ids[r0:].tolist() != piece.npr_positions:
                    raise RuntimeError(f"backend bug: NPR positions differ from build_layout for {job.name}")
        versions = list(dict.fromkeys(job.versions))
        npr = piece.npr_positions
        stats = {"response_tokens": len(piece), "critical_path_tokens": (max(npr) + 1 - r0) if npr else 0,
                 "blocks": len(job.blocks), "branches_per_block": list(job.blocks),
                 "parallel_triggered": bool(job.blocks), "wall_time_s": time.perf_counter() - job.started,
                 "off_policy_tokens": sum(piece.off_policy),
                 "weight_version": versions[0] if len(versions) == 1 else versions}
        return Rollout(ids, r0, layout, list(piece.logprobs), list(piece.forced), list(range(r0)) + piece.positions,
                       reason, stats)

    # ---------------------------------------------------------------- weights and memory
    def begin_weight_update(self) -> None:
        self._call("begin_weight_update")

    def end_weight_update(self, version: int) -> None:
        """Close the session, flush the radix cache (its KV came from the old weights) and stamp
        `version` on later answers, as SGLang's own /update_weight_version handler does."""
        self._call("end_weight_update")
        self._call("flush_cache")
        server_args = getattr(getattr(self.engine, "tokenizer_manager", None), "server_args", None)
        if server_args is not None:
            server_args.weight_version = str(version)
        self.weight_version = version

    def update_weights(self, named_tensors: Iterable[tuple[str, Tensor]]) -> int:
        """The colocated tensor path (CUDA IPC on a GPU). Flattened: one payload per TP rank per
        dtype, the flat buffers kept alive through the call; otherwise the Engine serializes the
        (name, tensor) list once per TP rank itself. Returns the number of tensors."""
        bucket = list(named_tensors)
        if not self.flattened:
            if bucket:
                self._call("update_weights_from_tensor", bucket, load_format=None, flush_cache=False)
            return len(bucket)
        for dtype in dict.fromkeys(t.dtype for _, t in bucket):  # older buckets cannot mix dtypes
            payloads = serialize_bucket([(n, t) for n, t in bucket if t.dtype == dtype], self.tp_size, True)
            self._call("update_weights_from_tensor", payloads, load_format="flattened_bucket", flush_cache=False)
            del payloads  # only now may the flat buffer go
        return len(bucket)

    def join_weight_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int,
                          group_name: str = "weight_update_group", backend: str = "nccl") -> None:
        """Split placement: the engine's TP ranks join the trainer's weight group as ranks
        rank_offset..rank_offset+tp_size-1 (the trainer is rank 0)."""
        where = (f"weight group {group_name!r} at {master_address}:{master_port} (ranks {rank_offset}.."
                 f"{rank_offset + self.tp_size - 1} of {world_size})")
        try:
            result = self.engine.init_weights_update_group(master_address, master_port, rank_offset, world_size,
                                                           group_name=group_name, backend=backend)
        except Exception as e:  # noqa: BLE001 - re-raised with the address
            raise RuntimeError(f"SGLang could not join {where}: {e}") from e
        ok, message = _outcome(result)
        if not ok:
            raise RuntimeError(f"SGLang could not join {where}: {message}")

    def receive_weights(self, metas: list[WeightMeta], flattened: bool,
                        group_name: str = "weight_update_group") -> int:
        """One bucket over the group: SGLang allocates from `metas` and receives rank 0's broadcast."""
        self._call("update_weights_from_distributed", [m.name for m in metas], [m.dtype for m in metas],
                   [list(m.shape) for m in metas], group_name=group_name, flush_cache=False,
                   load_format="flattened_bucket" if flattened else None)
        return len(metas)

    def release_memory(self, tags: list[str] | None = None) -> None:
        self._call("release_memory_occupation", tags=tags)
        self._released |= set(tags or MEMORY_TAGS)

    def resume_memory(self, tags: list[str] | None = None) -> None:
        self._call("resume_memory_occupation", tags=tags)
        self._released -= set(tags or MEMORY_TAGS)

    def close(self) -> None:
        self.engine.shutdown()

    def _call(self, method: str, *args, **kwargs):
        ok, message = _outcome(getattr(self.engine, method)(*args, **kwargs))
        if not ok:
            raise RuntimeError(f"SGLang {method} failed: {message}")


def _check_join(join: str) -> None:
    if join != "causal":
        raise ValueError(EXACT_JOIN_REFUSED if join == "exact" else f"join must be 'causal', got {join!r}")


def _outcome(result) -> tuple[bool, str]:
    """(success, message) from whatever an Engine control call returns."""
    if isinstance(result, tuple) and result and isinstance(result[0], bool):
        return result[0], str(result[1]) if len(result) > 1 else ""
    if isinstance(result, dict) and "success" in result:
        return bool(result["success"]), str(result.get("message", ""))
    if hasattr(result, "success"):
        return bool(result.success), str(getattr(result, "message", ""))
    return result is not False, ""
