"""Vision-language rollouts and scoring: each model's own processor inputs, rebuilt for the full sequence.

A VLM forward needs more than token ids: pixel values, and per family the inputs that say
where the image sits (Qwen2/2.5-VL: `mm_token_type_ids` + `image_grid_thw` for the 3-D
multimodal rotary positions; PaliGemma: `token_type_ids` for its bidirectional prefix).
The processor builds them for the *prompt*; after the student has generated, the scoring pass
runs on prompt + completion, and every such input must be rebuilt for that full sequence —
otherwise the loss is silently wrong: Qwen2.5-VL gets wrong rotary positions, PaliGemma lets
completion tokens see the future, and Qwen2-VL raises (the negative controls of
tests/integration/test_vlm_scoring.py show each; docs/vlm.md).

    student_prompt = encode_visual_prompts(student_processor, examples, samples=4)
    teacher_prompt = encode_visual_prompts(teacher_processor, examples, samples=4)
    ids_BC, mask_BC = generate_completions(student, student_processor, student_prompt, max_new_tokens=12)
    s_logits_BCV = completion_logits(student, student_prompt, ids_BC, mask_BC)
    with torch.inference_mode():
        t_logits_BCV = completion_logits(teacher, teacher_prompt, ids_BC, mask_BC, vocab_size=V)
    # loss over mask_BC only: generated text tokens up to and including the first EOS

Teacher and student see the same image and prompt, each through its *own* processor (their
image-token counts may differ); both prompts are left-padded, so the completion occupies the
last C columns of both sequences and logits line up token by token.

Shapes: B rows, P prompt columns (left-padded), C completion columns, T = P + C, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Sequence

import torch
from torch import Tensor

from opdlab.data.visual_tasks import user_turn
from opdlab.distill.rollout import Role, completion_mask, decode_completions, eos_token_ids
from opdlab.errors import UserError

Family = Literal["rope1d", "mrope", "prefix_lm"]

# model_type -> how its scoring inputs are rebuilt. Only families with a test comparing the
# scoring pass to a plain forward are listed (tests/integration/test_vlm_scoring.py).
FAMILIES: dict[str, Family] = {
    "llava": "rope1d",  # 1-D positions from the attention mask, nothing else position-dependent
    "qwen2_vl": "mrope",  # 3-D rotary positions from mm_token_type_ids + image_grid_thw
    "qwen2_5_vl": "mrope",
    "paligemma": "prefix_lm",  # token_type_ids: 0 = bidirectional prefix, 1 = causal suffix; 1-indexed positions
}
_TOKEN_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def family_of(model_or_config: Any) -> Family:
    """The scoring family of a VLM (by `config.model_type`); an unsupported type is a UserError."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    try:
        return FAMILIES[model_type]
    except KeyError:
        raise UserError(
            f"VLM model type {model_type!r} has no verified scoring path (supported: {', '.join(FAMILIES)}); "
            "its position/type inputs could be silently wrong, so opdlab refuses it"
        ) from None


@dataclass
class PromptBatch:
    """One model's processor outputs for a batch of prompts, left-padded to P columns.

    `inputs` holds input_ids / attention_mask [B, P] and whatever the processor returns
    besides (pixel_values, image_grid_thw, mm_token_type_ids, token_type_ids, ...). Each row
    has exactly one image.
    """

    inputs: dict[str, Tensor]

    @property
    def prompt_len(self) -> int:
        return int(self.inputs["input_ids"].shape[1])

    @property
    def num_rows(self) -> int:
        return int(self.inputs["input_ids"].shape[0])

    def rows(self, start: int, stop: int) -> "PromptBatch":
        """Rows [start, stop) (for micro-batches), with leading all-pad columns dropped."""
        return self.select(torch.arange(start, min(stop, self.num_rows)))

    def select(self, index: Tensor) -> "PromptBatch":
        """The rows `index` (1-D long), in that order, with leading all-pad columns dropped."""
        index = index.to(self.inputs["input_ids"].device)
        attn = self.inputs["attention_mask"][index]
        first = int(attn.any(dim=0).float().argmax())  # first column any kept row uses
        grid = self.inputs.get("image_grid_thw")
        out: dict[str, Tensor] = {}
        for key, value in self.inputs.items():
            if key in _TOKEN_KEYS:
                out[key] = value[index, first:]
            elif key == "pixel_values" and grid is not None:
                # Qwen-style: the patches of all images flattened into one [N_patches, D] tensor.
                offsets = torch.cat([grid.new_zeros(1), grid.prod(dim=1).cumsum(0)]).tolist()
                out[key] = torch.cat([value[offsets[i] : offsets[i + 1]] for i in index.tolist()])
            else:
                out[key] = value[index]
        return PromptBatch(out)

    def to(self, device: torch.device | str) -> "PromptBatch":
        return PromptBatch({k: v.to(device) for k, v in self.inputs.items()})


def encode_visual_prompts(processor: Any, examples: Sequence[Any], samples: int = 1) -> PromptBatch:
    """Left-padded processor inputs for examples with `.prompt` (text) and `.image` (PIL), [B, P].

    Each example is repeated `samples` times in adjacent rows. With a chat template the prompt
    is rendered as a user turn (question, then image: `user_turn`) plus the generation prompt; a processor without
    one (PaliGemma) gets the plain prompt and places the image tokens itself.
    """
    rows = [ex for ex in examples for _ in range(samples)]
    if not rows:
        raise UserError("no prompts to encode: the prompt set is empty")
    if getattr(processor, "chat_template", None):
        texts = [
            processor.apply_chat_template(user_turn(ex.prompt), add_generation_prompt=True, tokenize=False) for ex in rows
        ]
    else:
        # PaliGemma's format: image tokens first; its processor expands one to the full count.
        texts = [getattr(processor, "image_token", "<image>") + ex.prompt for ex in rows]
    images = [[ex.image] for ex in rows]
    batch = processor(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")
    # `labels` (PaliGemma) are for the processor's own SFT recipe; scoring builds its own targets.
    inputs = {k: v for k, v in batch.items() if isinstance(v, Tensor) and k != "labels"}
    attn = inputs["attention_mask"]
    if not bool(attn[:, -1].all()):
        raise UserError("processor did not left-pad the prompts; set its tokenizer's padding_side='left'")
    return PromptBatch(inputs)


def mrope_position_ids(
    model: Any, input_ids_BT: Tensor, mm_token_type_ids_BT: Tensor, attention_mask_BT: Tensor, inputs: dict[str, Tensor]
) -> Tensor:
    """Qwen2/2.5-VL 3-D rotary positions [3, B, T] for a full sequence, from the model's own rule."""
    inner = getattr(model, "model", model)
    extra = {k: inputs[k] for k in ("image_grid_thw", "video_grid_thw", "second_per_grid_ts") if k in inputs}
    positions, _ = inner.get_rope_index(
        input_ids_BT, mm_token_type_ids=mm_token_type_ids_BT, attention_mask=attention_mask_BT, **extra
    )
    return positions


def scoring_inputs(
    model: Any, prompt: PromptBatch, completion_ids_BC: Tensor, completion_mask_BC: Tensor
) -> dict[str, Tensor]:
    """Forward kwargs for `model` over prompt + completion, [B, T] (T = P + C).

    Everything position- or type-dependent is rebuilt for the whole sequence, the way
    `generate` saw it token by token: position ids follow the attention mask (left padding
    does not shift them); completion tokens are text (mm_token_type_ids 0) and causal suffix
    (PaliGemma token_type_ids 1). Tokens after the first EOS get attention 0.
    """
    family = family_of(model)
    p = prompt.inputs
    completion_ids_BC = completion_ids_BC.to(p["input_ids"].device)
    completion_mask_BC = completion_mask_BC.to(p["attention_mask"].device, p["attention_mask"].dtype)
    ids_BT = torch.cat([p["input_ids"], completion_ids_BC], dim=1)
    attn_BT = torch.cat([p["attention_mask"], completion_mask_BC], dim=1)
    out = {k: v for k, v in p.items() if k not in _TOKEN_KEYS}
    out.update(input_ids=ids_BT, attention_mask=attn_BT)
    if family == "rope1d":
        out["position_ids"] = (attn_BT.cumsum(dim=1) - 1).clamp(min=0)
    elif family == "prefix_lm":
        # Generated tokens join the causal suffix (1); PaliGemma counts positions from 1.
        out["token_type_ids"] = torch.cat([p["token_type_ids"], torch.ones_like(completion_ids_BC)], dim=1)
        out["position_ids"] = attn_BT.cumsum(dim=1).clamp(min=1)
    else:
        mm_BT = torch.cat([p["mm_token_type_ids"], torch.zeros_like(completion_ids_BC)], dim=1)
        out["mm_token_type_ids"] = mm_BT
        out["position_ids"] = mrope_position_ids(model, ids_BT, mm_BT, attn_BT, p)
    return out


def completion_logits(
    model: Any,
    prompt: PromptBatch,
    completion_ids_BC: Tensor,
    completion_mask_BC: Tensor,
    vocab_size: int | None = None,
) -> Tensor:
    """Logits that predict each completion token, [B, C, V] fp32 (V cut to `vocab_size`).

    Column c holds the logits at full-sequence position P-1+c, which predict completion token
    c. Only the last C+1 positions go through the LM head (`logits_to_keep`).
    """
    kwargs = scoring_inputs(model, prompt, completion_ids_BC, completion_mask_BC)
    num_completion = completion_ids_BC.shape[1]
    logits = model(**kwargs, logits_to_keep=num_completion + 1, use_cache=False).logits[:, :-1]
    if vocab_size is not None:
        logits = logits[..., :vocab_size]  # a padded teacher vocabulary: shared rows only
    return logits.float()


def sequence_loss_mask(prompt: PromptBatch, completion_mask_BC: Tensor) -> Tensor:
    """Which full-sequence tokens count in the loss, [B, T] long: generated text tokens only.

    0 on every prompt column (image, text and pad tokens alike), then the completion mask:
    1 up to and including the first EOS, 0 after it.
    """
    prompt_mask_BP = prompt.inputs["attention_mask"]
    return torch.cat([torch.zeros_like(prompt_mask_BP), completion_mask_BC.to(prompt_mask_BP)], dim=1)


@torch.no_grad()
def generate_completions(
    model: Any,
    processor: Any,
    prompt: PromptBatch,
    *,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> tuple[Tensor, Tensor]:
    """Sample one completion per row with `model.generate` (KV cache): ids [B, C], mask [B, C].

    The mask is 1 up to and including the first EOS. As in the text rollout, the folder's
    generation_config is swapped out (top_k off, no penalties): on-policy means sampling the
    model's own distribution at `temperature`; draws come from torch's global RNG.
    """
    from transformers import GenerationConfig

    tokenizer = processor.tokenizer
    eos = eos_token_ids(model, tokenizer)
    gen_cfg = GenerationConfig(
        suppress_tokens=placeholder_token_ids(model) or None,
        do_sample=not greedy, temperature=None if greedy else temperature, top_p=None if greedy else top_p,
        top_k=None if greedy else 0, max_new_tokens=max_new_tokens, eos_token_id=eos,
        pad_token_id=tokenizer.pad_token_id, use_cache=True,
    )
    was_training, saved_cfg = model.training, model.generation_config
    model.eval()
    model.generation_config = gen_cfg
    try:
        out = model.generate(**prompt.inputs)
    finally:
        model.generation_config = saved_cfg
        model.train(was_training)
    completion_BC = out[:, prompt.prompt_len :]
    return completion_BC, completion_mask(completion_BC, eos)


def placeholder_token_ids(model: Any) -> list[int]:
    """Ids of the image/video placeholder tokens of a VLM (from its config).

    A sampled completion must never contain one: the scoring pass would then see more
    placeholders than image features and fail (measured: a tiny LLaVA student sampled
    `<image>` within 40 OPD steps). Generation suppresses them, so samples come from the
    student's distribution renormalized without these few ids.
    """
    config = getattr(model, "config", model)
    keys = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
    return sorted({int(v) for k in keys if isinstance(v := getattr(config, k, None), int) and v >= 0})


def greedy_answers(
    model: Any, processor: Any, examples: Sequence[Any], max_new_tokens: int = 16, batch_size: int = 128
) -> list[str]:
    """Greedy completions (special tokens stripped) for examples with `.prompt` and `.image`."""
    out: list[str] = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        prompt = encode_visual_prompts(processor, chunk).to(next(model.parameters()).device)
        ids_BC, mask_BC = generate_completions(model, processor, prompt, max_new_tokens=max_new_tokens, greedy=True)
        out += decode_completions(processor.tokenizer, ids_BC, mask_BC)
    return out


# ----------------------------------------------------------------------------- rollout batches for the trainer


@dataclass
class VisualRollout:
    """A VLM rollout batch, shaped like `opdlab.distill.rollout.Rollout` where the trainer reads it.

    `prompts` maps a role ("student", "teacher", ...) to that model's own left-padded prompt
    inputs; the completion is shared. `targets_BC`, `mask_BC`, `completion_mask_BT`,
    `completions`, `examples`, `num_rows`, `num_tokens`, `rows`, `logits` and `frozen_logits` mean what
    they mean on `Rollout`, so the trainer never asks which kind of batch it holds.
    """

    prompts: dict[str, PromptBatch]
    completion_ids_BC: Tensor
    completion_mask_BC: Tensor
    completions: list[str]
    examples: list[Any]

    @property
    def targets_BC(self) -> Tensor:
        return self.completion_ids_BC

    @property
    def mask_BC(self) -> Tensor:
        return self.completion_mask_BC

    @property
    def completion_mask_BT(self) -> Tensor:
        """The student's full-sequence loss mask (its sum is the batch's completion-token count)."""
        return sequence_loss_mask(self.prompts["student"], self.completion_mask_BC)

    @property
    def num_rows(self) -> int:
        """B, the number of completions."""
        return len(self.examples)

    @property
    def num_tokens(self) -> int:
        """Completion tokens in the batch (those the loss counts)."""
        return int(self.completion_mask_BT.sum())

    def logits(self, model: Any, role: Role, vocab_size: int | None = None) -> Tensor:
        """`rollout_logits`: `model` through the prompt inputs of `role`, [B, C, V] (with autograd)."""
        return rollout_logits(model, self, role, vocab_size)

    def frozen_logits(self, model: Any, role: Role, vocab_size: int) -> Tensor:
        """`score_visual`: a frozen `model` through the prompt inputs of `role`, [B, C, V], no autograd."""
        return score_visual(model, self, vocab_size, role)

    def rows(self, start: int, stop: int) -> "VisualRollout":
        """Rows [start, stop) of every role's prompts and of the completion (a micro-batch)."""
        return VisualRollout(
            {role: p.rows(start, stop) for role, p in self.prompts.items()},
            self.completion_ids_BC[start:stop], self.completion_mask_BC[start:stop],
            self.completions[start:stop], self.examples[start:stop],
        )


def roll_out_visual(
    student: Any,
    processors: dict[str, Any],
    examples: Sequence[Any],
    *,
    samples: int = 1,
    max_new_tokens: int = 16,
    temperature: float = 1.0,
    top_p: float = 1.0,
    greedy: bool = False,
) -> VisualRollout:
    """Encode `examples` through every role's processor, sample from the student, return the batch.

    `processors` maps roles to processors and must contain "student" (usually also "teacher").
    """
    if "student" not in processors:
        raise ValueError("roll_out_visual: processors needs a 'student' entry")
    device = next(student.parameters()).device
    prompts = {role: encode_visual_prompts(proc, examples, samples).to(device) for role, proc in processors.items()}
    ids_BC, mask_BC = generate_completions(
        student, processors["student"], prompts["student"], max_new_tokens=max_new_tokens,
        temperature=temperature, top_p=top_p, greedy=greedy,
    )
    texts = decode_completions(processors["student"].tokenizer, ids_BC, mask_BC)
    rows = [ex for ex in examples for _ in range(samples)]
    return VisualRollout(prompts, ids_BC, mask_BC, texts, rows)


def rollout_logits(model: Any, batch: VisualRollout, role: str, vocab_size: int | None = None) -> Tensor:
    """`completion_logits` of `model` on `batch`, through the prompt inputs of `role`, [B, C, V]."""
    return completion_logits(model, batch.prompts[role], batch.completion_ids_BC, batch.completion_mask_BC, vocab_size)


def score_visual(teacher: Any, batch: VisualRollout, vocab_size: int, role: str = "teacher") -> Tensor:
    """Teacher logits on the student's tokens under `torch.inference_mode()`, cloned out of it, [B, C, V]."""
    with torch.inference_mode():
        logits = rollout_logits(teacher, batch, role, vocab_size)
    return logits.clone()
