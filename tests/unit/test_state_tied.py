"""Tied weights are written once: checkpoints and GGUF conversions match tensor for tensor."""

from __future__ import annotations

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, LlamaConfig

from opdlab.distill.checkpoint import save_model
from opdlab.models.state import unique_tensors
from opdlab.models.tokenizer import build_tokenizer


def test_unique_tensors_drops_exact_aliases_only():
    base = torch.arange(12.0)
    state = {"a": base.view(3, 4), "tied": base.view(3, 4), "other_view": base[4:8], "copy": base.view(3, 4).clone()}
    kept = unique_tensors(state)
    assert list(kept) == ["a", "other_view", "copy"]  # same storage at another offset is a different tensor


def tied_model():
    tok = build_tokenizer()
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg), tok


def test_tied_head_is_saved_once_in_every_storage_dtype(tmp_path):
    model, tok = tied_model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    for dtype in (torch.bfloat16, torch.float32):
        folder = tmp_path / str(dtype)
        folder.mkdir()
        save_model(folder, model, tok, dtype)
        with safe_open(str(folder / "model.safetensors"), "pt") as f:
            keys = set(f.keys())
        assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys
        again = AutoModelForCausalLM.from_pretrained(str(folder), use_safetensors=True, trust_remote_code=False)
        assert torch.equal(again.lm_head.weight, again.model.embed_tokens.weight)
        assert torch.equal(again.model.embed_tokens.weight.float(),
                           model.model.embed_tokens.weight.detach().to(dtype).float())
