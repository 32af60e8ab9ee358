"""`opdlab mask` end to end on tiny Llama checkpoints: every mode, its files, and its user errors."""

from __future__ import annotations

import json

import pytest
import torch

from opdlab.cli import main
from opdlab.config import OptimConfig
from opdlab.subnet import masks as M
from opdlab.subnet.optimizers import build_optimizer


def tiny_llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=48, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """BASE and TUNED model folders; TUNED changes ~10 % of the MLP up-projections (visible in bf16)."""
    root = tmp_path_factory.mktemp("pair")
    model = tiny_llama()
    model.save_pretrained(root / "base")
    planted = {}
    with torch.no_grad():
        g = torch.Generator().manual_seed(1)
        for name, p in model.named_parameters():
            m = torch.zeros(p.shape, dtype=torch.bool)
            if "up_proj" in name:
                m = torch.rand(p.shape, generator=g) < 0.1
                p[m] += 0.25
            planted[name] = m
    model.save_pretrained(root / "tuned")
    return root, planted


def run_cli(args, capsys):
    code = main(["mask", *map(str, args)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_extract_random_like_union_intersect_overlap(pair, tmp_path, capsys):
    root, planted = pair
    mask_f = tmp_path / "m.safetensors"
    code, out, err = run_cli([root / "base", root / "tuned", "--out", mask_f], capsys)
    assert code == 0, err
    assert "mlp: density" in out and str(mask_f) in out
    masks, meta = M.load_mask(mask_f)
    assert meta["kind"] == "extract" and meta["dtype"] == "bf16" and float(meta["atol"]) == 0.0
    assert meta["source"] == str(root / "base") and meta["tuned"] == str(root / "tuned")
    assert float(meta["density"]) == pytest.approx(M.density(masks))
    for name, m in planted.items():
        assert torch.equal(masks[name], m), name

    ctrl_f = tmp_path / "c.safetensors"
    assert run_cli(["--random-like", mask_f, "--out", ctrl_f, "--seed", 7], capsys)[0] == 0
    ctrl, cmeta = M.load_mask(ctrl_f)
    assert cmeta["kind"] == "random_like" and cmeta["seed"] == "7" and cmeta["source"] == str(mask_f)
    assert all(int(ctrl[n].sum()) == int(masks[n].sum()) for n in masks)

    union_f, inter_f = tmp_path / "u.safetensors", tmp_path / "i.safetensors"
    assert run_cli(["--union", mask_f, ctrl_f, "--out", union_f], capsys)[0] == 0
    assert run_cli(["--intersect", mask_f, ctrl_f, "--out", inter_f], capsys)[0] == 0
    u, _ = M.load_mask(union_f)
    i, imeta = M.load_mask(inter_f)
    assert imeta["kind"] == "intersect" and imeta["dtype"] == "bf16"
    for n in masks:
        assert torch.equal(u[n], masks[n] | ctrl[n]) and torch.equal(i[n], masks[n] & ctrl[n])

    ov_f = tmp_path / "o.json"
    code, out, _ = run_cli(["--overlap", mask_f, ctrl_f, "--out", ov_f], capsys)
    assert code == 0 and "Jaccard" in out
    ov = json.loads(ov_f.read_text())
    assert ov["total"]["both"] == sum(int(i[n].sum()) for n in i)
    assert ov["total"]["a"] == ov["total"]["b"] == sum(int(masks[n].sum()) for n in masks)


def test_mask_from_cli_trains_a_real_model_exactly(pair, tmp_path, capsys):
    root, _ = pair
    mask_f = tmp_path / "m.safetensors"
    assert run_cli([root / "base", root / "tuned", "--out", mask_f, "--dtype", "fp32"], capsys)[0] == 0
    model = tiny_llama()
    named = list(model.named_parameters())
    fitted = M.fit_mask_to_model(M.load_mask(mask_f)[0], named, str(mask_f))
    before = {n: p.detach().clone() for n, p in named}
    opt = build_optimizer(named, OptimConfig(lr=1e-2, weight_decay=0.1), fitted)
    ids = torch.randint(0, 48, (4, 10), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        M.zero_grads_outside(named, fitted)
        opt.step()
    moved = 0
    for n, p in named:
        m = fitted[n]
        assert torch.equal(p.detach()[~m], before[n][~m]), n
        moved += int((p.detach()[m] != before[n][m]).sum())
    assert moved > 0.9 * sum(int(m.sum()) for m in fitted.values())


def test_top_like_ranks_the_update_at_another_masks_counts(pair, tmp_path, capsys):
    root, planted = pair
    mask_f, control_f, top_f = (tmp_path / f"{n}.safetensors" for n in ("m", "control", "top"))
    assert run_cli([root / "base", root / "tuned", "--out", mask_f], capsys)[0] == 0
    assert run_cli(["--random-like", mask_f, "--out", control_f, "--seed", "3"], capsys)[0] == 0
    code, out, err = run_cli([root / "base", root / "tuned", "--top-like", control_f, "--dtype", "fp32",
                              "--out", top_f], capsys)
    assert code == 0, err
    assert "mlp: density" in out
    control, _ = M.load_mask(control_f)
    top, meta = M.load_mask(top_f)
    assert meta["kind"] == "top_update_like" and meta["source"] == str(control_f) and meta["dtype"] == "fp32"
    # the random control holds the planted counts at random places; ranking |Δ| at those counts finds the
    # planted coordinates themselves, the only ones that moved
    some = False
    for name, m in planted.items():
        assert int(top[name].sum()) == int(control[name].sum())
        assert torch.equal(top[name], m), name
        some = some or bool(m.any()) and not torch.equal(control[name], m)
    assert some  # the control differed from the planted mask somewhere, so the ranking did the work
    code, _, err = run_cli(["--top-like", control_f, "--out", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "--top-like needs the two checkpoints" in err and len(err.strip().splitlines()) == 1


def test_user_errors(pair, tmp_path, capsys):
    root, _ = pair
    mask_f = tmp_path / "m.safetensors"
    assert run_cli([root / "base", root / "tuned", "--out", mask_f], capsys)[0] == 0

    code, _, err = run_cli(["--out", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "exactly one of" in err and "(got none)" in err
    code, _, err = run_cli([root / "base", "--random-like", mask_f, "--out", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "got extract, random_like" in err and len(err.strip().splitlines()) == 1
    code, _, err = run_cli([root / "base", "--out", tmp_path / "x.safetensors"], capsys)
    assert code == 2 and "needs two checkpoints" in err
    code, _, err = run_cli([root / "base", root / "tuned", "--out", mask_f], capsys)
    assert code == 2 and "exists; pass --overwrite" in err
    assert run_cli([root / "base", root / "tuned", "--out", mask_f, "--overwrite"], capsys)[0] == 0
    code, _, err = run_cli(["--overlap", mask_f, mask_f, "--out", tmp_path / "o.safetensors"], capsys)
    assert code == 2 and "must end in .json" in err
    junk = tmp_path / "junk.safetensors"
    junk.write_text("not a mask")
    code, _, err = run_cli(["--random-like", junk, "--out", tmp_path / "y.safetensors"], capsys)
    assert code == 2 and "junk.safetensors: not a readable safetensors" in err
    code, _, err = run_cli(["--union", mask_f, "--out", tmp_path / "z.safetensors"], capsys)
    assert code == 2 and "at least two" in err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.safetensors").exists()
