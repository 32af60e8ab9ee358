"""Name classification across model families, and groups as sums of additive quantities."""

import pytest
import torch

from opdlab.analysis.aggregate import classify, group_table, summary
from opdlab.analysis.pairs import canonical_name
from opdlab.analysis.per_tensor import TensorSpec, analyze_tensor


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name, expect", [
    ("model.layers.3.self_attn.q_proj.weight", (3, "q", "attention")),
    ("model.layers.3.self_attn.k_proj.bias", (3, "k", "attention")),
    ("model.layers.0.self_attn.o_proj.weight", (0, "o", "attention")),
    ("model.layers.11.mlp.gate_proj.weight", (11, "gate", "mlp")),
    ("model.layers.11.mlp.down_proj.weight", (11, "down", "mlp")),
    ("model.layers.2.input_layernorm.weight", (2, "norm", "norm")),
    ("model.layers.2.self_attn.q_norm.weight", (2, "norm", "norm")),
    ("model.norm.weight", (None, "norm", "norm")),
    ("model.embed_tokens.weight", (None, "embed", "embedding")),
    ("lm_head.weight", (None, "lm_head", "embedding")),
    # Qwen2.5-VL (after canonicalization)
    ("model.visual.blocks.0.attn.qkv.weight", (None, "vision", "vision")),
    ("model.visual.merger.mlp.0.weight", (None, "projector", "projector")),
    ("model.language_model.layers.1.mlp.up_proj.weight", (1, "up", "mlp")),
    # LLaVA
    ("model.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj.weight", (None, "vision", "vision")),
    ("model.multi_modal_projector.linear_1.weight", (None, "projector", "projector")),
    # Idefics3
    ("model.text_model.layers.0.self_attn.v_proj.weight", (0, "v", "attention")),
    ("model.connector.modality_projection.proj.weight", (None, "projector", "projector")),
    ("model.vision_model.embeddings.patch_embedding.weight", (None, "vision", "vision")),
    ("model.rotary_emb.inv_freq", (None, "other", "other")),
])
def test_classify(name, expect):
    assert classify(canonical_name(name)) == expect


def test_groups_are_numel_weighted_sums():
    torch.manual_seed(0)
    results = []
    for name, shape, frac in (("model.layers.0.mlp.up_proj.weight", (64, 32), 0.5),
                              ("model.layers.0.mlp.down_proj.weight", (32, 64), 0.1),
                              ("model.layers.0.input_layernorm.weight", (32,), 1.0)):
        w = torch.randn(shape)
        k = round(frac * w.numel())
        w2 = w.clone().view(-1)
        w2[:k] += 1.0
        results.append(analyze_tensor(TensorSpec(name, shape, lambda a, b, w=w, w2=w2.view(shape): (w[a:b], w2[a:b]))))
    block = {r["group"]: r for r in group_table(results, "block")}
    assert block["mlp"]["sparsity"] == pytest.approx(1 - (1024 + 205) / 4096)
    assert block["norm"]["sparsity"] == 0.0
    layer = group_table(results, "layer")
    assert layer[0]["group"] == 0 and layer[0]["num_params"] == 4096 + 32
    s = summary(results)
    assert s["sparsity"] == pytest.approx(1 - (1024 + 205 + 32) / (4096 + 32))
    up, down = results[0].sums, results[1].sums
    expect = ((up["delta_sq"] + down["delta_sq"] + results[2].sums["delta_sq"])
              / (up["source_sq"] + down["source_sq"] + results[2].sums["source_sq"])) ** 0.5
    assert s["relative_update_norm"] == pytest.approx(expect)
    assert s["num_tensors"] == 3 and s["num_matrices"] == 2
