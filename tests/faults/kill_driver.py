"""Run `opdlab` in this process with a SIGKILL planted at one I/O point (used by test_interrupt.py).

    python tests/faults/kill_driver.py POINT N distill --resume RUN

POINT is where the process kills itself, at the N-th time it gets there:
  checkpoint-write  inside a checkpoint's temporary folder, with optimizer.pt half written
  prune             while an old checkpoint is being deleted (one file already gone)
  metrics-append    in the middle of appending a line to metrics.jsonl (a torn line)
  final-write       inside final/'s temporary folder, with model.safetensors half written

Random kills (test_interrupt.py) rarely land in these short windows; planting them makes sure
each is exercised. The hooks wrap library functions from outside, so src/ has no test hooks.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import sys
from pathlib import Path


def _die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def _half(path: Path) -> None:
    """Cut a just-written file to half its size, as a kill in the middle of writing it would."""
    size = path.stat().st_size
    with open(path, "r+b") as fh:
        fh.truncate(size // 2)


def plant(point: str, nth: int) -> None:
    import torch

    from opdlab.distill import checkpoint, logging

    count = {"n": 0}

    def due() -> bool:
        count["n"] += 1
        return count["n"] >= nth

    if point == "checkpoint-write":
        original_save = torch.save

        def save(obj, f, *a, **k):  # noqa: ANN001, ANN202 - same signature as torch.save
            original_save(obj, f, *a, **k)
            if Path(f).name == "optimizer.pt" and due():
                _half(Path(f))
                _die()

        torch.save = save
    elif point == "prune":
        original_rmtree = shutil.rmtree

        def rmtree(path, *a, **k):  # noqa: ANN001, ANN202
            p = Path(path)
            # A step checkpoint (under any name: pruning may rename it first), not a write temporary.
            if p.parent.name == "checkpoints" and (p / "trainer_state").is_dir() and due():
                # The weights go first, so a pruned-in-place checkpoint would look complete but not load.
                victim = p / "trainer_state" / "master.safetensors"
                if victim.is_file():
                    victim.unlink()
                _die()
            return original_rmtree(path, *a, **k)

        checkpoint.shutil.rmtree = rmtree  # type: ignore[attr-defined]  # the module's own reference
    elif point == "metrics-append":
        original_append = logging.append_jsonl

        def append(path, record):  # noqa: ANN001, ANN202
            if due():
                import json

                with open(path, "a", encoding="utf-8") as fh:
                    line = json.dumps(record)
                    fh.write(line[: len(line) // 2])
                    fh.flush()
                    os.fsync(fh.fileno())
                _die()
            return original_append(path, record)

        logging.append_jsonl = append
    elif point == "final-write":
        original_save_model = checkpoint.save_model

        def save_model(folder, *a, **k):  # noqa: ANN001, ANN202
            original_save_model(folder, *a, **k)
            if re.search(r"\.final\.tmp-", str(folder)) and due():
                _half(Path(folder) / "model.safetensors")
                _die()

        checkpoint.save_model = save_model
    else:
        raise SystemExit(f"kill_driver: unknown point {point!r}")


if __name__ == "__main__":
    point, nth, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    plant(point, nth)
    from opdlab.cli import main

    raise SystemExit(main(argv))
