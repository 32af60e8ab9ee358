"""`opdlab delta` end to end: delta -> apply rebuilds the tuned model folder bit for bit, and bad input is one line."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdlab.cli import main
from opdlab.models.zoo import pair_dir
from opdlab.subnet import delta as D


def run_cli(args, capsys):
    code = main(["delta", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def model_files(folder: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(folder.iterdir()) if f.is_file() and not f.name.startswith(".")}


def perturb(model, seed: int = 1) -> None:
    """Change ~3 % of the MLP weights, every coordinate of one norm, and leave the rest untouched."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "mlp" in name:
                m = torch.rand(p.shape, generator=g) < 0.03
                p[m] += 0.5
            elif name.endswith("layers.0.input_layernorm.weight"):
                p.add_(0.25)


@pytest.fixture(scope="module")
def student_folder():
    return pair_dir("sort-tiny") / "student"


def save_pair(root: Path, source: Path, dtype: torch.dtype) -> tuple[Path, Path]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from opdlab.distill.checkpoint import save_model

    tok = AutoTokenizer.from_pretrained(source)
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    save_model(root / "base", model, tok, dtype)
    perturb(model)
    save_model(root / "tuned", model, tok, dtype)
    return root / "base", root / "tuned"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_delta_then_apply_rebuilds_the_tuned_folder_bit_for_bit(student_folder, tmp_path, capsys, dtype):
    from transformers import AutoModelForCausalLM

    base, tuned = save_pair(tmp_path, student_folder, dtype)
    delta_f = tmp_path / "d.safetensors"
    code, out, err = run_cli([base, tuned, "--out", delta_f], capsys)
    assert code == 0, err
    assert "vs full checkpoint" in out and str(delta_f) in out
    full = (tuned / "model.safetensors").stat().st_size
    assert delta_f.stat().st_size < 0.2 * full  # ~3 % of the MLP coordinates changed

    manifest = D.read_manifest(delta_f)
    recs = manifest["tensors"]
    assert recs["model.layers.0.input_layernorm.weight"]["encoding"] == "dense"
    assert recs["model.embed_tokens.weight"]["encoding"] == "none"
    assert {recs[n]["encoding"] for n in recs if "mlp" in n} <= {"index", "bitmap"}
    # config and tokenizer are identical in BASE: taken from there, not carried
    assert manifest["side_files"]["tokenizer.json"]["from"] == "base"

    rebuilt = tmp_path / "rebuilt"
    code, out, err = run_cli(["--apply", base, delta_f, "--out", rebuilt], capsys)
    assert code == 0, err
    assert model_files(rebuilt) == model_files(tuned)  # every file, byte for byte
    a = AutoModelForCausalLM.from_pretrained(rebuilt, dtype="auto")
    b = AutoModelForCausalLM.from_pretrained(tuned, dtype="auto")
    assert a.dtype == dtype
    for (na, ta), (nb, tb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(ta, tb)

    # without --overwrite the folder is kept; with it, replaced
    code, _, err = run_cli(["--apply", base, delta_f, "--out", rebuilt], capsys)
    assert code == 2 and "--overwrite" in err
    code, _, err = run_cli(["--apply", base, delta_f, "--out", rebuilt, "--overwrite"], capsys)
    assert code == 0, err


def test_tied_and_sharded_checkpoint_keeps_its_layout(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=48, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "base", max_shard_size="8KB")
    perturb(model)
    with torch.no_grad():
        model.model.embed_tokens.weight[3] += 1.0  # the tied matrix changes too
    model.save_pretrained(tmp_path / "tuned", max_shard_size="8KB")
    shards = sorted((tmp_path / "tuned").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "tuned" / "model.safetensors.index.json").is_file()

    delta_f = tmp_path / "d.safetensors"
    assert run_cli([tmp_path / "base", tmp_path / "tuned", "--out", delta_f], capsys)[0] == 0
    rebuilt = tmp_path / "rebuilt"
    code, _, err = run_cli(["--apply", tmp_path / "base", delta_f, "--out", rebuilt], capsys)
    assert code == 0, err
    assert model_files(rebuilt) == model_files(tmp_path / "tuned")
    stored = {k for f in sorted(rebuilt.glob("*.safetensors")) for k in load_file(f)}
    assert "lm_head.weight" not in stored  # tied: written once, as TUNED was
    loaded = AutoModelForCausalLM.from_pretrained(rebuilt)
    assert loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    assert torch.equal(loaded.model.embed_tokens.weight, model.model.embed_tokens.weight)


def test_fp32_base_bf16_tuned_is_taken_against_the_cast_base(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    tuned_w = w.to(torch.bfloat16)
    tuned_w[:4] += 1
    save_file({"w": w, "b": torch.arange(5)}, str(tmp_path / "base.safetensors"))
    save_file({"w": tuned_w, "b": torch.arange(5)}, str(tmp_path / "tuned.safetensors"))
    delta_f = tmp_path / "d.safetensors"
    assert run_cli([tmp_path / "base.safetensors", tmp_path / "tuned.safetensors", "--out", delta_f], capsys)[0] == 0
    rec = D.read_manifest(delta_f)["tensors"]["w"]
    assert rec["base_dtype"] == "float32" and rec["dtype"] == "bfloat16"
    assert rec["changed"] == int((w.to(torch.bfloat16)[:4] != tuned_w[:4]).sum())  # rounding alone is no change
    code, _, err = run_cli(["--apply", tmp_path / "base.safetensors", delta_f, "--out", tmp_path / "r"], capsys)
    assert code == 0, err
    assert (tmp_path / "r" / "tuned.safetensors").read_bytes() == (tmp_path / "tuned.safetensors").read_bytes()


def one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    assert err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, err


def test_user_errors(tmp_path, capsys):
    w = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    files = {
        "base": {"w": w, "v": torch.ones(2)},
        "tuned": {"w": w + 1, "v": torch.ones(2)},
        "renamed": {"w": w, "u": torch.ones(2)},
        "reshaped": {"w": w.reshape(4, 3), "v": torch.ones(2)},
        "int": {"w": w.long(), "v": torch.ones(2)},
        "other": {"w": w * 2, "v": torch.ones(2)},
        "other_dtype": {"w": w.double(), "v": torch.ones(2)},
    }
    path = {}
    for name, tensors in files.items():
        path[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, str(path[name]))
    d = tmp_path / "d.safetensors"

    one_line_error(*run_cli([path["base"], path["renamed"], "--out", d], capsys)[::2], "'u' is only in TUNED")
    one_line_error(*run_cli([path["base"], path["reshaped"], "--out", d], capsys)[::2], "'w' has shape [4, 3]")
    one_line_error(*run_cli([path["int"], path["tuned"], "--out", d], capsys)[::2], "int64 in BASE but float32")
    one_line_error(*run_cli([path["base"], path["tuned"], "--out", tmp_path / "d.bin"], capsys)[::2], ".safetensors")
    one_line_error(*run_cli(["--out", d], capsys)[::2], "neither")
    one_line_error(*run_cli([path["base"], path["tuned"], "--apply", path["base"], d, "--out", d], capsys)[::2], "both")

    assert run_cli([path["base"], path["tuned"], "--out", d], capsys)[0] == 0
    one_line_error(*run_cli([path["base"], path["tuned"], "--out", d], capsys)[::2], "exists")
    r = tmp_path / "r"
    one_line_error(*run_cli(["--apply", path["other"], d, "--out", r], capsys)[::2], "'w' holds other values")
    one_line_error(*run_cli(["--apply", path["other_dtype"], d, "--out", r], capsys)[::2], "float64 [3, 4]",
                   "float32 [3, 4]")
    one_line_error(*run_cli(["--apply", path["renamed"], d, "--out", r], capsys)[::2], "'v' is missing from BASE")
    one_line_error(*run_cli(["--apply", path["base"], path["tuned"], "--out", r], capsys)[::2], "not an opdlab delta")
    one_line_error(*run_cli(["--apply", path["base"], tmp_path / "nope.safetensors", "--out", r], capsys)[::2],
                   "not found")
    assert not r.exists()  # nothing half-written

    # a damaged value is caught by TUNED's recorded hash
    stored = load_file(str(d))
    from safetensors import safe_open

    with safe_open(str(d), framework="pt") as fh:
        meta = fh.metadata()
    stored["value/w"] = stored["value/w"] + 1
    save_file(stored, str(tmp_path / "bad.safetensors"), metadata=meta)
    one_line_error(*run_cli(["--apply", path["base"], tmp_path / "bad.safetensors", "--out", r], capsys)[::2],
                   "damaged")


def test_side_file_taken_from_base_must_still_be_there(student_folder, tmp_path, capsys):
    base, tuned = save_pair(tmp_path, student_folder, torch.bfloat16)
    d = tmp_path / "d.safetensors"
    assert run_cli([base, tuned, "--out", d], capsys)[0] == 0
    moved = tmp_path / "base-without-tokenizer"
    shutil.copytree(base, moved)
    (moved / "tokenizer.json").unlink()
    one_line_error(*run_cli(["--apply", moved, d, "--out", tmp_path / "r"], capsys)[::2], "'tokenizer.json'",
                   "lacks it")
    # a changed config in TUNED is carried inside the delta instead
    cfg = json.loads((tuned / "config.json").read_text())
    cfg["use_cache"] = not cfg.get("use_cache", True)
    (tuned / "config.json").write_text(json.dumps(cfg))
    assert run_cli([base, tuned, "--out", d, "--overwrite"], capsys)[0] == 0
    assert D.read_manifest(d)["side_files"]["config.json"]["from"] == "delta"
    assert run_cli(["--apply", base, d, "--out", tmp_path / "r2"], capsys)[0] == 0
    assert model_files(tmp_path / "r2") == model_files(tuned)
