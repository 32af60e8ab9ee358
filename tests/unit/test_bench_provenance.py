"""bench/lib/provenance.py: result files record date and machine, and a re-run keeps the replaced run."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench" / "lib"))

from provenance import keep_history, machine  # noqa: E402


def test_machine_records_date_cpu_and_load():
    m = machine([1.0, 2.0, 3.0])
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", m["date"]) and m["cpu_count"] >= 1
    assert m["load_average_start"] == [1.0, 2.0, 3.0] and len(m["load_average_end"]) == 3
    assert set(m["cpu_flags"]) <= {"avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile"}
    assert m["memory_gib"] is None or m["memory_gib"] > 0


def test_a_rerun_moves_the_replaced_run_into_history(tmp_path):
    out = tmp_path / "train.json"
    first = {"benchmark": "train", "command": "python bench/bench_train.py", "machine": {"date": "2026-11-28"},
             "results": [1], "history": [{"date": "2026-11-27", "summary": "oldest"}]}
    out.write_text(json.dumps(first))
    second = keep_history(out, {"benchmark": "train", "results": [2]}, lambda previous: {"n": previous["results"]})
    assert second["results"] == [2]
    assert second["history"] == [{"date": "2026-11-27", "summary": "oldest"},
                                 {"date": "2026-11-28", "command": "python bench/bench_train.py",
                                  "machine": {"date": "2026-11-28"}, "summary": {"n": [1]}}]


def test_no_history_from_a_missing_unreadable_or_other_benchmark_file(tmp_path):
    report = {"benchmark": "train", "results": []}
    assert keep_history(tmp_path / "none.json", report) == report
    (tmp_path / "bad.json").write_text("{not json")
    assert keep_history(tmp_path / "bad.json", report) == report
    (tmp_path / "other.json").write_text(json.dumps({"benchmark": "optimizer", "results": [1]}))
    assert keep_history(tmp_path / "other.json", report) == report
