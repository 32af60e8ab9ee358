"""`torchrun --nproc-per-node 2 -m opdlab analyze` (gloo, CPU) writes what one process writes.

The tensors are shared out across the two ranks and rank 0 gathers the results. Every tensor
is analysed single-threaded in both runs (one worker thread per tensor), so the numbers must be
*equal*, not close: analysis.json, every CSV cell but the per-tensor `seconds`, and the spectra.
The pair has frames 256 wide or more (the fp32 Gram route) and narrower ones (fp64), 1-D
tensors, and a wide matrix. Each torchrun launch costs ~10 s on 2 cores, mostly imports.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdlab.cli import main

pytestmark = pytest.mark.slow

SHAPES = {
    "model.embed_tokens.weight": (640, 256),
    "model.layers.0.self_attn.q_proj.weight": (256, 256),
    "model.layers.0.self_attn.k_proj.weight": (64, 256),
    "model.layers.0.self_attn.k_proj.bias": (64,),
    "model.layers.0.mlp.up_proj.weight": (512, 256),
    "model.layers.0.mlp.down_proj.weight": (256, 512),
    "model.layers.0.input_layernorm.weight": (256,),
    "model.layers.1.mlp.gate_proj.weight": (300, 128),
    "model.norm.weight": (256,),
}


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("pair")
    g = torch.Generator().manual_seed(0)
    base, tuned = {}, {}
    for name, shape in SHAPES.items():
        w = (torch.randn(shape, generator=g) / shape[-1] ** 0.5).bfloat16()
        moved = torch.rand(shape, generator=g) < 0.2
        base[name] = w
        tuned[name] = torch.where(moved, (w.float() * 1.03 + 1e-3).bfloat16(), w)
    for side, tensors in (("base", base), ("tuned", tuned)):
        (root / side).mkdir()
        save_file(tensors, str(root / side / "model.safetensors"))
    return root / "base", root / "tuned"


def _torchrun(args: list[str], nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "opdlab", *args]
    return subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=240)


def _csv(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return [{k: v for k, v in row.items() if k != "seconds"} for row in csv.DictReader(fh)]


def test_two_processes_write_what_one_process_writes(pair, tmp_path):
    base, tuned = pair
    one, two = tmp_path / "one", tmp_path / "two"
    torch.set_num_threads(1)
    assert main(["analyze", str(base), str(tuned), "--out", str(one)]) == 0
    done = _torchrun(["analyze", str(base), str(tuned), "--out", str(two)])
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in two.iterdir())
    assert json.loads((two / "analysis.json").read_text()) == json.loads((one / "analysis.json").read_text())
    for name in ("tensors.csv", "groups_layer.csv", "groups_module.csv", "groups_block.csv"):
        assert _csv(two / name) == _csv(one / name), name
    rows = _csv(one / "tensors.csv")
    assert len(rows) == len(SHAPES) and {r["svd_method"] for r in rows} == {"gram", ""}
    s1, s2 = load_file(str(one / "spectra.safetensors")), load_file(str(two / "spectra.safetensors"))
    assert s1.keys() == s2.keys() and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_more_processes_than_tensors_and_errors_on_one_rank(pair, tmp_path):
    """Three ranks on a two-tensor pair (one rank idle); an existing --out stops every rank with one line."""
    base, tuned = pair
    small = tmp_path / "small"
    for side, src in (("base", base), ("tuned", tuned)):
        (small / side).mkdir(parents=True)
        t = load_file(str(src / "model.safetensors"))
        save_file({k: t[k] for k in ("model.norm.weight", "model.layers.0.self_attn.q_proj.weight")},
                  str(small / side / "model.safetensors"))
    out = tmp_path / "three"
    done = _torchrun(["analyze", str(small / "base"), str(small / "tuned"), "--out", str(out)], nproc=3)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert json.loads((out / "analysis.json").read_text())["summary"]["num_tensors"] == 2
    again = _torchrun(["analyze", str(small / "base"), str(small / "tuned"), "--out", str(out)], nproc=2)
    assert again.returncode != 0
    assert "not empty" in again.stderr or "overwrite" in again.stderr, again.stderr[-2000:]
