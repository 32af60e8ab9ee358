"""Checkpoint resolution, name canonicalization and tensor matching."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from opdlab.analysis.pairs import Checkpoint, canonical_name, iter_pairs, match_tensors
from opdlab.errors import UserError


def _save(path, tensors):
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


def test_canonical_names_match_vlm_and_plain_lm():
    assert canonical_name("model.language_model.layers.3.mlp.up_proj.weight") == "model.layers.3.mlp.up_proj.weight"
    assert canonical_name("language_model.model.layers.0.self_attn.q_proj.weight") == "model.layers.0.self_attn.q_proj.weight"
    assert canonical_name("language_model.lm_head.weight") == "lm_head.weight"
    assert canonical_name("model.layers.0.mlp.up_proj.weight") == "model.layers.0.mlp.up_proj.weight"


def test_sharded_folder_single_file_and_run_folder_resolve(tmp_path):
    a = {"model.layers.0.w": torch.randn(3, 4), "model.norm.weight": torch.randn(4)}
    shard_dir = tmp_path / "sharded"
    _save(shard_dir / "model-00001-of-00002.safetensors", {"model.layers.0.w": a["model.layers.0.w"]})
    _save(shard_dir / "model-00002-of-00002.safetensors", {"model.norm.weight": a["model.norm.weight"]})
    (shard_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "model.layers.0.w": "model-00001-of-00002.safetensors",
        "model.norm.weight": "model-00002-of-00002.safetensors"}}))
    single = tmp_path / "single.safetensors"
    _save(single, a)
    run = tmp_path / "run"
    _save(run / "final" / "model.safetensors", a)
    (run / "config.yaml").write_text("method: opd\n")
    for path in (shard_dir, single, run):
        ck = Checkpoint(path)
        assert sorted(ck.names()) == sorted(a)
        assert torch.equal(ck.get("model.layers.0.w"), a["model.layers.0.w"])


def test_padded_vocabulary_compares_shared_rows(tmp_path):
    _save(tmp_path / "a.safetensors", {"model.embed_tokens.weight": torch.ones(10, 4)})
    _save(tmp_path / "b.safetensors", {"model.embed_tokens.weight": torch.ones(12, 4) * 2})
    base, tuned = Checkpoint(tmp_path / "a.safetensors"), Checkpoint(tmp_path / "b.safetensors")
    pairs = list(iter_pairs(base, tuned, torch.float32))
    assert pairs[0].source.shape == pairs[0].tuned.shape == (10, 4)


def test_mismatch_is_listed_or_skipped(tmp_path):
    _save(tmp_path / "a.safetensors", {"x": torch.zeros(2, 2), "y": torch.zeros(3), "z": torch.zeros(1)})
    _save(tmp_path / "b.safetensors", {"x": torch.zeros(2, 3), "y": torch.zeros(3), "w": torch.zeros(1)})
    base, tuned = Checkpoint(tmp_path / "a.safetensors"), Checkpoint(tmp_path / "b.safetensors")
    with pytest.raises(UserError) as err:
        match_tensors(base, tuned)
    msg = str(err.value)
    assert "z (only in base)" in msg and "w (only in tuned)" in msg and "x (shape [2, 2] vs [2, 3])" in msg
    assert "--skip-mismatched" in msg
    assert match_tensors(base, tuned, skip_mismatched=True).names == ["y"]


@pytest.mark.parametrize(
    ("make", "needle"),
    [
        (lambda p: p / "missing", "no such file or folder"),
        (lambda p: (p / "empty").mkdir() or p / "empty", "not a model folder"),
        (lambda p: _write(p / "w.bin", b"x"), "pickle checkpoints are not read"),
        (lambda p: _write(p / "t.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{"), "not a readable safetensors file"),
    ],
)
def test_bad_inputs_are_one_line_errors(tmp_path, make, needle):
    with pytest.raises(UserError, match=needle) as err:
        Checkpoint(make(tmp_path))
    assert "\n" not in str(err.value)


def test_truncated_safetensors_is_a_user_error(tmp_path):
    path = tmp_path / "t.safetensors"
    _save(path, {"x": torch.randn(64, 64)})
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupted"):
        Checkpoint(path).get("x")
