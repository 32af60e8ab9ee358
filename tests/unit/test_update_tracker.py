"""Update telemetry math on hand-made tensors, and bit-packed mask files."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file

from opdlab.errors import UserError
from opdlab.subnet import masks as M
from opdlab.subnet.update_tracker import UpdateTracker, rows_from_counts, tensor_counts


def test_counts_and_rows_by_hand():
    source = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.bfloat16)
    current = torch.tensor([1.0, 2.5, 3.0, 3.0], dtype=torch.bfloat16)
    previous = torch.tensor([False, True, True, False])
    counts, changed = tensor_counts(source, current, previous)
    assert changed.tolist() == [False, True, False, True]
    assert counts == {"numel": 4.0, "changed": 2.0, "delta_sq": 0.25 + 1.0, "source_sq": 30.0, "both": 1.0, "either": 3.0}
    row = rows_from_counts({"": counts, "mlp": counts})
    assert row["update/changed_fraction"] == 0.5 and row["update/changed_fraction/mlp"] == 0.5
    assert row["update/relative_norm"] == pytest.approx(math.sqrt(1.25 / 30.0))
    assert row["update/jaccard_previous"] == pytest.approx(1 / 3)
    first, _ = tensor_counts(source, current, None)
    assert "update/jaccard_previous" not in rows_from_counts({"": first})


def test_a_change_below_bf16_resolution_is_not_counted():
    source = torch.tensor([1.0, 1.0])
    current = torch.tensor([1.0 + 1e-4, 1.1])  # 1 + 1e-4 rounds to 1.0 in bf16
    counts, _ = tensor_counts(source.bfloat16(), current.bfloat16(), None)
    assert counts["changed"] == 1.0


def test_tracker_measures_snapshots_and_resumes(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=40))
    model.save_pretrained(tmp_path / "source")
    named = list(model.named_parameters())
    tracker = UpdateTracker(tmp_path / "source", named, masks_dir=tmp_path / "masks")
    assert tracker.measure(1)["update/changed_fraction"] == 0.0
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:2] += 1.0
    row = tracker.measure(2)
    n = sum(p.numel() for _, p in named)
    assert row["update/changed_fraction"] == pytest.approx(2 * 32 / n)
    assert row["update/changed_fraction/mlp"] > 0 and row["update/changed_fraction/attention"] == 0
    assert row["update/jaccard_previous"] == 0.0  # nothing was changed at step 1
    snap, meta = M.load_mask(tmp_path / "masks" / "step-2.safetensors")
    assert int(snap["model.layers.0.mlp.up_proj.weight"][:2].sum()) == 64 and meta["step"] == "2"
    again = UpdateTracker(tmp_path / "source", named)
    again.resume_from(tmp_path / "masks" / "step-2.safetensors")
    assert again.measure(3)["update/jaccard_previous"] == 1.0


def test_tracker_refuses_a_source_without_the_students_tensors(tmp_path):
    save_file({"other.weight": torch.zeros(2)}, str(tmp_path / "src.safetensors"))
    with pytest.raises(UserError, match="'w' is not in them"):
        UpdateTracker(tmp_path / "src.safetensors", [("w", torch.nn.Parameter(torch.zeros(2)))])


def test_packed_mask_round_trip_and_bad_header(tmp_path):
    g = torch.Generator().manual_seed(0)
    masks = {"a": torch.rand(7, 5, generator=g) < 0.3, "b": torch.rand(3, generator=g) < 0.5}
    M.save_mask(tmp_path / "p.safetensors", masks, {"kind": "test"}, packed=True)
    loaded, meta = M.load_mask(tmp_path / "p.safetensors")
    assert meta["packing"] == "bits" and all(torch.equal(loaded[k], masks[k]) for k in masks)
    save_file({"a": torch.zeros(5, dtype=torch.uint8)}, str(tmp_path / "bad.safetensors"), metadata={"packing": "bits"})
    with pytest.raises(UserError, match="no valid 'shapes'"):
        M.load_mask(tmp_path / "bad.safetensors")


@pytest.mark.parametrize("n", [1, 7, 8, 29, 64])
def test_streamed_counts_equal_the_whole_tensor_reference_across_block_edges(monkeypatch, n):
    from opdlab.subnet import update_tracker as U

    monkeypatch.setattr(U, "BLOCK", 8)  # several blocks, the last one partial
    g = torch.Generator().manual_seed(n)
    source = torch.randn(n, generator=g)
    current = source + (torch.rand(n, generator=g) < 0.4) * torch.randn(n, generator=g) * 0.1
    previous = torch.rand(n, generator=g) < 0.5
    want, want_mask = tensor_counts(source.bfloat16(), current.bfloat16(), previous)
    got, packed = U.streamed_counts(source, current, M.pack_bits(previous))
    assert torch.equal(M.unpack_bits(packed, n), want_mask)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-6), key
    again, _ = U.streamed_counts(source, current, None, source_sq=123.0)
    assert again["source_sq"] == 123.0 and "both" not in again
