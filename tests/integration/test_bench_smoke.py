"""Smoke tests: the benchmark scripts still run at their smallest sizes and write what the docs promise.

These check that the scripts work, not the numbers they measure (those are in docs/benchmarks.md).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))

HAS_TRL = importlib.util.find_spec("trl") is not None


def test_bench_train_opdlab_alone_tiny(tmp_path: Path) -> None:
    import bench_train

    out = tmp_path / "train.json"
    report = bench_train.main(["--sizes", "tiny", "--tools", "opdlab", "--trials", "1", "--steps", "1",
                               "--warmup", "0", "--workdir", str(tmp_path), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["settings"]["tools"] == ["opdlab"] and saved["machine"]["cpu_count"] >= 1
    assert len(saved["machine"]["load_average_start"]) == 3 and saved["versions"]["torch"]
    row = report["results"][0]["opdlab"]
    step = row["trials"][0][0]
    assert step["tokens"] > 0 and step["step_s"] > 0
    assert step["generate_s"] + step["teacher_s"] + step["update_s"] == pytest.approx(step["step_s"])
    assert row["tokens_per_s_median"] > 0 and row["peak_rss_mb"] >= row["rss_at_ready_mb"] > 0
    assert "trl" not in report["results"][0]


@pytest.mark.slow
@pytest.mark.optional
@pytest.mark.skipif(not HAS_TRL, reason="trl is not installed; the TRL side needs the bench extra: pip install -e '.[bench]'")
def test_bench_train_with_trl_tiny(tmp_path: Path) -> None:
    import bench_train

    report = bench_train.main(["--sizes", "tiny", "--trials", "1", "--steps", "1", "--warmup", "0",
                               "--workdir", str(tmp_path), "--out", str(tmp_path / "train.json")])
    result = report["results"][0]
    parity = result["parity"]
    # the like-for-like check: the same completions give the same loss and gradient in every implementation
    assert parity["agree"], parity
    assert parity["loss"]["opdlab"] == pytest.approx(parity["loss"]["trl_distillation_trainer"], rel=1e-5)
    assert result["trl"]["trials"][0][0]["tokens"] > 0
    assert result["opdlab_vs_trl"]["throughput_ratio_median"] > 0


def test_profile_train_tiny(tmp_path: Path) -> None:
    import profile_train

    report = profile_train.main(["--size", "tiny", "--steps", "1", "--warmup", "1", "--out", str(tmp_path / "p.json")])
    parts = {p["part"]: p["seconds_per_step"] for p in report["parts"]}
    assert parts["step: roll out (generate + decode)"] > 0 and parts["step: teacher scoring"] > 0
    assert report["step_s_from_metrics"] > 0 and report["top_own_time"]


def test_bench_step_smallest(tmp_path: Path) -> None:
    import bench_step

    report = bench_step.main(["--prompts", "2", "--samples", "2", "--max-new-tokens", "4", "--rounds", "1",
                              "--precisions", "fp32", "--out", str(tmp_path / "s.json")])
    saved = json.loads((tmp_path / "s.json").read_text())
    assert saved["benchmark"] == "step" and saved["machine"]["date"]
    assert set(report["timings"]["roll out, fp32"]) == {"fast (distill/decode.py)", "generate"}
    assert all(v["cpu_s_median"] > 0 for part in report["timings"].values() for v in part.values())


def test_bench_eval_smallest(tmp_path: Path) -> None:
    import bench_eval

    report = bench_eval.main(["--num-eval", "4", "--batch-size", "2", "--max-new-tokens", "4", "--rounds", "1",
                              "--threads", "1", "--out", str(tmp_path / "e.json")])
    saved = json.loads((tmp_path / "e.json").read_text())
    assert saved["benchmark"] == "eval" and saved["machine"]["date"]
    results = report["results"]
    assert set(results["timings"]) == {"reused", "forward"} and results["speedup_wall"] > 0
    assert results["max_abs_diff_reverse_kl_sum"] < 1e-4 and results["accuracy_equal"]


def test_bench_optimizer_tiny(tmp_path: Path) -> None:
    import bench_optimizer

    report = bench_optimizer.main(["--size", "tiny", "--trials", "1", "--steps", "1", "--threads", "1",
                                   "--out", str(tmp_path / "o.json")])
    names = [r["name"] for r in report["results"]]
    assert "torch AdamW (foreach=False)" in names and "masked AdamW 1%" in names


def test_run_all_covers_every_bench_script(capsys: pytest.CaptureFixture[str]) -> None:
    import run_all

    for quick in (False, True):
        plan = run_all.commands(Path("/tmp/r"), quick=quick, with_trl=True)
        scripts = {Path(cmd[1]).name for cmds in plan.values() for cmd in cmds}
        on_disk = {p.name for p in (ROOT / "bench").glob("*.py")} - {"run_all.py"}
        assert scripts == on_disk, "a bench script is missing from run_all.py (or run_all names a missing one)"
        assert all(cmd[cmd.index("--out") + 1].startswith("/tmp/r/") for cmds in plan.values() for cmd in cmds)
    assert run_all.main(["--dry-run", "--quick"]) == 0
    assert "bench_train.py" in capsys.readouterr().out


@pytest.mark.slow  # three child processes, each importing torch and transformers
def test_bench_masked_training_tiny(tmp_path: Path) -> None:
    import bench_masked_training

    out = tmp_path / "masked.json"
    report = bench_masked_training.main(["--size", "tiny", "--densities", "0.2", "--trials", "1", "--steps", "1",
                                         "--warmup", "0", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["benchmark"] == "masked_training" and saved["machine"]["date"]
    assert saved["settings"]["mask_density_measured"]["0.2"] == pytest.approx(0.2, abs=0.02)
    (row,) = report["summary"]["densities"]
    for key in ("peak_memory_ratio_masked_to_dense", "step_time_ratio_masked_to_dense"):
        assert row[key]["median"] > 0
    assert isinstance(row["meets_memory_target"], bool) and isinstance(row["meets_time_target"], bool)
    for config in ("dense", "0.2"):
        (run,) = report["runs"][config]
        assert run["steps"] and run["peak_rss_mb"] >= run["rss_at_start_mb"] > 0


@pytest.mark.slow  # a 4-step training run
def test_bench_telemetry_tiny(tmp_path: Path) -> None:
    import bench_telemetry

    out = tmp_path / "telemetry.json"
    report = bench_telemetry.main(["--steps", "4", "--every", "2", "--out", str(out)])
    (run,) = report["runs"].values()
    assert run["steps"] == 4 and run["tracked_steps"] == 2 and run["masks_saved"]
    assert 0 < run["cost_fraction"] == pytest.approx(run["tracking_s"] / run["step_s"], rel=1e-3)
    assert json.loads(out.read_text())["summary"]["runs"] == 1
