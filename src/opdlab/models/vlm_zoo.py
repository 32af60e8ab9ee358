"""The built-in tiny vision-language pair, and tiny VLMs of other families for tests.

    paths = build_vlm_pair("shapes-vlm-tiny")     # copies the shipped weights (or trains, ~1-5 min), then cached
    model = AutoModelForImageTextToText.from_pretrained(paths.student)
    processor = AutoProcessor.from_pretrained(paths.student)

The default pair is LLaVA-style (`LlavaForConditionalGeneration`): a 2-layer CLIP vision
tower on 32 x 32 images with 16 x 16 patches (one per scene quadrant: 4 image tokens), a
2-layer MLP projector and a 3-layer Llama language model; the processor is a `LlavaProcessor` with a PIL image processor
and the built-in character tokenizer plus image tokens and a chat template for image parts.
Nothing is downloaded: configs, tokenizer and processor are all constructed here.

How the pair is made (as for the text pairs in `opdlab.models.zoo`):
1. One model is trained from scratch by SFT (loss on answer tokens + EOS) on `shapes-count`
   questions, so every part — vision tower, projector, language model — has weights with
   structure. Why counting only: colour-at-cell and position questions need two hops (read
   the question, then pick the matching image token); at this size they stayed at chance for
   300 steps (measured), while counting leaves chance within ~125 steps.
2. The *student* is the first evaluation at which greedy held-out accuracy reaches
   `student_min_accuracy` (stopped by accuracy, not time: when tiny models leave a plateau
   varies by seed).
3. The *teacher* is the same run trained further, to `teacher_min_accuracy` or `max_steps`.

`tiny_vlm(family)` builds random-weight Qwen2.5-VL / Qwen2-VL / PaliGemma / LLaVA models with
matching processors in well under a second, for the scoring tests of every supported family.
"""

from __future__ import annotations

import dataclasses
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from opdlab.errors import UserError
from opdlab.fileio import atomic_path, write_json
from opdlab.models.zoo import METADATA_FILE, _is_complete, cache_dir, read_metadata  # one cache layout for every pair

IMAGE_TOKEN = "<image>"
QWEN_VISION_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>")
VlmFamily = Literal["llava", "qwen2_5_vl", "qwen2_vl", "paligemma"]

# How an image part of a user message is written, per family (the processor then expands
# the placeholder to one token per image embedding).
_IMAGE_PART = {
    "llava": IMAGE_TOKEN,
    "qwen2_5_vl": "<|vision_start|><|image_pad|><|vision_end|>",
    "qwen2_vl": "<|vision_start|><|image_pad|><|vision_end|>",
}


@dataclass(frozen=True)
class VlmPairSpec:
    """A built-in VLM pair: sizes, training recipe and the accuracies that stop training."""

    name: str
    description: str
    task: str = "shapes-count"
    seed: int = 0
    image_size: int = 32
    patch_size: int = 16  # one patch per quadrant of the 2 x 2 scene grid: 4 image tokens
    vision_hidden: int = 48
    vision_layers: int = 2
    text_hidden: int = 64
    text_layers: int = 3
    text_heads: int = 4
    batch_size: int = 32
    lr: float = 3e-3
    warmup_steps: int = 30
    train_pool: int = 4000
    num_eval: int = 100
    eval_every: int = 25
    student_min_accuracy: float = 0.40  # chance is ~25 % (four answers per question family)
    teacher_min_accuracy: float = 0.85
    max_steps: int = 1500
    max_new_tokens: int = 14
    threads: int = 2


VLM_PAIRS: dict[str, VlmPairSpec] = {
    "shapes-vlm-tiny": VlmPairSpec(
        name="shapes-vlm-tiny",
        description="0.17 M-param LLaVA-style pair counting coloured shapes; student >= 40 %, teacher >= 85 %",
    ),
}


@dataclass(frozen=True)
class VlmPairPaths:
    """Hugging Face folders (config, safetensors, processor + tokenizer files) of a built VLM pair."""

    name: str
    student: Path
    teacher: Path
    task: str


# ----------------------------------------------------------------------------- tokenizer and processors


def vlm_chat_template(image_part: str) -> str:
    """The character tokenizer's chat format, with image parts written as `image_part`.

    `<bos>` then per message a role marker and its content (a string, or a list of
    `{"type": "image"}` / `{"type": "text", "text": ...}` parts); assistant turns end with EOS.
    """
    return (
        "{{ bos_token }}"
        "{% for message in messages %}"
        "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
        "{{ raise_exception('unknown chat role: ' + message['role']) }}{% endif %}"
        "<|{{ message['role'] }}|>"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for part in message['content'] %}"
        "{% if part['type'] == 'image' %}"
        + image_part
        + "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )


def build_vlm_tokenizer(family: VlmFamily = "llava") -> Any:
    """The built-in character tokenizer plus image tokens (same ids for all text characters).

    Image tokens are appended after the text vocabulary, so a text token has the same id in
    the text and the VLM pairs.
    """
    from opdlab.models.tokenizer import build_tokenizer

    tok = build_tokenizer([IMAGE_TOKEN, *QWEN_VISION_TOKENS])
    tok.chat_template = None  # the text template has no image slot; families below get their own
    if family in _IMAGE_PART:
        tok.chat_template = vlm_chat_template(_IMAGE_PART[family])
    return tok


def _no_video_processor(cls: type) -> type:
    """`cls` accepting video_processor=None: Qwen video processors need torchvision.

    The image path never touches the video processor; machines with torchvision get the
    stock class from `AutoProcessor.from_pretrained`.
    """

    class ImageOnly(cls):  # type: ignore[misc,valid-type]  # dynamic subclass of a transformers processor
        def check_argument_for_proper_class(self, argument_name: str, argument: Any) -> Any:
            if argument_name == "video_processor" and argument is None:
                return None
            return super().check_argument_for_proper_class(argument_name, argument)

    ImageOnly.__name__ = cls.__name__
    return ImageOnly


def build_processor(family: VlmFamily = "llava", image_size: int = 32, patch_size: int = 8) -> Any:
    """A processor for `family` built offline: PIL image processor + the VLM character tokenizer."""
    tok = build_vlm_tokenizer(family)
    half = [0.5, 0.5, 0.5]
    if family == "llava":
        from transformers import LlavaProcessor
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

        images = CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_mean=half, image_std=half,
        )
        # The CLIP tower adds a CLS embedding that the "default" strategy drops: one token per patch.
        return LlavaProcessor(
            image_processor=images, tokenizer=tok, patch_size=patch_size, vision_feature_select_strategy="default",
            chat_template=tok.chat_template, image_token=IMAGE_TOKEN, num_additional_image_tokens=1,
        )
    if family in ("qwen2_5_vl", "qwen2_vl"):
        from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        pixels = image_size * image_size
        images = Qwen2VLImageProcessorPil(
            patch_size=patch_size, merge_size=2, temporal_patch_size=2,
            size={"shortest_edge": pixels, "longest_edge": pixels}, image_mean=half, image_std=half,
        )
        cls = _no_video_processor(Qwen2_5_VLProcessor if family == "qwen2_5_vl" else Qwen2VLProcessor)
        return cls(image_processor=images, tokenizer=tok, chat_template=tok.chat_template)
    if family == "paligemma":
        from transformers import PaliGemmaProcessor
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        size = {"height": image_size, "width": image_size}
        images = SiglipImageProcessorPil(size=size, image_mean=half, image_std=half)
        images.image_seq_length = (image_size // patch_size) ** 2
        # The processor finds `<image>` among the special tokens and appends PaliGemma's
        # location/segmentation tokens; the model's vocabulary is sized from len(tokenizer).
        return PaliGemmaProcessor(image_processor=images, tokenizer=tok)
    raise UserError(f"unknown VLM family {family!r}; known: llava, qwen2_5_vl, qwen2_vl, paligemma")


# ----------------------------------------------------------------------------- model configs


def model_config(family: VlmFamily, vocab: dict[str, int], *, image_size: int = 32, patch_size: int = 8,
                 vision_hidden: int = 32, vision_layers: int = 2, text_hidden: int = 64, text_layers: int = 2,
                 text_heads: int = 4) -> Any:
    """A tiny transformers config of `family` over the VLM character vocabulary."""
    text = dict(
        hidden_size=text_hidden, intermediate_size=2 * text_hidden, num_hidden_layers=text_layers,
        num_attention_heads=text_heads, num_key_value_heads=text_heads // 2, vocab_size=len(vocab),
        max_position_embeddings=256, pad_token_id=vocab["<pad>"], bos_token_id=vocab["<bos>"],
        eos_token_id=vocab["<eos>"], tie_word_embeddings=False,
    )
    if family == "llava":
        from transformers import LlavaConfig

        return LlavaConfig(
            vision_config=dict(
                model_type="clip_vision_model", hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size, patch_size=patch_size,
            ),
            text_config=dict(model_type="llama", **text),
            image_token_id=vocab[IMAGE_TOKEN], vision_feature_select_strategy="default", vision_feature_layer=-1,
            projector_hidden_act="gelu", tie_word_embeddings=False,
        )
    head_dim = text_hidden // text_heads
    if family in ("qwen2_5_vl", "qwen2_vl"):
        from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

        # mrope_section splits head_dim/2 rotary frequencies over (time, height, width).
        half = head_dim // 2
        section = [half - 2 * (half // 3), half // 3, half // 3]
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": section}
        vision = dict(
            depth=vision_layers, hidden_size=vision_hidden, num_heads=2, patch_size=patch_size,
            spatial_merge_size=2, temporal_patch_size=2,
        )
        ids = dict(
            image_token_id=vocab["<|image_pad|>"], video_token_id=vocab["<|video_pad|>"],
            vision_start_token_id=vocab["<|vision_start|>"], vision_end_token_id=vocab["<|vision_end|>"],
        )
        if family == "qwen2_5_vl":
            vision.update(
                intermediate_size=2 * vision_hidden, out_hidden_size=text_hidden, window_size=4 * patch_size,
                fullatt_block_indexes=[vision_layers - 1],
            )
            return Qwen2_5_VLConfig(vision_config=vision, text_config=dict(**text, rope_parameters=rope), **ids)
        # Qwen2-VL names the tower width embed_dim; hidden_size is the merger's output (text) width.
        vision.update(embed_dim=vision_hidden, hidden_size=text_hidden, mlp_ratio=2)
        return Qwen2VLConfig(vision_config=vision, text_config=dict(**text, rope_parameters=rope), **ids)
    if family == "paligemma":
        from transformers import PaliGemmaConfig

        return PaliGemmaConfig(
            vision_config=dict(
                model_type="siglip_vision_model", hidden_size=vision_hidden, intermediate_size=2 * vision_hidden,
                num_hidden_layers=vision_layers, num_attention_heads=2, image_size=image_size, patch_size=patch_size,
                projection_dim=text_hidden,
            ),
            text_config=dict(model_type="gemma", head_dim=head_dim, **text),
            image_token_id=vocab[IMAGE_TOKEN], projection_dim=text_hidden,
        )
    raise UserError(f"unknown VLM family {family!r}; known: llava, qwen2_5_vl, qwen2_vl, paligemma")


def tiny_vlm(family: VlmFamily, seed: int = 0, **sizes: int) -> tuple[Any, Any]:
    """A random-weight tiny VLM of `family` and its processor (for tests): (model, processor)."""
    from transformers import AutoModelForImageTextToText

    processor = build_processor(family, image_size=sizes.get("image_size", 32), patch_size=sizes.get("patch_size", 8))
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(model_config(family, processor.tokenizer.get_vocab(), **sizes))
    return model.eval(), processor


# ----------------------------------------------------------------------------- the built-in pair


def list_vlm_pairs() -> list[VlmPairSpec]:
    return list(VLM_PAIRS.values())


def get_vlm_spec(name: str) -> VlmPairSpec:
    try:
        return VLM_PAIRS[name]
    except KeyError:
        raise UserError(f"unknown VLM pair {name!r}; known: {', '.join(VLM_PAIRS)} (see `opdlab zoo list`)") from None


def build_vlm_pair(name: str = "shapes-vlm-tiny", rebuild: bool = False, progress: bool = True) -> VlmPairPaths:
    """Return the cached VLM pair `name`, training it from the spec's seed first if needed.

    A cached pair built from a different spec is replaced; `rebuild=True` always retrains.
    """
    spec = get_vlm_spec(name)
    target = vlm_pair_dir(name)
    if rebuild or not is_vlm_cached(name):
        shipped = shipped_vlm_dir(name)
        with atomic_path(target) as tmp:
            if shipped is not None and not rebuild:
                shutil.copytree(shipped, tmp)
            else:
                meta = train_vlm_pair(spec, tmp, progress=progress)
                meta.update(versions=_versions(), machine=f"{platform.machine()}, {spec.threads} torch threads")
                write_json(tmp / METADATA_FILE, meta)
    return VlmPairPaths(name=spec.name, student=target / "student", teacher=target / "teacher", task=spec.task)


def vlm_pair_dir(name: str) -> Path:
    """The cache folder of VLM pair `name` (next to the text pairs: CACHE/zoo/NAME)."""
    return cache_dir() / "zoo" / name


def is_vlm_cached(name: str) -> bool:
    """Whether the cache holds pair `name` built from its current spec."""
    folder = vlm_pair_dir(name)
    return _is_complete(folder) and read_metadata(folder).get("spec") == dataclasses.asdict(get_vlm_spec(name))


def shipped_vlm_dir(name: str) -> Path | None:
    """The pair's folder inside the installed package, if its weights ship with it (and match the spec)."""
    root = Path(str(resources.files("opdlab"))) / "zoo_data" / name
    if not _is_complete(root) or read_metadata(root).get("spec") != dataclasses.asdict(get_vlm_spec(name)):
        return None
    return root


def _versions() -> dict[str, str]:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version()}


# ----------------------------------------------------------------------------- training


def encode_answers(tokenizer: Any, answers: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Answer tokens + EOS, right-padded: ids [N, C] and mask [N, C] (1 on answer and EOS)."""
    seqs = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
    return ids, mask


def vlm_accuracy(model: Any, processor: Any, examples: list[Any], max_new_tokens: int = 14) -> float:
    """Greedy exact-match accuracy of `model` on visual examples."""
    from opdlab.data.visual_tasks import visual_accuracy
    from opdlab.distill.vlm import greedy_answers

    with torch.no_grad():
        return visual_accuracy(greedy_answers(model, processor, examples, max_new_tokens), examples)


def train_vlm_pair(spec: VlmPairSpec, folder: Path, progress: bool = True) -> dict[str, Any]:
    """Train the pair per `spec` into `folder` (student/, teacher/); return its metadata.

    SFT on answer tokens through the same scoring path OPD uses (`opdlab.distill.vlm`),
    so the pre-training exercises exactly the inputs distillation will see.
    """
    from tqdm.auto import tqdm
    from transformers import AutoModelForImageTextToText

    from opdlab.data.visual_tasks import get_visual_task
    from opdlab.distill.vlm import completion_logits, encode_visual_prompts

    start = time.perf_counter()
    threads_before = torch.get_num_threads()
    torch.set_num_threads(spec.threads)
    try:
        processor = build_processor("llava", spec.image_size, spec.patch_size)
        tok = processor.tokenizer
        config = model_config(
            "llava", tok.get_vocab(), image_size=spec.image_size, patch_size=spec.patch_size,
            vision_hidden=spec.vision_hidden, vision_layers=spec.vision_layers, text_hidden=spec.text_hidden,
            text_layers=spec.text_layers, text_heads=spec.text_heads,
        )
        torch.manual_seed(spec.seed)
        model = AutoModelForImageTextToText.from_config(config)
        task = get_visual_task(spec.task)
        train = task.examples(spec.train_pool, spec.seed, "train")
        evals = task.examples(spec.num_eval, spec.seed, "eval")
        prompts = encode_visual_prompts(processor, train)
        answers_NC, answer_mask_NC = encode_answers(tok, [ex.answer for ex in train])
        optimizer = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=0.01)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / spec.warmup_steps))
        order = torch.Generator().manual_seed(spec.seed)
        student: dict[str, torch.Tensor] | None = None
        history: list[tuple[int, float]] = []
        student_step, student_acc, teacher_acc, step = -1, 0.0, 0.0, 0
        bar = tqdm(total=spec.max_steps, desc=f"zoo {spec.name}", disable=not progress)
        model.train()
        while step < spec.max_steps:
            idx = torch.randint(0, len(train), (spec.batch_size,), generator=order)
            mask_BC = answer_mask_NC[idx]
            logits_BCV = completion_logits(model, prompts.select(idx), answers_NC[idx], mask_BC)
            nll_BC = torch.nn.functional.cross_entropy(logits_BCV.transpose(1, 2), answers_NC[idx], reduction="none")
            loss = (nll_BC * mask_BC).sum() / mask_BC.sum()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % spec.eval_every:
                continue
            acc = vlm_accuracy(model, processor, evals, spec.max_new_tokens)
            history.append((step, acc))
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{acc:.3f}")
            if student is None and acc >= spec.student_min_accuracy:
                student = {k: v.detach().clone() for k, v in model.state_dict().items()}
                student_step, student_acc = step, acc
            if student is not None and acc >= spec.teacher_min_accuracy:
                break
        bar.close()
        teacher_acc = history[-1][1] if history else 0.0
        if student is None or teacher_acc <= student_acc:
            raise UserError(
                f"zoo {spec.name}: training did not give a student (>= {spec.student_min_accuracy}) and a stronger "
                f"teacher in {spec.max_steps} steps (evals {history[-3:]}); try another seed"
            )
        folder.mkdir(parents=True, exist_ok=True)
        for role, weights in (("teacher", None), ("student", student)):
            if weights is not None:
                model.load_state_dict(weights)
            model.save_pretrained(folder / role)
            processor.save_pretrained(folder / role)
        return {
            "name": spec.name,
            "task": spec.task,
            "family": "llava",
            "spec": dataclasses.asdict(spec),
            "student": {"step": student_step, "eval_accuracy": student_acc},
            "teacher": {"step": step, "eval_accuracy": teacher_acc},
            "eval_history": history,
            "num_params": sum(p.numel() for p in model.parameters()),
            "build_seconds": round(time.perf_counter() - start, 1),
        }
    finally:
        torch.set_num_threads(threads_before)
