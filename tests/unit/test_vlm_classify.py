"""Analysis groups for VLM parameter names: vision encoder, projector/connector, language model.

The names below were read from real transformers 5.24 models of each family (built tiny
from configs): the in-memory layout (`model.language_model...`), the legacy layout that
`save_pretrained` writes (`language_model.model...`, `model.visual...`), and Idefics3/SmolVLM.
"""

from __future__ import annotations

import pytest

from opdlab.analysis.aggregate import classify
from opdlab.analysis.pairs import canonical_name

VISION = [
    "model.vision_tower.encoder.layers.1.self_attn.q_proj.weight",  # LLaVA / PaliGemma (CLIP, SigLIP)
    "model.vision_tower.encoder.layers.1.mlp.fc1.weight",
    "model.vision_tower.embeddings.patch_embedding.weight",
    "model.vision_tower.post_layernorm.weight",
    "vision_tower.vision_model.encoder.layers.0.mlp.fc1.weight",  # saved LLaVA layout
    "model.visual.blocks.1.attn.qkv.weight",  # Qwen2/2.5-VL
    "model.visual.patch_embed.proj.weight",
    "model.vision_model.encoder.layers.0.self_attn.q_proj.weight",  # Idefics3 / SmolVLM
]
PROJECTOR = [
    "model.multi_modal_projector.linear_1.weight",  # LLaVA
    "multi_modal_projector.linear.bias",  # PaliGemma, saved layout
    "model.visual.merger.ln_q.weight",  # Qwen: the patch merger is the connector
    "model.visual.merger.mlp.2.weight",
    "model.connector.modality_projection.proj.weight",  # Idefics3 / SmolVLM
]
LANGUAGE = [  # (name, layer, module, block)
    ("model.language_model.layers.1.self_attn.q_proj.weight", 1, "q", "attention"),
    ("language_model.model.layers.3.mlp.up_proj.weight", 3, "up", "mlp"),
    ("model.text_model.layers.0.self_attn.q_proj.weight", 0, "q", "attention"),
    ("model.language_model.embed_tokens.weight", None, "embed", "embedding"),
    ("language_model.lm_head.weight", None, "lm_head", "embedding"),
    ("lm_head.weight", None, "lm_head", "embedding"),
    ("model.text_model.norm.weight", None, "norm", "norm"),
]


@pytest.mark.parametrize("name", VISION)
def test_vision_encoder_tensors_form_their_own_group(name):
    assert classify(canonical_name(name)) == (None, "vision", "vision")


@pytest.mark.parametrize("name", PROJECTOR)
def test_projector_and_connector_tensors_form_their_own_group(name):
    assert classify(canonical_name(name)) == (None, "projector", "projector")


@pytest.mark.parametrize("name,layer,module,block", LANGUAGE)
def test_language_model_tensors_keep_layer_and_module(name, layer, module, block):
    assert classify(canonical_name(name)) == (layer, module, block)


def test_vision_layers_do_not_leak_into_the_language_layer_table():
    """A vision block `layers.1` must not be counted as decoder layer 1."""
    assert classify(canonical_name("model.vision_tower.encoder.layers.1.self_attn.q_proj.weight"))[0] is None
    assert classify(canonical_name("model.visual.blocks.1.mlp.down_proj.weight"))[0] is None
