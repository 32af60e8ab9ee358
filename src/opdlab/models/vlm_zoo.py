"""The built-in tiny vision-language pair, and tiny VLMs of other families for tests.

    paths = build_vlm_pair("shapes-vlm-tiny")     # copies the shipped weights into the cache
    model = AutoModelForImageTextToText.from_pretrained(paths.student)
    processor = AutoProcessor.from_pretrained(paths.student)

The default pair is LLaVA-style (`LlavaForConditionalGeneration`): a 2-layer CLIP vision
tower on 32 x 32 images with 16 x 16 patches (one per scene quadrant: 4 image tokens), a
2-layer MLP projector and a 3-layer Llama language model; the processor is a `LlavaProcessor` with a PIL image processor
and the built-in character tokenizer plus image tokens and a chat template for image parts.
Nothing is downloaded: configs, tokenizer and processor are all constructed here.

The weights ship inside the package (`opdlab/zoo_data/shapes-vlm-tiny/`); how they were trained
from the spec's seed is `opdlab.recipes.zoo_train_vlm` (`opdlab zoo build NAME --rebuild`).

`tiny_vlm(family)` builds random-weight Qwen2.5-VL / Qwen2-VL / PaliGemma / LLaVA models with
matching processors in well under a second, for the scoring tests of every supported family.
"""

from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import torch

from opdlab.errors import UserError
from opdlab.fileio import atomic_path
from opdlab.models.tokenizer import build_tokenizer
from opdlab.models.zoo import _is_complete, cache_dir, read_metadata  # one cache layout for every pair

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


def build_vlm_pair(name: str = "shapes-vlm-tiny") -> VlmPairPaths:
    """Return the cached VLM pair `name`, copying the weights shipped in the package into the cache first.

    A cached pair built from a different spec is replaced by the shipped one. Training the pair
    from its seed is `opdlab zoo build NAME --rebuild` (`opdlab.recipes.zoo_train_vlm`).
    """
    spec = get_vlm_spec(name)
    target = vlm_pair_dir(name)
    if not is_vlm_cached(name):
        shipped = shipped_vlm_dir(name)
        if shipped is None:
            raise UserError(f"VLM pair {name!r}: no weights of its current spec ship with this install and none are "
                            f"cached; train them with `opdlab zoo build {name} --rebuild`")
        with atomic_path(target) as tmp:
            shutil.copytree(shipped, tmp)
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
