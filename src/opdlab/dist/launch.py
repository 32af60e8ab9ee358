"""`opdlab distill --nproc N ...`: the same command, re-launched under torchrun on N local processes.

    opdlab distill --nproc 4 --config run.yaml      # == torchrun --standalone --nproc-per-node 4 -m opdlab distill --config run.yaml

A convenience for one machine only; several nodes need torchrun (or Slurm) directly, see
docs/scale-out.md.
"""

from __future__ import annotations

import os
import subprocess
import sys

from opdlab.errors import UserError


def strip_nproc(argv: list[str]) -> list[str]:
    """`argv` without `--nproc N` / `--nproc=N`."""
    out: list[str] = []
    skip = False
    for item in argv:
        if skip:
            skip = False
            continue
        if item == "--nproc":
            skip = True
            continue
        if item.startswith("--nproc="):
            continue
        out.append(item)
    return out


def torchrun_command(argv: list[str], nproc: int) -> list[str]:
    """The torchrun command line that runs `opdlab <argv>` on `nproc` local processes."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
            "-m", "opdlab", *strip_nproc(argv)]


def relaunch(argv: list[str], nproc: int) -> int:
    """Run `opdlab <argv>` under torchrun and return its exit status."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise UserError("--nproc: already running under torchrun; drop --nproc (torchrun sets the process count)")
    if nproc < 1:
        raise UserError(f"--nproc {nproc}: must be >= 1")
    return subprocess.call(torchrun_command(argv, nproc))
