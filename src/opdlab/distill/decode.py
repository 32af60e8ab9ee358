"""Fast decoding for Llama-family models: the same numbers as `model.generate`, fewer operations per token.

    reason = unsupported_reason(model)          # None when the fast path applies
    out_BT = decode(model, ids_BP, attn_BP, max_new_tokens=16, eos_ids=[2], pad_id=0, pick=greedy_pick)

Why: on a CPU, a small model's decode step is mostly per-operation overhead. `generate` runs every
token through the whole module stack (module calls, the mask builder, the rotary module, a key/value
cache that grows by concatenation, logits processors, stopping criteria); for the built-in pair
that overhead is about two thirds of a decode layer's time.

How:
1. Prefill: the model's own forward on the prompts (the same call `generate` makes: position ids
   from the attention mask, `logits_to_keep=1`), with a `DynamicCache`; once per distinct prompt
   when each prompt is sampled several times.
2. The prompt keys and values are copied once into preallocated buffers of the final length
   (prompt + `max_new_tokens`); each decode step writes one column and attends to a view of the
   filled part, so nothing is reallocated or copied per token.
3. Each decode step is one function over the layer weights: for small models the query/key/value
   projections as one matrix product (their weights concatenated once per call, while that copy is
   under `FUSE_MAX_BYTES`), gate/up as one; the same
   elementwise operations, in the same order, as the transformers modules (RMSNorm in float32,
   rotary embedding, SDPA with the padding mask, SiLU-gated MLP). Rotary cos/sin for every step
   come from the model's own rotary module, computed once.
4. `pick(logits_BV, position)` chooses each step's tokens (greedy, or the seeded sampler);
   finished rows get `pad_id` and the loop stops when every row has produced an EOS, as
   `generate` does.

The result is bit-identical to `generate` in float32 (tests/unit/test_decode.py compares every
step's logits and the tokens) for the model types in `SUPPORTED` with full attention and a static
rotary embedding. Anything else — another architecture, sliding-window layers, a dynamic rotary
scaling, FSDP-sharded parameters, module hooks, a non-SDPA attention implementation — returns a
reason from `unsupported_reason` and `roll_out` uses `generate`.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

# model_type -> whether its attention has per-head q/k RMSNorm (Qwen3)
SUPPORTED = {"llama": False, "mistral": False, "qwen2": False, "qwen3": True}


def unsupported_reason(model: Any) -> str | None:
    """Why the fast path cannot decode `model` (None when it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED:
        return f"model type {model_type!r} (fast decoding covers {', '.join(sorted(SUPPORTED))})"
    if getattr(config, "_attn_implementation", None) != "sdpa":
        return f"attention implementation {getattr(config, '_attn_implementation', None)!r} (fast decoding mirrors sdpa)"
    if getattr(config, "hidden_act", "silu") != "silu" or getattr(config, "pretraining_tp", 1) != 1:
        return "activation other than silu, or pretraining_tp > 1"
    layer_types = getattr(config, "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types) or (
            getattr(config, "sliding_window", None) is not None and getattr(config, "use_sliding_window", True)
            and model_type == "mistral"):
        return "sliding-window attention layers"
    core = getattr(model, "model", None)
    rotary = getattr(core, "rotary_emb", None)
    rope_type = str(getattr(rotary, "rope_type", "default"))
    if rotary is None or "dynamic" in rope_type or rope_type == "longrope":
        return f"rotary embedding {rope_type!r} changes with the sequence length"
    layers = getattr(core, "layers", None)
    if layers is None or getattr(model, "lm_head", None) is None:
        return "no model.layers / lm_head"
    for module in model.modules():
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return "forward hooks on the model (offloading, FSDP or instrumentation)"
    if any(type(p).__name__ == "DTensor" for p in model.parameters()):
        return "FSDP-sharded parameters"
    for layer in layers:
        attn, mlp = layer.self_attn, layer.mlp
        if any(not isinstance(getattr(attn, n, None), torch.nn.Linear) for n in ("q_proj", "k_proj", "v_proj", "o_proj")) \
                or any(not isinstance(getattr(mlp, n, None), torch.nn.Linear) for n in ("gate_proj", "up_proj", "down_proj")):
            return "a layer without the Llama projections"
        if SUPPORTED[model_type] != (hasattr(attn, "q_norm") and hasattr(attn, "k_norm")):
            return "unexpected per-head q/k norms"
    return None


def _rms_norm(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """transformers' LlamaRMSNorm, op for op."""
    x32 = x.to(torch.float32)
    variance = x32.pow(2).mean(-1, keepdim=True)
    x32 = x32 * torch.rsqrt(variance + eps)
    return weight * x32.to(x.dtype)


def _rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


# Concatenating q/k/v and gate/up copies those weights once per `decode` call: worth it while the copy
# is small next to the per-product overhead it saves (small models), not for large ones.
FUSE_MAX_BYTES = 32 * 2**20


def _cat(parts: list[Tensor | None], fuse: bool) -> list[Tensor | None]:
    """[one concatenated tensor] when fusing, else the parts themselves (None for absent biases)."""
    if any(p is None for p in parts):
        if not all(p is None for p in parts):
            raise ValueError("projections with and without bias")
        return [None] if fuse else list(parts)
    return [torch.cat(parts)] if fuse else list(parts)


class _Layer:
    """One decoder layer's weights; with `fuse`, q/k/v and gate/up concatenated for one product each."""

    def __init__(self, layer: Any, per_head_norm: bool, fuse: bool) -> None:
        attn, mlp = layer.self_attn, layer.mlp
        projections = (attn.q_proj, attn.k_proj, attn.v_proj)
        self.qkv_w = _cat([p.weight for p in projections], fuse)
        self.qkv_b = _cat([p.bias for p in projections], fuse)
        self.split = [p.out_features for p in projections]
        self.o_w, self.o_b = attn.o_proj.weight, attn.o_proj.bias
        self.gate_up_w = _cat([mlp.gate_proj.weight, mlp.up_proj.weight], fuse)
        self.gate_up_b = _cat([mlp.gate_proj.bias, mlp.up_proj.bias], fuse)
        self.intermediate = mlp.gate_proj.out_features
        self.down_w, self.down_b = mlp.down_proj.weight, mlp.down_proj.bias
        self.norm1 = (layer.input_layernorm.weight, layer.input_layernorm.variance_epsilon)
        self.norm2 = (layer.post_attention_layernorm.weight, layer.post_attention_layernorm.variance_epsilon)
        self.q_norm = (attn.q_norm.weight, attn.q_norm.variance_epsilon) if per_head_norm else None
        self.k_norm = (attn.k_norm.weight, attn.k_norm.variance_epsilon) if per_head_norm else None
        self.head_dim = attn.head_dim
        self.groups = attn.num_key_value_groups
        self.scaling = attn.scaling


def _products(x: Tensor, weights: list[Tensor | None], biases: list[Tensor | None], widths: list[int]) -> list[Tensor]:
    """x times each projection: one product split by `widths` (fused weights), or one product each."""
    if len(weights) == 1:
        return list(F.linear(x, weights[0], biases[0]).split(widths, dim=-1))
    return [F.linear(x, w, b) for w, b in zip(weights, biases)]


def _attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, layer: _Layer) -> Tensor:
    """transformers' sdpa_attention_forward for one query position: [B, H, 1, D] -> [B, 1, H, D]."""
    kwargs: dict[str, Any] = {}
    batch = q.shape[0]
    if layer.groups > 1:
        if mask is None and k.shape[-1] <= 256:
            kwargs["enable_gqa"] = True
        else:  # pack_gqa: the query heads of one key/value head become its query rows
            q = q.reshape(batch, q.shape[1] // layer.groups, layer.groups, q.shape[-1])
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=0.0, scale=layer.scaling,
                                         is_causal=False, **kwargs)
    return out.reshape(batch, -1, 1, v.shape[-1]).transpose(1, 2).contiguous()


class _Decoder:
    """Decode state of one batch: layer weights, key/value buffers, rotary tables, padding mask."""

    def __init__(self, model: Any, per_head_norm: bool) -> None:
        core = model.model
        self.core, self.lm_head = core, model.lm_head
        layers = core.layers[: model.config.num_hidden_layers]
        fused_bytes = sum(p.weight.numel() * p.weight.element_size() for layer in layers
                          for p in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                                    layer.mlp.gate_proj, layer.mlp.up_proj))
        self.layers = [_Layer(layer, per_head_norm, fused_bytes <= FUSE_MAX_BYTES) for layer in layers]
        self.norm = (core.norm.weight, core.norm.variance_epsilon)

    def start(self, cache: Any, capacity: int, mask_BP: Tensor | None, positions_BS: Tensor, repeats: int = 1) -> None:
        """Copy the prefill's keys/values (each row `repeats` times) into buffers of `capacity` columns;
        tabulate cos/sin of the decode positions."""
        self.keys, self.values = [], []
        for layer in cache.layers[: len(self.layers)]:
            k, v = layer.keys, layer.values
            rows = k.shape[0] * repeats
            kb = k.new_zeros(rows, k.shape[1], capacity, k.shape[3])
            vb = v.new_zeros(rows, v.shape[1], capacity, v.shape[3])
            kb[:, :, : k.shape[2]] = k.repeat_interleave(repeats, dim=0) if repeats > 1 else k
            vb[:, :, : v.shape[2]] = v.repeat_interleave(repeats, dim=0) if repeats > 1 else v
            self.keys.append(kb)
            self.values.append(vb)
        self.filled = cache.layers[0].keys.shape[2]
        # The padding mask over the whole buffer; a view of its first columns is each step's SDPA mask
        # (generate's mask for one query: the 2-D attention mask, ones for generated tokens; none without padding).
        if mask_BP is None:
            self.mask = None
        else:
            full = torch.ones(mask_BP.shape[0], capacity, dtype=torch.bool, device=mask_BP.device)
            full[:, : mask_BP.shape[1]] = mask_BP.bool()
            self.mask = full[:, None, None, :]
        probe = self.keys[0].new_empty(0, dtype=self.core.embed_tokens.weight.dtype)
        self.cos, self.sin = self.core.rotary_emb(probe, position_ids=positions_BS)  # [B, S, D] each

    def step(self, tokens_B: Tensor, s: int) -> Tensor:
        """Feed one token per row (decode step `s`, 0-based); return the next logits [B, V] in float32."""
        t = self.filled
        batch = tokens_B.shape[0]
        h = self.core.embed_tokens(tokens_B[:, None])  # [B, 1, hidden]
        cos = self.cos[:, s: s + 1].unsqueeze(1)  # [B, 1, 1, D]
        sin = self.sin[:, s: s + 1].unsqueeze(1)
        mask = self.mask[..., : t + 1] if self.mask is not None else None
        for i, layer in enumerate(self.layers):
            residual = h
            x = _rms_norm(h, *layer.norm1)
            q, k, v = _products(x, layer.qkv_w, layer.qkv_b, layer.split)
            d = layer.head_dim
            q, k, v = q.view(batch, 1, -1, d), k.view(batch, 1, -1, d), v.view(batch, 1, -1, d)
            if layer.q_norm is not None:
                q, k = _rms_norm(q, *layer.q_norm), _rms_norm(k, *layer.k_norm)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
            q = (q * cos) + (_rotate_half(q) * sin)
            k = (k * cos) + (_rotate_half(k) * sin)
            self.keys[i][:, :, t: t + 1] = k
            self.values[i][:, :, t: t + 1] = v
            a = _attention(q, self.keys[i][:, :, : t + 1], self.values[i][:, :, : t + 1], mask, layer)
            h = residual + F.linear(a.reshape(batch, 1, -1).contiguous(), layer.o_w, layer.o_b)
            residual = h
            x = _rms_norm(h, *layer.norm2)
            gate, up = _products(x, layer.gate_up_w, layer.gate_up_b, [layer.intermediate] * 2)
            h = residual + F.linear(F.silu(gate) * up, layer.down_w, layer.down_b)
        self.filled = t + 1
        h = _rms_norm(h, *self.norm)
        return self.lm_head(h)[:, -1].to(copy=True, dtype=torch.float32)


@torch.no_grad()
def decode(
    model: Any,
    ids_BP: Tensor,
    attn_BP: Tensor,
    *,
    max_new_tokens: int,
    eos_ids: Sequence[int],
    pad_id: int,
    pick: Callable[[Tensor, int], Tensor],
    repeats: int = 1,
    prefill_out: list[Any] | None = None,
) -> Tensor:
    """Prompts followed by up to `max_new_tokens` generated tokens, [B, P + C] (C <= max_new_tokens).

    `ids_BP`, `attn_BP`: the distinct prompts, left-padded; each is decoded `repeats` times, in
    adjacent rows (row r continues prompt r // repeats), so B = prompts x repeats. The prefill runs
    once per distinct prompt and its keys and values are repeated: the same numbers as prefilling
    every copy, as each row's computation reads only its own row (and the BLAS gives a row of a
    product the same bits whatever the row count, from 4 rows up). `pick(logits_BV,
    position)` returns the tokens [B] of generation step `position` (0-based) from float32 logits.
    Rows that produced an EOS continue with `pad_id`; decoding stops early once every row has.
    Call only when `unsupported_reason(model)` is None; the model must be in eval mode.
    `prefill_out`: the prefill's `DynamicCache` (keys and values of the distinct prompts, untouched by
    decoding) is appended to it, for another continuation of the same prompts (the evaluation's
    answer likelihood, `distill.evaluate`).
    """
    from transformers import DynamicCache

    device = ids_BP.device
    positions = attn_BP.long().cumsum(-1) - 1
    positions = positions.masked_fill(attn_BP == 0, 0)  # generate's prompt position ids
    padded = not bool(attn_BP.all())
    if repeats > 1 and ids_BP.numel() < 4:  # BLAS rounds products of <= 3 rows differently: prefill every copy
        ids_BP, attn_BP, positions = (t.repeat_interleave(repeats, dim=0) for t in (ids_BP, attn_BP, positions))
        repeats = 1
    cache = DynamicCache(config=model.config)
    # generate's prefill: the model's forward with an all-ones mask dropped; the LM head on the last
    # position of every row (after the copies are made, so its product has generate's row count)
    hidden = model.model(input_ids=ids_BP.contiguous(), attention_mask=attn_BP if padded else None,
                         position_ids=positions, cache=cache, use_cache=True, return_dict=True).last_hidden_state
    if prefill_out is not None:
        prefill_out.append(cache)
    if repeats > 1:
        ids_BP, attn_BP, positions = (t.repeat_interleave(repeats, dim=0) for t in (ids_BP, attn_BP, positions))
    logits = model.lm_head(hidden[:, -1:].repeat_interleave(repeats, dim=0))[:, -1].to(copy=True, dtype=torch.float32)
    del hidden
    prompt_len = ids_BP.shape[1]
    eos = torch.tensor(list(eos_ids), dtype=torch.long, device=device)
    pad = torch.tensor(pad_id, dtype=torch.long, device=device)
    tokens = pick(logits, 0)
    unfinished = ~torch.isin(tokens, eos)
    generated = [tokens]
    if max_new_tokens > 1 and bool(unfinished.any()):
        decoder = _Decoder(model, SUPPORTED[model.config.model_type])
        steps = positions[:, -1:] + torch.arange(1, max_new_tokens, device=device)  # positions of fed tokens
        decoder.start(cache, prompt_len + max_new_tokens - 1, attn_BP if padded else None, steps, repeats)
        del cache
        for s in range(max_new_tokens - 1):
            logits = decoder.step(tokens, s)
            tokens = torch.where(unfinished, pick(logits, s + 1), pad)
            generated.append(tokens)
            unfinished = unfinished & ~torch.isin(tokens, eos)
            if not bool(unfinished.any()):
                break
    return torch.cat([ids_BP, torch.stack(generated, dim=1)], dim=1)
