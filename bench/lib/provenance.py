"""Where and when a benchmark ran, and the runs its result file held before.

    from provenance import keep_history, machine
    report["machine"] = machine(load_start)          # date, CPU model and flags, memory, GPU, load
    report = keep_history(out, report, summary)      # the replaced run joins out's `history` list

Every measured number in the docs carries a date, a machine and a command; the result files are
where those come from, so each records them itself. A re-run replaces a result file's numbers;
`keep_history` moves the replaced run (its date, command, machine and a summary of its results)
into the file's `history` list instead of dropping it.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

# CPU features that change what CPU timings mean (wide vectors, bf16 matrix units).
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _cpuinfo() -> dict[str, str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return {}
    info: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() not in info:
            info[key.strip()] = value.strip()
    return info


def _memory_gib() -> float | None:
    try:
        return round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        return None


def _gpu() -> str | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def machine(load_start: tuple[float, float, float] | list[float] | None = None) -> dict[str, Any]:
    """The machine and moment of a run; call at its end, with the load average taken at its start."""
    info = _cpuinfo()
    flags = set(info.get("flags", "").split())
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d"),
        "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_model": info.get("model name"),
        "cpu_flags": [f for f in NOTABLE_FLAGS if f in flags],
        "cpu_count": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "gpu": _gpu(),
        "load_average_start": list(load_start) if load_start is not None else None,
        "load_average_end": load,
    }


def keep_history(out: str | Path, report: dict[str, Any],
                 summary: Callable[[dict[str, Any]], Any] = lambda previous: previous.get("results")) -> dict[str, Any]:
    """`report` with `history`: what `out` held before (its history, then its own run, summarized)."""
    path = Path(out)
    try:
        previous = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return report
    if not isinstance(previous, dict) or previous.get("benchmark") != report.get("benchmark"):
        return report
    history = list(previous.get("history", []))
    prev_machine = previous.get("machine") or {}
    history.append({"date": prev_machine.get("date"), "command": previous.get("command"), "machine": prev_machine,
                    "summary": summary(previous)})
    return {**report, "history": history}


def report_header(benchmark: str, script: str, argv: list[str] | None,
                  load_start: tuple[float, float, float] | list[float] | None) -> dict[str, Any]:
    """The fields every result file starts with: schema, benchmark name, the command line and the machine."""
    args = argv if argv is not None else sys.argv[1:]
    return {"schema": 1, "benchmark": benchmark, "command": f"python bench/{script} " + " ".join(args),
            "machine": machine(load_start)}
