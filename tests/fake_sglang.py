"""A CPU stand-in for SGLang 0.5.21's offline `Engine`, honouring the contract of
shared/research/sglang_backend.md section 6, with our torch Qwen3 (rollout/qwen3_torch.py) underneath.

Sampling draws exactly as the torch scheduler does (`sample_token` on `penalise`d logits with a
`torch.Generator` seeded by `sampling_seed`), so a request seeded like one of NPREngine's streams
produces that stream's tokens. Like SGLang: `output_ids` end with the matched stop token; a length
finish (checked first) returns exactly `max_new_tokens` ids; `ignore_eos` disables every token stop;
the repetition penalty counts the request's output tokens only and the reported log-probs are of
the penalised logits (before temperature when SGLANG_RETURN_ORIGINAL_LOGPROB is set, after it
otherwise); `sampling_seed` is honoured only with `enable_deterministic_inference` (42 when absent).
`kv_hints` are accepted and ignored, as unpatched SGLang does: a join is causal.

`write_markov_qwen3` builds a one-layer Qwen3 whose next token mostly depends on the current one
(a table), plus a small attention term so that context and positions still matter.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from types import SimpleNamespace

import torch

from megatron_npr.models.qwen3_hf import EMBED, FINAL_NORM, LM_HEAD, layer_prefix
from megatron_npr.rollout.qwen3_torch import KVCache, Qwen3Weights, forward
from megatron_npr.rollout.sampling import SamplingParams, penalise, sample_token
from megatron_npr.rollout.tensor_payload import deserialize_payload, serialize_bucket

SERVER_ARGS = {  # a subset of ServerArgs' fields, with SGLang's defaults
    "model_path": None, "tokenizer_path": None, "load_format": "auto", "dtype": "auto", "tp_size": 1, "dp_size": 1,
    "pp_size": 1, "mem_fraction_static": None, "max_total_tokens": None, "context_length": None,
    "enable_memory_saver": False, "enable_weights_cpu_backup": False, "base_gpu_id": 0, "gpu_id_step": 1,
    "nnodes": 1, "node_rank": 0, "dist_init_addr": None, "port": 30000, "nccl_port": None,
    "skip_tokenizer_init": False, "random_seed": None, "disable_radix_cache": False, "page_size": 1,
    "enable_deterministic_inference": False, "sampling_defaults": "model", "sampling_backend": None,
    "attention_backend": None, "disable_cuda_graph": False, "enable_custom_logit_processor": False,
    "weight_version": "default", "log_level": "error", "trust_remote_code": False,
}
SAMPLING_KEYS = {"max_new_tokens": 128, "temperature": None, "top_p": None, "top_k": None, "min_p": None,
                 "repetition_penalty": 1.0, "stop_token_ids": None, "ignore_eos": False, "n": 1,
                 "sampling_seed": None, "skip_special_tokens": True, "no_stop_trim": False, "stop": None,
                 "regex": None, "json_schema": None, "ebnf": None, "frequency_penalty": 0.0,
                 "presence_penalty": 0.0, "min_new_tokens": 0, "logit_bias": None, "custom_params": None}
MEMORY_TAGS = ("weights", "kv_cache", "cuda_graph")
NOT_IN_SESSION = "update_weights_* must run between begin_weight_update() and end_weight_update()"


class FakeEngine:
    def __init__(self, **server_args):
        unknown = sorted(set(server_args) - set(SERVER_ARGS))
        if unknown:
            raise TypeError(f"ServerArgs got unexpected keyword argument(s) {unknown}")
        if not server_args.get("model_path"):
            raise TypeError("ServerArgs needs model_path")
        self.server_args = SimpleNamespace(**{**SERVER_ARGS, **server_args})
        self.tokenizer_manager = SimpleNamespace(server_args=self.server_args, abort_request=self._abort_request)
        folder = Path(self.server_args.model_path)
        eos = json.loads((folder / "config.json").read_text()).get("eos_token_id")
        self.eos_ids = frozenset(eos if isinstance(eos, list) else [] if eos is None else [eos])
        self.weights = Qwen3Weights.from_hf(folder)
        self.cache = KVCache(self.weights.spec, self.server_args.max_total_tokens or 4096)
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": -1, "min_p": 0.0}
        gen_config = folder / "generation_config.json"
        if self.server_args.sampling_defaults == "model" and gen_config.is_file():
            model_defaults = json.loads(gen_config.read_text())
            self.defaults.update({k: model_defaults[k] for k in self.defaults if k in model_defaults})
        self.original_logprob = os.environ.get("SGLANG_RETURN_ORIGINAL_LOGPROB", "").lower() in ("1", "true")
        self.state, self.released, self.session, self.shut = "idle", set(), False, False
        self.prefixes: list[tuple[int, ...]] = []  # the radix cache's token sequences
        self.groups: dict = {}
        self.received: list[list[list]] = []  # per update call, per TP rank: [(name, tensor)] as received
        self.group_timeout_s = 30.0
        self.on_token = None  # test hook: on_token(rid, output_ids) after every sampled token
        self._seeds = torch.Generator().manual_seed(self.server_args.random_seed or 0)
        self._abort_all, self._abort_rids = False, set()

    # ---------------------------------------------------------------- generate
    def generate(self, prompt=None, sampling_params=None, input_ids=None, return_logprob=False,
                 logprob_start_len=None, rid=None, kv_hints=None, session_params=None, stream=False):
        if prompt is not None or stream or session_params is not None:
            raise NotImplementedError("the fake takes input_ids only, without streaming or sessions")
        if self.released & {"weights", "kv_cache"}:
            raise RuntimeError(f"generate while {sorted(self.released)} are released")
        single = isinstance(input_ids[0], int)
        batch = [input_ids] if single else input_ids
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params or {}] * len(batch)
        rids = rid if isinstance(rid, list) else [rid] * len(batch)
        self.state, self._abort_all, self._abort_rids = "generating", False, set()
        try:
            outs = [self._one(list(ids), sp, r or uuid.uuid4().hex, return_logprob)
                    for ids, raw, r in zip(batch, params, rids) for sp in [self._resolve(raw)] for _ in range(sp["n"])]
        finally:
            self.state, self._abort_all, self._abort_rids = "idle", False, set()
        return outs[0] if single and len(outs) == 1 else outs

    def _resolve(self, raw: dict) -> dict:
        unknown = sorted(set(raw) - set(SAMPLING_KEYS))
        if unknown:
            raise TypeError(f"SamplingParams got unexpected keyword argument(s) {unknown}")
        sp = {**SAMPLING_KEYS, **{k: v for k, v in self.defaults.items()}, **{k: v for k, v in raw.items()}}
        for key in ("stop", "regex", "json_schema", "ebnf", "logit_bias", "custom_params"):
            if sp[key] is not None:
                raise NotImplementedError(f"the fake does not implement sampling param {key!r}")
        if sp["min_p"] or sp["frequency_penalty"] or sp["presence_penalty"] or sp["min_new_tokens"]:
            raise NotImplementedError("the fake does not implement min_p or frequency/presence/min-token penalties")
        return sp

    def _one(self, ids: list[int], sp: dict, rid: str, return_logprob: bool) -> dict:
        seed = (42 if sp["sampling_seed"] is None else sp["sampling_seed"]) \
            if self.server_args.enable_deterministic_inference else int(torch.randint(1 << 62, (), generator=self._seeds))
        generator, sampler = torch.Generator().manual_seed(seed), SamplingParams(
            temperature=sp["temperature"], top_p=sp["top_p"], top_k=sp["top_k"])
        stops = set(sp["stop_token_ids"] or []) | self.eos_ids
        cached, out, lps, finish = self._cached(ids), [], [], {"type": "length", "length": sp["max_new_tokens"]}
        if len(ids) + sp["max_new_tokens"] > self.cache.num_slots:
            raise ValueError(f"request {rid}: {len(ids)} + {sp['max_new_tokens']} tokens exceed the KV cache")
        logits, seen = self._prefill(ids), torch.zeros(self.weights.spec.vocab_size, dtype=torch.bool)
        while len(out) < sp["max_new_tokens"]:
            scored = penalise(logits, seen, sp["repetition_penalty"])
            token = sample_token(scored, sampler, generator)
            scale = 1.0 if self.original_logprob or sp["temperature"] == 0 else sp["temperature"]
            out.append(token)
            lps.append(float(torch.log_softmax(scored / scale, -1)[token]))
            seen[token] = True
            if self.on_token:
                self.on_token(rid, out)
            if self._abort_all or rid in self._abort_rids:
                finish = {"type": "abort", "message": "Abort in flight", "status_code": 499, "err_type": None}
                break
            if len(out) >= sp["max_new_tokens"]:
                break  # SGLang checks the length before stop tokens
            if not sp["ignore_eos"] and token in stops:
                finish = {"type": "stop", "matched": token}
                break
            logits = self._decode(token, len(ids) + len(out) - 1)
        self._insert(ids + out[:-1])  # the tree holds only KV that was computed
        meta = {"id": rid, "finish_reason": finish, "prompt_tokens": len(ids), "completion_tokens": len(out),
                "cached_tokens": cached, "weight_version": self.server_args.weight_version}
        if return_logprob:
            meta["output_token_logprobs"] = [(lp, t, None) for lp, t in zip(lps, out)]
        answer = {"output_ids": out, "meta_info": meta}
        if not self.server_args.skip_tokenizer_init:
            answer["text"] = " ".join(map(str, out))  # no tokenizer here: a stand-in text
        return answer

    def _prefill(self, ids: list[int]) -> torch.Tensor:
        n, idx = len(ids), torch.arange(len(ids))
        return forward(self.weights, self.cache, torch.tensor(ids), idx, idx, idx.expand(n, n), idx + 1)[-1]

    def _decode(self, token: int, pos: int) -> torch.Tensor:
        return forward(self.weights, self.cache, torch.tensor([token]), torch.tensor([pos]), torch.tensor([pos]),
                       torch.arange(pos + 1)[None], torch.tensor([pos + 1]))[0]

    def _cached(self, ids: list[int]) -> int:
        best = 0
        for seq in self.prefixes:
            n = 0
            while n < min(len(seq), len(ids)) and seq[n] == ids[n]:
                n += 1
            best = max(best, n)
        return min(best, len(ids) - 1)  # SGLang recomputes at least the last input token

    def _insert(self, seq: list[int]) -> None:
        if not self.server_args.disable_radix_cache and seq:
            self.prefixes.append(tuple(seq))

    def _abort_request(self, rid: str = "", abort_all: bool = False) -> None:
        if abort_all:
            self._abort_all = True
        elif rid:
            self._abort_rids.add(rid)

    # ---------------------------------------------------------------- memory and cache
    def release_memory_occupation(self, tags=None):
        if self.state != "idle":
            raise RuntimeError("release_memory_occupation needs an idle scheduler")
        tags = set(MEMORY_TAGS if tags is None else tags)
        if tags - set(MEMORY_TAGS):
            raise ValueError(f"unknown memory tags {sorted(tags - set(MEMORY_TAGS))}")
        self.released |= tags
        if "kv_cache" in tags:
            self.prefixes.clear()

    def resume_memory_occupation(self, tags=None):
        self.released -= set(MEMORY_TAGS if tags is None else tags)

    def flush_cache(self):
        if self.state != "idle":
            return SimpleNamespace(success=False, message="cannot flush with requests in flight")
        self.prefixes.clear()
        return SimpleNamespace(success=True, message="")

    def shutdown(self):
        self.shut = True

    # ---------------------------------------------------------------- weights
    def begin_weight_update(self, selector: str = "all"):
        if self.session:
            return False, "a weight-update session is already open; call end_weight_update() first"
        self.session = True
        return True, "Success"

    def end_weight_update(self):
        if not self.session:
            return False, "no weight-update session is open; call begin_weight_update() first"
        self.session = False
        return True, "Success"

    def _refuse_update(self):
        if not self.session:
            return False, NOT_IN_SESSION
        if "weights" in self.released:
            return False, "weights are released: resume_memory_occupation(['weights']) first"
        return None

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        if refused := self._refuse_update():
            return refused
        tp = self.server_args.tp_size
        # The Engine serializes a plain bucket once per TP rank; a flattened one arrives serialized.
        payloads = named_tensors if load_format == "flattened_bucket" else serialize_bucket(named_tensors, tp, False)
        if len(payloads) != tp:
            return False, f"{len(payloads)} payloads for tp_size {tp}"
        per_rank = [deserialize_payload(payloads[r]) for r in range(tp)]  # each rank reads its own entry
        self.received.append(per_rank)
        self.weights.update(per_rank[0])  # every rank holds full tensors; rank 0 stands for the model
        if flush_cache:
            self.flush_cache()
        return True, "Success"

    def init_weights_update_group(self, master_address, master_port, rank_offset, world_size,
                                  group_name="weight_update_group", backend="nccl"):
        from megatron_npr.distributed import init_weight_group

        if group_name in self.groups:
            raise ValueError(f"The specified group name {group_name!r} has already been created")
        if self.server_args.tp_size != 1:
            raise NotImplementedError("the fake joins a weight group as one TP rank only")
        try:
            group = init_weight_group(master_address, master_port, world_size, rank_offset, group_name, backend,
                                      timeout_s=self.group_timeout_s)
        except Exception as e:  # noqa: BLE001 - SGLang reports the failure instead of raising
            return False, f"Failed to initialize custom process group: {e}."
        self.groups[group_name] = group
        return True, "Succeeded to initialize custom process group."

    def destroy_weights_update_group(self, group_name="weight_update_group"):
        import torch.distributed as dist

        if group_name not in self.groups:
            return False, f"weight update group {group_name!r} does not exist"
        dist.destroy_process_group(self.groups.pop(group_name))
        return True, "Succeeded to destroy custom process group."

    def update_weights_from_distributed(self, names, dtypes, shapes, group_name="weight_update_group",
                                        flush_cache=True, load_format=None):
        if refused := self._refuse_update():
            return refused
        if group_name not in self.groups:
            return False, f"weight update group {group_name!r} is not initialized"
        # Written from section 2b; imported only here, in a worker process (the module sets warning filters).
        from workers.weight_group import sglang_like_receive
        received = sglang_like_receive(names, dtypes, shapes, self.groups[group_name], load_format == "flattened_bucket")
        self.received.append([received])
        self.weights.update(received)
        if flush_cache:
            self.flush_cache()
        return True, "Succeeded to update parameter online."


def write_markov_qwen3(folder, table: torch.Tensor, eos_id: int, *, attention: float = 0.5,
                       context_dims: int = 16, seed: int = 0) -> dict:
    """A one-layer Qwen3 (hidden size = vocabulary) whose logits given current token t are about
    `table[t]`: one-hot embeddings, MLP off, final norm 1/sqrt(V). Attention writes into the last
    `context_dims` hidden dims (ids never emitted), which a random slice of lm_head reads, so the
    context and positions move logits by roughly `attention`. Returns the HF config."""
    from safetensors.torch import save_file

    vocab, g = table.shape[0], torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, ffn = 2, 1, 16, 8
    config = {"model_type": "qwen3", "architectures": ["Qwen3ForCausalLM"], "vocab_size": vocab,
              "hidden_size": vocab, "intermediate_size": ffn, "num_hidden_layers": 1,
              "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
              "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
              "eos_token_id": eos_id, "max_position_embeddings": 4096, "torch_dtype": "float32"}
    lm_head = table.t().clone().float()  # row v: logit of v for each current token
    lm_head[:, -context_dims:] = torch.randn(vocab, context_dims, generator=g) / math.sqrt(context_dims)
    o_proj = torch.zeros(vocab, heads * head_dim)
    o_proj[-context_dims:] = torch.randn(context_dims, heads * head_dim, generator=g) * attention / math.sqrt(
        heads * head_dim)

    def rand(*shape):
        return torch.randn(*shape, generator=g) / math.sqrt(shape[-1])

    p = layer_prefix(0)
    tensors = {EMBED: torch.eye(vocab), FINAL_NORM: torch.full((vocab,), 1 / math.sqrt(vocab)), LM_HEAD: lm_head,
               p + "input_layernorm.weight": torch.ones(vocab), p + "post_attention_layernorm.weight": torch.ones(vocab),
               p + "self_attn.q_proj.weight": rand(heads * head_dim, vocab),
               p + "self_attn.k_proj.weight": rand(kv_heads * head_dim, vocab),
               p + "self_attn.v_proj.weight": rand(kv_heads * head_dim, vocab), p + "self_attn.o_proj.weight": o_proj,
               p + "self_attn.q_norm.weight": torch.ones(head_dim), p + "self_attn.k_norm.weight": torch.ones(head_dim),
               p + "mlp.gate_proj.weight": rand(ffn, vocab), p + "mlp.up_proj.weight": rand(ffn, vocab),
               p + "mlp.down_proj.weight": torch.zeros(vocab, ffn)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "model.safetensors"))
    return config
