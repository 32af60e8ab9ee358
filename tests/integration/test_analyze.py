"""`opdlab analyze` / `opdlab compare` through the real CLI on tiny Llama checkpoints.

The pair is built from a config (no downloads), saved as sharded safetensors, and the tuned
side gets a planted sparse update with a known changed fraction.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdlab.cli import main

REQUIRED_SUMMARY = [
    "sparsity", "sparsity_atol_1e-05", "relative_update_norm", "median_rank_fraction_tol_1e-05",
    "median_top8_energy", "median_stable_rank", "principal_energy_both_rho_0.1",
    "principal_energy_both_rho_0.1_random", "low_magnitude_enrichment_rho_0.1",
    "principal_mask_enrichment_rho_0.1", "num_params", "num_tensors",
]
COMPARE_SUMMARY = ["jaccard", "jaccard_random", "jaccard_ratio", "coverage_a", "coverage_a_random", "coverage_a_ratio",
                   "coverage_b", "coverage_b_random", "coverage_b_ratio", "density_a", "density_b"]


def _tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=False)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(torch.bfloat16)


def _perturb(model, frac: float, seed: int) -> int:
    """Add 0.5 (always visible in bf16) to a random `frac` of every parameter; return the count."""
    g = torch.Generator().manual_seed(seed)
    changed = 0
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            idx = torch.randperm(flat.numel(), generator=g)[: round(frac * flat.numel())]
            flat[idx] = (flat[idx].float() + 0.5).to(p.dtype)
            changed += idx.numel()
    return changed


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpts")
    model = _tiny_llama()
    model.save_pretrained(root / "base", max_shard_size="200KB")
    total = sum(p.numel() for p in model.parameters())
    counts = {}
    for name, seed in (("tuned", 1), ("tuned_b", 2)):
        m = _tiny_llama()
        counts[name] = _perturb(m, 0.1, seed)
        m.save_pretrained(root / name, max_shard_size="200KB")
    return root, total, counts


def test_shards_were_written(folders):
    root, _, _ = folders
    assert (root / "base" / "model.safetensors.index.json").is_file()
    assert len(list((root / "base").glob("*.safetensors"))) > 1


def test_analyze_sharded_folders(folders, tmp_path):
    root, total, counts = folders
    out = tmp_path / "an"
    assert main(["analyze", str(root / "base"), str(root / "tuned"), "--out", str(out)]) == 0
    doc = json.loads((out / "analysis.json").read_text())
    assert doc["schema"] == 1 and doc["dtype"] == "bf16"
    s = doc["summary"]
    for k in REQUIRED_SUMMARY:
        assert k in s, k
    assert s["num_params"] == total
    assert s["sparsity"] == pytest.approx(1 - counts["tuned"] / total, abs=1e-12)
    assert set(doc["groups"]) == {"layer", "module", "block"}
    assert {r["group"] for r in doc["groups"]["module"]} >= {"q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm"}
    assert [r["group"] for r in doc["groups"]["layer"]][:2] == [0, 1]
    rows = list(csv.DictReader((out / "tensors.csv").open()))
    assert len(rows) == s["num_tensors"]
    assert {"name", "layer", "module", "block", "svd_method", "rank_fraction_tol_1e-05"} <= set(rows[0])
    up = next(r for r in rows if r["name"].endswith("layers.0.mlp.up_proj.weight"))
    assert up["svd_method"] == "gram" and up["module"] == "up" and up["block"] == "mlp" and up["layer"] == "0"
    norm = next(r for r in rows if r["name"].endswith("input_layernorm.weight"))
    assert norm["svd_method"] == "" and norm["rank_fraction_tol_1e-05"] == ""  # 1-D: no spectrum
    for png in ("layer_sparsity", "movement_layer_module", "energy_share_module", "delta_spectra",
                "principal_energy_rho", "magnitude_enrichment_rho"):
        assert (out / f"{png}.png").stat().st_size > 1000


def test_analyze_single_files_and_overwrite(folders, tmp_path):
    root, total, counts = folders
    files = {}
    for name in ("base", "tuned"):
        tensors = {}
        for f in sorted((root / name).glob("*.safetensors")):
            tensors.update(load_file(f))
        files[name] = tmp_path / f"{name}.safetensors"
        save_file(tensors, files[name])
    out = tmp_path / "single"
    assert main(["analyze", str(files["base"]), str(files["tuned"]), "--out", str(out)]) == 0
    s = json.loads((out / "analysis.json").read_text())["summary"]
    assert s["sparsity"] == pytest.approx(1 - counts["tuned"] / total, abs=1e-12)
    assert main(["analyze", str(files["base"]), str(files["tuned"]), "--out", str(out)]) == 2  # non-empty
    assert main(["analyze", str(files["base"]), str(files["tuned"]), "--out", str(out), "--overwrite",
                 "--dtype", "fp32"]) == 0


def test_identical_checkpoints_have_no_update(folders, tmp_path):
    root, _, _ = folders
    out = tmp_path / "same"
    assert main(["analyze", str(root / "base"), str(root / "base"), "--out", str(out)]) == 0
    s = json.loads((out / "analysis.json").read_text())["summary"]
    assert s["sparsity"] == 1.0 and s["relative_update_norm"] == 0.0
    assert s["principal_energy_both_rho_0.1"] is None  # undefined without an update


def test_mismatch_exits_2_with_one_line(folders, tmp_path, capsys):
    root, _, _ = folders
    tensors = {}
    for f in sorted((root / "tuned").glob("*.safetensors")):
        tensors.update(load_file(f))
    tensors.pop("model.layers.1.mlp.down_proj.weight")
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :64].contiguous()
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, bad)
    assert main(["analyze", str(root / "base"), str(bad), "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "down_proj" in err and "up_proj" in err and "--skip-mismatched" in err
    assert not (tmp_path / "x").exists()
    assert main(["analyze", str(root / "base"), str(bad), "--out", str(tmp_path / "y"), "--skip-mismatched"]) == 0
    doc = json.loads((tmp_path / "y" / "analysis.json").read_text())
    assert len(doc["skipped"]) == 2
    assert main(["analyze", str(tmp_path / "missing"), str(bad), "--out", str(tmp_path / "z")]) == 2


def test_compare_three_folders(folders, tmp_path):
    root, total, counts = folders
    out = tmp_path / "cmp"
    assert main(["compare", str(root / "base"), str(root / "tuned"), str(root / "tuned_b"), "--out", str(out)]) == 0
    doc = json.loads((out / "compare.json").read_text())
    assert doc["schema"] == 1 and doc["atol"] == 0.0
    for k in COMPARE_SUMMARY:
        assert k in doc["summary"], k
    assert doc["summary"]["density_a"] == pytest.approx(counts["tuned"] / total)
    # two independent random 10 % masks: overlap at chance (≈ 5 % sd at this size)
    assert doc["summary"]["jaccard_ratio"] == pytest.approx(1.0, abs=0.2)
    assert set(doc["groups"]) == {"module", "layer", "block"}
    assert (out / "compare.csv").is_file() and (out / "compare_jaccard_module.png").is_file()
    same = tmp_path / "cmp_same"
    assert main(["compare", str(root / "base"), str(root / "tuned"), str(root / "tuned"), "--out", str(same)]) == 0
    assert json.loads((same / "compare.json").read_text())["summary"]["jaccard"] == 1.0


def test_benchmark_small_smoke(tmp_path):
    """bench/bench_analysis.py --size small (opdlab side only): ~7 s, a child `python -m opdlab analyze`."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_analysis.py"
    spec = importlib.util.spec_from_file_location("bench_analysis", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    result = bench.main(["--size", "small", "--out", str(out), "--workdir", str(tmp_path)])
    assert json.loads(out.read_text())["size"] == "small"
    assert result["opdlab"]["wall_s"] > 0 and result["opdlab"]["peak_rss_mb"] > 0
    assert result["opdlab_summary"]["sparsity"] == pytest.approx(0.9, abs=0.01)  # 10 % planted


FAKE_REFERENCE = """
import argparse, csv, math
from pathlib import Path
from safetensors.torch import load_file
ap = argparse.ArgumentParser()
for flag in ("--src_model", "--opd_model", "--out_dir", "--device"):
    ap.add_argument(flag)
a = ap.parse_args()
src = load_file(str(Path(a.src_model) / "model.safetensors"))
opd = load_file(str(Path(a.opd_model) / "model.safetensors"))
Path(a.out_dir).mkdir(parents=True)
with open(Path(a.out_dir) / "tensor_metrics.csv", "w", newline="") as fh:
    w = csv.writer(fh)
    w.writerow(["name", "frac_delta_eq_0", "relative_delta_fro"])
    for name, s in src.items():
        d = opd[name].double() - s.double()
        w.writerow([name, repr(float((d == 0).double().mean())), repr(float(d.norm() / s.double().norm()))])
"""


def test_benchmark_reference_plumbing(tmp_path):
    """--reference runs a script with the study's CLI in its own process and maps its CSV columns
    onto tensors.csv. The stand-in computes two of the study's columns independently (fp64)."""
    import importlib.util

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_analysis.py"
    spec = importlib.util.spec_from_file_location("bench_analysis", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    fake = tmp_path / "analyze_opd_delta.py"
    fake.write_text(FAKE_REFERENCE)
    out = tmp_path / "bench.json"
    result = bench.main(["--size", "small", "--reference", str(fake), "--out", str(out), "--workdir", str(tmp_path)])
    assert result["reference"]["wall_s"] > 0 and result["reference"]["peak_rss_mb"] > 0 and result["speedup"] > 0
    rows = {r["opdlab"]: r for r in result["agreement"]["table"]}
    n = result["shapes"]["num_tensors"]
    for key in ("sparsity", "relative_update_norm"):
        assert rows[key]["tensors"] == n and rows[key]["max_rel_diff"] < 1e-6, key
    assert rows["rotation_rho_0.1"]["tensors"] == 0  # the stand-in writes no base_geometry_metrics.csv
    assert result["agreement"]["summary"]["metrics_compared"] == 2 and result["met"]["agreement"] is True
    assert json.loads(out.read_text())["reference"]["script_sha256"]


def test_precision_control_with_fp32_run_folder(tmp_path):
    """A run folder with final/ (bf16) and final-fp32/: tiny fp32 changes are rounded away in bf16."""
    model = _tiny_llama()  # bf16 values, so the fp32 base is exactly representable in bf16
    model.float().save_pretrained(tmp_path / "base")
    total = sum(p.numel() for p in model.parameters())
    g = torch.Generator().manual_seed(3)
    big = tiny = 0
    with torch.no_grad():
        for p in model.parameters():
            flat = p.view(-1)
            perm = torch.randperm(flat.numel(), generator=g)
            k = round(0.1 * flat.numel())
            flat[perm[:k]] += 0.5  # survives bf16
            nonzero = perm[k:2 * k][flat[perm[k:2 * k]] != 0]
            flat[nonzero] *= 1 + 2**-12  # far below half a bf16 ULP (2^-9 relative): rounded away
            big, tiny = big + k, tiny + nonzero.numel()
    run = tmp_path / "run"
    (run).mkdir()
    (run / "config.yaml").write_text("method: opd\n")
    model.save_pretrained(run / "final-fp32")
    model.to(torch.bfloat16).save_pretrained(run / "final")
    out = tmp_path / "an"
    assert main(["analyze", str(tmp_path / "base"), str(run), "--out", str(out)]) == 0
    doc = json.loads((out / "analysis.json").read_text())
    s = doc["summary"]
    assert doc["fp32_precision_control"] is True
    assert s["sparsity"] == pytest.approx(1 - big / total, abs=1e-12)
    assert s["sparsity_fp32"] == pytest.approx(1 - (big + tiny) / total, abs=1e-12)
    assert s["rounded_away_fraction"] == pytest.approx(tiny / total, abs=1e-12)
    assert s["below_half_ulp_fraction"] == pytest.approx(1 - big / total, abs=1e-12)

    # An fp32 analysis of the same run folder reads final-fp32/ (the tiny changes are there), and an
    # fp32 mask / comparison likewise; casting final/ up to fp32 would have lost them.
    out32 = tmp_path / "an32"
    assert main(["analyze", str(tmp_path / "base"), str(run), "--out", str(out32), "--dtype", "fp32"]) == 0
    s32 = json.loads((out32 / "analysis.json").read_text())["summary"]
    assert s32["sparsity"] == pytest.approx(1 - (big + tiny) / total, abs=1e-12)
    mask_file = tmp_path / "m32.safetensors"
    assert main(["mask", str(tmp_path / "base"), str(run), "--out", str(mask_file), "--dtype", "fp32"]) == 0
    assert sum(int(m.sum()) for m in load_file(str(mask_file)).values()) == big + tiny
    cmp_dir = tmp_path / "cmp32"
    assert main(["compare", str(tmp_path / "base"), str(run), str(run), "--out", str(cmp_dir), "--dtype", "fp32"]) == 0
    cmp = json.loads((cmp_dir / "compare.json").read_text())
    assert cmp["summary"]["jaccard"] == pytest.approx(1.0)
    assert cmp["summary"]["density_a"] == pytest.approx((big + tiny) / total, abs=1e-12)
