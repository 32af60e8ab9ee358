"""Fast decoding (opdlab.distill.decode) gives generate's numbers: every step's logits bit-equal in fp32.

The reference is transformers' own `generate` (output_logits) on the same rows; `roll_out`'s fast
path is compared with its `generate` path (`fast=False`) on whole rollouts, seeded and greedy.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig, Qwen2Config, Qwen3Config

from opdlab.distill.decode import decode, unsupported_reason
from opdlab.distill.rollout import greedy_pick, roll_out
from opdlab.distill.sampling import row_seeds

VOCAB, EOS, PAD = 61, 2, 0


def tiny(kind: str, kv_heads: int = 2, tied: bool = False, bias: bool = False, eos_bias: float = 0.0):
    """A random 2-layer model of `kind`; `eos_bias` raises the EOS logit so that some rows stop early."""
    common = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=128, tie_word_embeddings=tied,
                  pad_token_id=PAD, eos_token_id=EOS, bos_token_id=1)
    cfg = {"llama": LlamaConfig, "qwen2": Qwen2Config, "qwen3": Qwen3Config}[kind](**common)
    if kind == "llama":
        cfg.attention_bias = bias
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    if eos_bias:
        with torch.no_grad():
            model.lm_head.weight[EOS] += eos_bias * model.model.norm.weight / model.model.norm.weight.norm()
    return model


def prompts(rows: int, width: int, padded: bool) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(rows + width)
    ids = torch.randint(3, VOCAB, (rows, width), generator=gen)
    attn = torch.ones(rows, width, dtype=torch.long)
    if padded:
        for i in range(rows):
            attn[i, : i % 4] = 0
        ids[attn == 0] = PAD
    return ids, attn


def reference(model, ids, attn, steps):
    cfg = GenerationConfig(do_sample=False, max_new_tokens=steps, eos_token_id=[EOS], pad_token_id=PAD, use_cache=True,
                           output_logits=True, return_dict_in_generate=True)
    with torch.no_grad():
        return model.generate(input_ids=ids, attention_mask=attn, generation_config=cfg)


MODELS = [("llama", dict(kv_heads=4)), ("llama", dict(kv_heads=2, tied=True, bias=True)), ("llama", dict(kv_heads=1)),
          ("qwen2", {}), ("qwen3", dict(tied=True))]


@pytest.mark.parametrize("kind,kwargs", MODELS, ids=[f"{k}-{i}" for i, (k, _) in enumerate(MODELS)])
@pytest.mark.parametrize("padded", [False, True])
def test_every_step_matches_generate_bit_for_bit(kind, kwargs, padded):
    model = tiny(kind, **kwargs)
    assert unsupported_reason(model) is None
    ids, attn = prompts(6, 7, padded)
    ref = reference(model, ids, attn, 9)
    seen = []

    def pick(logits, position):
        seen.append(logits.clone())
        return greedy_pick(logits, position)

    out = decode(model, ids, attn, max_new_tokens=9, eos_ids=[EOS], pad_id=PAD, pick=pick)
    assert torch.equal(out, ref.sequences)
    assert len(seen) == len(ref.logits) == 9
    for step, (mine, theirs) in enumerate(zip(seen, ref.logits)):
        assert torch.equal(mine, theirs), f"step {step}: max |diff| {float((mine - theirs).abs().max())}"


def test_shared_prompt_prefill_matches_generate_on_the_copies():
    """`repeats`: one prefill per distinct prompt gives the logits of prefilling every copy."""
    model = tiny("llama", kv_heads=2)
    ids, attn = prompts(3, 6, padded=True)
    ref = reference(model, ids.repeat_interleave(4, 0), attn.repeat_interleave(4, 0), 7)
    seen = []
    out = decode(model, ids, attn, max_new_tokens=7, eos_ids=[EOS], pad_id=PAD, repeats=4,
                 pick=lambda logits, p: seen.append(logits.clone()) or greedy_pick(logits, p))
    assert torch.equal(out, ref.sequences)
    assert all(torch.equal(a, b) for a, b in zip(seen, ref.logits))


def test_rows_that_end_get_padding_and_decoding_stops_when_all_have():
    model = tiny("llama", eos_bias=6.0)
    ids, attn = prompts(8, 5, padded=True)
    ref = reference(model, ids, attn, 30)
    out = decode(model, ids, attn, max_new_tokens=30, eos_ids=[EOS], pad_id=PAD, pick=greedy_pick)
    assert torch.equal(out, ref.sequences)
    completion = out[:, 5:]
    assert completion.shape[1] < 30  # every row ended before the limit
    ended = (completion == EOS).cumsum(1) > 0
    assert bool(ended[:, -1].all())
    after_eos = ended & ~(completion == EOS) & ((completion == EOS).cumsum(1) == 1)
    assert bool((completion[after_eos] == PAD).all())


class Tok:
    """The two tokenizer attributes roll_out reads, and decoding to strings of ids."""

    pad_token_id, eos_token_id = PAD, EOS

    def batch_decode(self, seqs, skip_special_tokens=True):
        return [" ".join(str(t) for t in s if not (skip_special_tokens and t in (PAD, EOS))) for s in seqs]


@pytest.mark.parametrize("temperature,top_p", [(1.0, 1.0), (0.7, 0.9)])
def test_seeded_rollouts_are_the_generate_rollouts(temperature, top_p):
    """The training path: seeded sampling, several samples per prompt, prompts of different lengths."""
    model = tiny("llama", eos_bias=3.0)
    prompt_ids = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15, 16], [17]]
    seeds = row_seeds(3, step=2, first_prompt=0, num_prompts=4, samples=3)
    kwargs = dict(samples=3, max_new_tokens=12, temperature=temperature, top_p=top_p, seeds=seeds)
    fast = roll_out(model, Tok(), prompt_ids, list("abcd"), **kwargs)
    slow = roll_out(model, Tok(), prompt_ids, list("abcd"), fast=False, **kwargs)
    for name in ("input_ids_BT", "attention_mask_BT", "completion_mask_BT"):
        assert torch.equal(getattr(fast, name), getattr(slow, name)), name
    assert fast.completions == slow.completions and fast.prompt_len == slow.prompt_len
    assert fast.examples == slow.examples == [e for e in "abcd" for _ in range(3)]
    assert len(set(fast.completions)) > 3  # the samples of a prompt differ
    assert model.training is False  # tiny() built it in eval mode; roll_out restores the mode it found


def test_greedy_rollouts_and_train_mode_restored():
    model = tiny("qwen2", eos_bias=3.0).train()
    prompt_ids = [[5, 6, 7], [8, 9, 10, 11, 12]]
    fast = roll_out(model, Tok(), prompt_ids, ["x", "y"], max_new_tokens=10, greedy=True)
    slow = roll_out(model, Tok(), prompt_ids, ["x", "y"], max_new_tokens=10, greedy=True, fast=False)
    assert torch.equal(fast.input_ids_BT, slow.input_ids_BT) and fast.completions == slow.completions
    assert model.training


def test_other_architectures_fall_back_to_generate():
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=1, n_head=2, n_positions=64, eos_token_id=EOS,
                     bos_token_id=1, pad_token_id=PAD)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    assert "gpt2" in unsupported_reason(model)
    seeds = row_seeds(0, 1, 0, 2, 1)
    batch = roll_out(model, Tok(), [[5, 6], [7]], ["x", "y"], max_new_tokens=4, seeds=seeds)
    assert batch.input_ids_BT.shape[0] == 2
    slow = roll_out(model, Tok(), [[5, 6], [7]], ["x", "y"], max_new_tokens=4, seeds=seeds, fast=False)
    assert torch.equal(batch.input_ids_BT, slow.input_ids_BT)


def test_unsupported_reasons_name_the_obstacle():
    model = tiny("llama")
    handle = model.model.layers[0].register_forward_hook(lambda *a: None)
    assert "hooks" in unsupported_reason(model)
    handle.remove()
    model.config._attn_implementation = "eager"
    assert "eager" in unsupported_reason(model)


def test_large_models_skip_the_weight_concatenation_and_match_too(monkeypatch):
    """Above `FUSE_MAX_BYTES` the projections stay separate products: still generate's logits bit for bit."""
    import opdlab.distill.decode as decode_module

    monkeypatch.setattr(decode_module, "FUSE_MAX_BYTES", 0)
    model = tiny("qwen2", kv_heads=2)
    ids, attn = prompts(5, 6, padded=True)
    ref = reference(model, ids, attn, 8)
    seen = []
    out = decode(model, ids, attn, max_new_tokens=8, eos_ids=[EOS], pad_id=PAD,
                 pick=lambda logits, p: seen.append(logits.clone()) or greedy_pick(logits, p))
    assert torch.equal(out, ref.sequences) and all(torch.equal(a, b) for a, b in zip(seen, ref.logits))
