"""The Llama-family forward pass (Llama, SmolLM2, Qwen2) over a paged KV cache.

One call runs a whole engine step: every scheduled sequence's new tokens (a prefill chunk or one
decode token) are flattened into one row of tokens, so the projections and the MLP are single
matrix multiplications across the batch. Only attention is per sequence: decodes (one query
each) share one padded attention call, and each prefill chunk gets its own, which keeps padding
waste low when a 256-token chunk shares a step with one-token decodes.

The weights are the loaded `transformers` model's own tensors (q/k/v and gate/up fused once at
load), so a GGUF or a local Hugging Face directory works through the same config fields;
Qwen2's q/k/v bias rides along in the fused projection.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class SeqBatch:
    """Where one sequence's new tokens sit in the flattened step, and where its KV lives."""

    start: int  # First position (in the sequence) of the new tokens.
    count: int  # How many new tokens it has in this step.
    slots: torch.Tensor  # Cache slot of every position 0..start+count-1: long, on the CPU.
    wants_logits: bool  # Whether the last new token's logits are needed (it samples).


@dataclass(frozen=True)
class _Layer:
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    o_bias: torch.Tensor | None
    gate_up: torch.Tensor
    down: torch.Tensor
    attn_norm: torch.Tensor
    mlp_norm: torch.Tensor


class LlamaForward:
    """A model's weights laid out for batched steps, and the paged KV cache they fill."""

    def __init__(self, hf_model, num_blocks: int, block_size: int) -> None:
        config = hf_model.config
        assert config.hidden_act == "silu", f"unsupported activation {config.hidden_act}"
        self.device = hf_model.device
        self.dtype = hf_model.dtype
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or (config.hidden_size // self.num_heads)
        self.eps = config.rms_norm_eps
        self.block_size = block_size
        self.num_blocks = num_blocks
        body = hf_model.model
        self.embed = body.embed_tokens.weight
        self.final_norm = body.norm.weight
        self.lm_head = hf_model.lm_head.weight
        # transformers' own rotary module computes cos/sin with whatever rope scaling the
        # config declares (Llama 3's, linear, dynamic), so ours cannot drift from it.
        self.rotary = body.rotary_emb
        self.layers = [self._fuse(layer) for layer in body.layers]
        # One tensor for every layer's keys and values: [layer, k|v, slot, kv head, head dim].
        self.kv = torch.zeros(
            (len(self.layers), 2, num_blocks * block_size, self.num_kv_heads, self.head_dim),
            dtype=self.dtype,
            device=self.device,
        )

    @staticmethod
    def bytes_per_block(hf_model, block_size: int) -> int:
        config = hf_model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        element = torch.finfo(hf_model.dtype).bits // 8
        return config.num_hidden_layers * 2 * block_size * kv_heads * head_dim * element

    @staticmethod
    def _fuse(layer) -> _Layer:
        attn, mlp = layer.self_attn, layer.mlp
        assert mlp.gate_proj.bias is None, "MLP biases are not supported"
        biases = [attn.q_proj.bias, attn.k_proj.bias, attn.v_proj.bias]
        return _Layer(
            qkv=torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]),
            qkv_bias=None if biases[0] is None else torch.cat(biases),
            o=attn.o_proj.weight,
            o_bias=attn.o_proj.bias,
            gate_up=torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]),
            down=mlp.down_proj.weight,
            attn_norm=layer.input_layernorm.weight,
            mlp_norm=layer.post_attention_layernorm.weight,
        )

    @torch.inference_mode()
    def step(self, token_ids: list[int], seqs: list[SeqBatch]) -> torch.Tensor:
        """Run the new tokens of `seqs` (concatenated in `token_ids`), writing their KV into
        the cache; return float32 logits [n, vocab] for each sequence that wants them, in
        order."""
        assert len(token_ids) == sum(s.count for s in seqs)
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        positions = torch.cat(
            [torch.arange(s.start, s.start + s.count, device=self.device) for s in seqs]
        )
        new_slots = torch.cat([s.slots[s.start : s.start + s.count] for s in seqs]).to(self.device)
        hidden = F.embedding(ids, self.embed)
        cos, sin = self.rotary(hidden[None], positions[None])
        cos, sin = cos[0][:, None, :], sin[0][:, None, :]
        attention = _AttentionPlan(seqs, self.device)
        for index, layer in enumerate(self.layers):
            hidden = hidden + self._attention(index, layer, hidden, cos, sin, new_slots, attention)
            hidden = hidden + self._mlp(layer, hidden)
        last = [i for i, s in zip(attention.last_rows, seqs, strict=True) if s.wants_logits]
        if not last:
            return torch.empty((0, self.lm_head.shape[0]), device=self.device)
        hidden = _rms_norm(hidden[last], self.final_norm, self.eps)
        return (hidden @ self.lm_head.T).float()

    def _attention(self, index, layer, hidden, cos, sin, new_slots, plan) -> torch.Tensor:
        tokens = hidden.shape[0]
        x = _rms_norm(hidden, layer.attn_norm, self.eps)
        qkv = F.linear(x, layer.qkv, layer.qkv_bias)
        q_size = self.num_heads * self.head_dim
        kv_size = self.num_kv_heads * self.head_dim
        q, k, v = qkv.split([q_size, kv_size, kv_size], dim=-1)
        q = _rope(q.view(tokens, self.num_heads, self.head_dim), cos, sin)
        k = _rope(k.view(tokens, self.num_kv_heads, self.head_dim), cos, sin)
        cache = self.kv[index]
        cache[0].index_copy_(0, new_slots, k)
        cache[1].index_copy_(0, new_slots, v.view(tokens, self.num_kv_heads, self.head_dim))
        out = torch.empty_like(q)
        for group in plan.groups:
            keys = cache[0][group.slots].transpose(1, 2)  # [b, kv heads, ctx, dim]
            values = cache[1][group.slots].transpose(1, 2)
            queries = q[group.rows].transpose(1, 2)  # [b, heads, q, dim]
            attended = F.scaled_dot_product_attention(
                queries, keys, values, attn_mask=group.mask, enable_gqa=True
            )
            out[group.rows.flatten()] = attended.transpose(1, 2).flatten(0, 1)
        return F.linear(out.flatten(1), layer.o, layer.o_bias)

    def _mlp(self, layer, hidden) -> torch.Tensor:
        x = _rms_norm(hidden, layer.mlp_norm, self.eps)
        gate, up = F.linear(x, layer.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, layer.down)


@dataclass(frozen=True)
class _Group:
    """One attention call. Queries are never padded (a group is either one-token decodes or a
    single chunk); only the keys are, up to the longest context in the group."""

    rows: torch.Tensor  # [b, q] indices into the step's flattened tokens.
    slots: torch.Tensor  # [b, ctx] cache slots (padding repeats slot 0, masked out).
    mask: torch.Tensor  # [b, 1, q, ctx] True where a query may attend a key.


class _AttentionPlan:
    """The attention groups of one step, built once and reused by every layer: all one-token
    decodes together, and every multi-token chunk on its own."""

    def __init__(self, seqs: list[SeqBatch], device) -> None:
        offsets, offset = [], 0
        for s in seqs:
            offsets.append(offset)
            offset += s.count
        self.last_rows = [o + s.count - 1 for o, s in zip(offsets, seqs, strict=True)]
        decodes = [(o, s) for o, s in zip(offsets, seqs, strict=True) if s.count == 1]
        chunks = [[(o, s)] for o, s in zip(offsets, seqs, strict=True) if s.count > 1]
        self.groups = [_group(group, device) for group in ([decodes] if decodes else []) + chunks]


def _group(members: list[tuple[int, SeqBatch]], device) -> _Group:
    width_q = max(s.count for _, s in members)
    width_ctx = max(s.start + s.count for _, s in members)
    assert all(s.count == width_q for _, s in members), "queries are never padded"
    rows = torch.zeros((len(members), width_q), dtype=torch.long)
    slots = torch.zeros((len(members), width_ctx), dtype=torch.long)
    mask = torch.zeros((len(members), 1, width_q, width_ctx), dtype=torch.bool)
    for b, (offset, s) in enumerate(members):
        ctx = s.start + s.count
        rows[b] = torch.arange(offset, offset + s.count)
        slots[b, :ctx] = s.slots[:ctx].cpu()
        # Query i sits at position start+i and sees every key up to and including itself.
        query_pos = torch.arange(s.start, ctx)[:, None]
        mask[b, 0, :, :ctx] = torch.arange(ctx)[None, :] <= query_pos
    return _Group(rows.to(device), slots.to(device), mask.to(device))


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # In float32 whatever the model's dtype, as transformers' LlamaRMSNorm does.
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)
