"""VLM scoring inputs: the batched, left-padded scoring pass equals a plain forward, per family.

The reference for each row is built the plain way, with nothing of `opdlab.distill.vlm`: the
processor renders prompt + completion as *one* unpadded text (so it makes every multimodal
input for the full sequence itself) and the model runs a default forward. The scoring pass
instead starts from left-padded prompt inputs and appends completion tokens, so any input it
fails to rebuild (positions, type ids) shows up as a logit error. Tolerance 1e-5: the known
bugs (positions not rebuilt, completions inside a bidirectional prefix) give errors of ~1e-4 and
more, and the negative controls below check that each of them is caught at this tolerance with
these very models.
"""

from __future__ import annotations

import random

import pytest
import torch

from opdlab.data.visual_tasks import get_visual_task
from opdlab.distill.vlm import (
    completion_logits,
    encode_visual_prompts,
    family_of,
    scoring_inputs,
    sequence_loss_mask,
    user_turn,
)
from opdlab.errors import UserError
from opdlab.models.vlm_zoo import tiny_vlm

FAMILIES = ["llava", "qwen2_5_vl", "qwen2_vl", "paligemma"]
ATOL = 1e-5
C = 6  # completion columns


@pytest.fixture(scope="module")
def examples():
    pool = get_visual_task("shapes").examples(30, seed=0, split="eval")
    # One question of each family: prompts of different lengths, so the batch is left-padded.
    return [next(e for e in pool if e.task == t) for t in ("shapes-count", "shapes-color", "shapes-position")]


def _models(family: str):
    torch.manual_seed(0)
    # A wider init than the default 0.02 gives O(1) logits, so a wrong input moves them visibly.
    model, processor = tiny_vlm(family, seed=0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.15)
    return model, processor


def _completions(tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """Hand-made completions [3, C]: EOS early then padding; no EOS; EOS in the last column."""
    rng = random.Random(0)
    chars = [tokenizer.convert_tokens_to_ids(c) for c in "abcdefghijklmnopqrstuvwxyz0123456789 "]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    rows = [
        [rng.choice(chars) for _ in range(3)] + [eos] + [pad] * (C - 4),
        [rng.choice(chars) for _ in range(C)],
        [rng.choice(chars) for _ in range(C - 1)] + [eos],
    ]
    ids = torch.tensor(rows)
    mask = torch.tensor([[1] * 4 + [0] * (C - 4), [1] * C, [1] * C])
    return ids, mask


def _reference_logits(model, processor, example, completion: list[int]) -> torch.Tensor:
    """Logits predicting `completion` from one unpadded processor call over the full text, [L, V]."""
    tok = processor.tokenizer
    if family_of(model) == "prefix_lm":
        # PaliGemma marks the answer as the causal suffix itself (token_type_ids 1) and appends EOS.
        body = completion[:-1] if completion[-1] == tok.eos_token_id else completion
        inputs = processor(
            text=["<image>" + example.prompt], images=[[example.image]], suffix=[tok.decode(body)], return_tensors="pt"
        )
        inputs.pop("labels")
    else:
        prompt = processor.apply_chat_template(user_turn(example.prompt), add_generation_prompt=True, tokenize=False)
        text = prompt + tok.decode(completion, skip_special_tokens=False)
        inputs = processor(text=[text], images=[[example.image]], return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    start = len(ids) - len(completion) if family_of(model) != "prefix_lm" else len(ids) - len(body) - 1
    assert ids[start : start + len(completion)] == completion, "reference did not reproduce the completion tokens"
    with torch.no_grad():
        logits = model(**inputs).logits[0]
    return logits[start - 1 : start - 1 + len(completion)].float()


@pytest.mark.parametrize("family", FAMILIES)
def test_scoring_logits_equal_a_plain_forward(family, examples):
    model, processor = _models(family)
    prompt = encode_visual_prompts(processor, examples)
    assert prompt.inputs["attention_mask"][:, 0].min() == 0, "want left padding in the batch"
    ids_BC, mask_BC = _completions(processor.tokenizer)
    with torch.no_grad():
        logits_BCV = completion_logits(model, prompt, ids_BC, mask_BC)
    assert logits_BCV.shape == (3, C, model.config.get_text_config().vocab_size)
    assert logits_BCV.std() > 0.5, "logits too flat for the tolerance to mean anything"
    for b, example in enumerate(examples):
        n = int(mask_BC[b].sum())
        ref = _reference_logits(model, processor, example, ids_BC[b, :n].tolist())
        torch.testing.assert_close(logits_BCV[b, :n], ref, atol=ATOL, rtol=0)


def _naive_kwargs(model, prompt, ids_BC, mask_BC) -> dict:
    """The known bugs: prompt-time multimodal inputs reused for the full sequence."""
    kw = scoring_inputs(model, prompt, ids_BC, mask_BC)
    family = family_of(model)
    if family == "mrope":
        kw.pop("position_ids")  # positions not rebuilt: 1-D fallback ...
        kw.pop("mm_token_type_ids")  # ... because the type ids no longer cover the sequence
    elif family == "prefix_lm":
        # Prompt type ids padded with 0: the completion joins the bidirectional prefix (sees the future).
        kw["token_type_ids"] = torch.cat([prompt.inputs["token_type_ids"], torch.zeros_like(ids_BC)], dim=1)
    return kw


@pytest.mark.parametrize("family", ["qwen2_5_vl", "paligemma"])
def test_the_known_bugs_fail_this_tolerance(family, examples):
    """Negative control: without rebuilt inputs the same comparison misses by far more than ATOL."""
    model, processor = _models(family)
    prompt = encode_visual_prompts(processor, examples)
    ids_BC, mask_BC = _completions(processor.tokenizer)
    kw = _naive_kwargs(model, prompt, ids_BC, mask_BC)
    with torch.no_grad():
        naive = model(**kw, use_cache=False).logits[:, prompt.prompt_len - 1 : -1]
        right = completion_logits(model, prompt, ids_BC, mask_BC)
    keep = mask_BC.bool()
    error = (naive[keep] - right[keep]).abs().max().item()
    assert error > 20 * ATOL, f"{family}: naive scoring error {error:.2e} would not be caught"


def test_qwen2_vl_refuses_scoring_without_type_ids(examples):
    model, processor = _models("qwen2_vl")
    prompt = encode_visual_prompts(processor, examples)
    ids_BC, mask_BC = _completions(processor.tokenizer)
    kw = _naive_kwargs(model, prompt, ids_BC, mask_BC)
    try:
        with torch.no_grad():
            naive = model(**kw, use_cache=False).logits[:, prompt.prompt_len - 1 : -1]
    except Exception:
        return  # Qwen2-VL raises without mm_token_type_ids, which is the bug made visible
    right = completion_logits(model, prompt, ids_BC, mask_BC)
    assert (naive - right)[mask_BC.bool()].abs().max() > 20 * ATOL


def test_qwen2_5_vl_positions_match_a_hand_computed_layout(examples):
    """Text tokens count up by 1; the 2 x 2 merged image grid sits at (s, s+h, s+w); text resumes at s + 2."""
    model, processor = _models("qwen2_5_vl")
    prompt = encode_visual_prompts(processor, examples)
    ids_BC, mask_BC = _completions(processor.tokenizer)
    pos = scoring_inputs(model, prompt, ids_BC, mask_BC)["position_ids"]  # [3, B, T]
    image_id = processor.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    full_ids = torch.cat([prompt.inputs["input_ids"], ids_BC], dim=1)
    full_mask = torch.cat([prompt.inputs["attention_mask"], mask_BC], dim=1)
    for b in range(len(examples)):
        expected, p = [], 0
        cols = full_mask[b].nonzero().flatten().tolist()
        image_cols = [c for c in cols if full_ids[b, c] == image_id]
        assert len(image_cols) == 4  # 32 x 32 pixels, 8-pixel patches, 2 x 2 merge
        for c in cols:
            if c in image_cols:
                k = image_cols.index(c)
                expected.append((p, p + k // 2, p + k % 2))
                if k == 3:
                    p += 2  # max(h, w) of the merged grid
            else:
                expected.append((p, p, p))
                p += 1
        assert pos[:, b, cols].T.tolist() == [list(e) for e in expected]


def test_loss_mask_covers_only_generated_text(examples):
    model, processor = _models("qwen2_5_vl")
    prompt = encode_visual_prompts(processor, examples)
    ids_BC, mask_BC = _completions(processor.tokenizer)
    mask_BT = sequence_loss_mask(prompt, mask_BC)
    full_ids = torch.cat([prompt.inputs["input_ids"], ids_BC], dim=1)
    tok = processor.tokenizer
    image_like = torch.isin(full_ids, torch.tensor(tok.convert_tokens_to_ids(["<|image_pad|>", "<|vision_start|>", "<|vision_end|>"])))
    assert image_like.any() and not mask_BT[image_like].any()  # image tokens never count
    assert not mask_BT[:, : prompt.prompt_len].any()  # nor any prompt column (text or pad)
    assert not mask_BT[full_ids == tok.pad_token_id].any()  # nor padding anywhere
    # Exactly the generated tokens up to and including the first EOS: 4 + 6 + 6.
    assert mask_BT.sum() == 16 and mask_BT[0, prompt.prompt_len + 3] == 1 and mask_BT[0, prompt.prompt_len + 4] == 0
    # Tokens after EOS do not touch the logits of the tokens that count.
    changed = ids_BC.clone()
    changed[0, 4:] = tok.convert_tokens_to_ids("z")
    with torch.no_grad():
        a = completion_logits(model, prompt, ids_BC, mask_BC)
        b = completion_logits(model, prompt, changed, mask_BC)
    torch.testing.assert_close(a[mask_BC.bool()], b[mask_BC.bool()], atol=1e-6, rtol=0)


def test_micro_batch_rows_score_like_the_full_batch(examples):
    """`PromptBatch.rows` slices Qwen's flattened patches per image, so micro-batches agree."""
    model, processor = _models("qwen2_5_vl")
    prompt = encode_visual_prompts(processor, examples)
    ids_BC, mask_BC = _completions(processor.tokenizer)
    with torch.no_grad():
        whole = completion_logits(model, prompt, ids_BC, mask_BC)
        part = completion_logits(model, prompt.rows(1, 3), ids_BC[1:3], mask_BC[1:3])
    torch.testing.assert_close(part, whole[1:3], atol=ATOL, rtol=0)


def test_unsupported_family_is_a_user_error():
    class Config:
        model_type = "mystery_vlm"

    with pytest.raises(UserError, match="mystery_vlm"):
        family_of(Config())
