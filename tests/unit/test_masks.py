"""Mask files, fitting masks to models, random controls, combination, overlap and extraction."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from opdlab.config import OptimConfig
from opdlab.errors import UserError
from opdlab.subnet import masks as M
from opdlab.subnet.optimizers import build_optimizer


def planted() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.rand(40, 30, generator=g) < 0.1,
        "model.layers.0.input_layernorm.weight": torch.rand(30, generator=g) < 0.7,
        "lm_head.weight": torch.zeros(12, 30, dtype=torch.bool),
    }


# ----------------------------------------------------------------------------- files


def test_save_load_round_trip(tmp_path):
    masks = planted()
    meta = M.mask_metadata("extract", masks, source="a", tuned="b", atol=0.0, dtype="bf16", seed=None)
    M.save_mask(tmp_path / "m.safetensors", masks, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]  # no temp files left behind
    loaded, meta2 = M.load_mask(tmp_path / "m.safetensors")
    assert meta2 == meta and "seed" not in meta2
    assert float(meta2["density"]) == pytest.approx(M.density(masks))
    for name, m in masks.items():
        assert loaded[name].dtype == torch.bool and torch.equal(loaded[name], m)


def test_density_is_numel_weighted():
    masks = {"a": torch.tensor([True, False, False, False]), "b": torch.ones(6, dtype=torch.bool)}
    assert M.density(masks) == pytest.approx(7 / 10)


def test_load_errors_name_the_file_or_tensor(tmp_path):
    with pytest.raises(UserError, match="missing.safetensors: mask file not found"):
        M.load_mask(tmp_path / "missing.safetensors")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"this is not a safetensors file at all")
    with pytest.raises(UserError, match="junk.safetensors: not a readable safetensors"):
        M.load_mask(junk)
    floats = tmp_path / "floats.safetensors"
    save_file({"ok": torch.ones(3, dtype=torch.bool), "model.w": torch.ones(3)}, str(floats))
    with pytest.raises(UserError, match="floats.safetensors: tensor 'model.w' has dtype F32"):
        M.load_mask(floats)


# ----------------------------------------------------------------------------- fitting to a model


class Small(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.model = torch.nn.Module()
        self.model.proj = torch.nn.Linear(6, 4)
        self.head = torch.nn.Linear(4, 3, bias=False)


def test_fit_matches_canonical_names_and_freezes_missing():
    net = Small()
    masks = {"model.language_model.proj.weight": torch.ones(4, 6, dtype=torch.bool),  # VLM-style prefix
             "head.weight": torch.eye(3, 4, dtype=torch.bool)}
    with pytest.warns(UserWarning, match=r"1 parameter\(s\) \(4 coordinates\) have no mask entry"):
        fitted = M.fit_mask_to_model(masks, net.named_parameters(), "m.safetensors")
    assert set(fitted) == {"model.proj.weight", "model.proj.bias", "head.weight"}
    assert fitted["model.proj.weight"].all() and not fitted["model.proj.bias"].any()
    assert torch.equal(fitted["head.weight"], torch.eye(3, 4, dtype=torch.bool))


def test_fit_errors_name_the_tensor():
    net = Small()
    with pytest.raises(UserError, match=r"m.safetensors: tensor 'head.weight' has shape \[4, 3\]"):
        M.fit_mask_to_model({"head.weight": torch.ones(4, 3, dtype=torch.bool)}, net.named_parameters(), "m.safetensors")
    with pytest.raises(UserError, match="mask tensor 'model.layers.9.w' is not a parameter"):
        M.fit_mask_to_model({"model.layers.9.w": torch.ones(2, dtype=torch.bool)}, net.named_parameters(), "m.safetensors")
    with pytest.raises(UserError, match="tensor 'head.weight' has dtype torch.float32"):
        M.fit_mask_to_model({"head.weight": torch.ones(3, 4)}, net.named_parameters(), "m.safetensors")


def test_zero_grads_outside_is_exact_even_for_nan():
    net = Small()
    named = list(net.named_parameters())
    masks = {n: torch.rand(p.shape) < 0.5 for n, p in named if n != "model.proj.bias"}
    for _, p in named:
        p.grad = torch.full_like(p, float("nan"))
        p.grad[torch.rand(p.shape) < 0.5] = 3.0
    keep = {n: p.grad.clone() for n, p in named}
    M.zero_grads_outside(named, masks)
    for n, p in named:
        if n not in masks:
            assert p.grad is None
            continue
        m = masks[n]
        assert torch.equal(p.grad[~m], torch.zeros(int((~m).sum())))
        assert torch.equal(p.grad[m].nan_to_num(7.0), keep[n][m].nan_to_num(7.0))


# ----------------------------------------------------------------------------- random controls, combining


def test_random_like_matches_counts_exactly_and_differs():
    masks = planted()
    masks["full"] = torch.ones(5, 7, dtype=torch.bool)
    masks["dense_ish"] = torch.rand(50, 50, generator=torch.Generator().manual_seed(1)) < 0.8  # complement path
    ctrl = M.random_like(masks, seed=3)
    for name, m in masks.items():
        assert ctrl[name].shape == m.shape and ctrl[name].dtype == torch.bool
        assert int(ctrl[name].sum()) == int(m.sum()), name
    for name in ("model.layers.0.mlp.up_proj.weight", "dense_ish"):
        assert not torch.equal(ctrl[name], masks[name])
    again = M.random_like(masks, seed=3)
    assert all(torch.equal(again[n], ctrl[n]) for n in masks)
    other = M.random_like(masks, seed=4)
    assert not torch.equal(other["dense_ish"], ctrl["dense_ish"])
    # each tensor's draw depends only on (seed, name), not on the other tensors
    alone = M.random_like({"dense_ish": masks["dense_ish"]}, seed=3)
    assert torch.equal(alone["dense_ish"], ctrl["dense_ish"])


def test_sample_indices_is_uniform():
    """Each of n = 20 coordinates is picked with probability k/n (here 0.3) over many draws."""
    g = torch.Generator().manual_seed(0)
    hits = torch.zeros(20)
    for _ in range(2000):
        idx = M.sample_indices(20, 6, g)
        assert idx.numel() == 6 and idx.unique().numel() == 6
        hits[idx] += 1
    freq = hits / 2000
    assert (freq - 0.3).abs().max() < 0.04  # ~4 binomial standard deviations


def test_union_and_intersect():
    a = {"w": torch.tensor([True, True, False, False])}
    b = {"w": torch.tensor([True, False, True, False])}
    c = {"w": torch.tensor([True, True, True, False])}
    assert M.union([a, b])["w"].tolist() == [True, True, True, False]
    assert M.intersect([a, b, c])["w"].tolist() == [True, False, False, False]
    assert a["w"].tolist() == [True, True, False, False]  # inputs untouched
    with pytest.raises(UserError, match="b.safetensors: tensor 'w' has shape"):
        M.union([a, {"w": torch.ones(5, dtype=torch.bool)}], ["a.safetensors", "b.safetensors"])
    with pytest.raises(UserError, match="tensor 'v' is not in every mask"):
        M.intersect([a, {"w": b["w"], "v": b["w"]}])
    with pytest.raises(UserError, match="at least two"):
        M.union([a])


def test_overlap_counts_and_chance():
    a = {"x": torch.tensor([True, True, False, False]), "y": torch.tensor([True, False])}
    b = {"x": torch.tensor([True, False, True, False]), "y": torch.tensor([True, True])}
    out = M.overlap(a, b)
    total = out["total"]
    assert (total["n"], total["a"], total["b"], total["both"]) == (6, 3, 4, 2)
    assert total["jaccard"] == pytest.approx(2 / 5)
    assert total["coverage_a"] == pytest.approx(2 / 3) and total["coverage_a_random"] == pytest.approx(4 / 6)
    assert out["tensors"]["y"]["jaccard"] == pytest.approx(1 / 2)
    assert M.overlap(a, a)["total"]["jaccard"] == 1.0


# ----------------------------------------------------------------------------- extraction


def write(path, tensors):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


def test_extract_planted_change_fp32_bf16_and_atol(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(30, 20)
    tuned = w.clone()
    big = torch.zeros(30, 20, dtype=torch.bool)
    big[torch.randperm(600)[:60].view(-1) // 20, torch.randperm(600)[:60].view(-1) % 20] = True
    tuned[big] += 0.5                      # visible in bf16 too
    tiny = torch.zeros(30, 20, dtype=torch.bool)
    tiny[0, :] = ~big[0, :]
    tuned[tiny] *= 1 + 2**-15              # below bf16 resolution, visible in fp32
    base_f = write(tmp_path / "base.safetensors", {"model.w": w, "model.b": torch.ones(7)})
    tuned_f = write(tmp_path / "tuned.safetensors", {"model.w": tuned, "model.b": torch.ones(7)})
    fp32 = M.extract_mask(base_f, tuned_f, atol=0.0, dtype="fp32", progress=False)
    assert torch.equal(fp32["model.w"], big | tiny) and not fp32["model.b"].any()
    bf16 = M.extract_mask(base_f, tuned_f, atol=0.0, dtype="bf16", progress=False)
    assert torch.equal(bf16["model.w"], big)
    loose = M.extract_mask(base_f, tuned_f, atol=1.0, dtype="fp32", progress=False)
    assert not loose["model.w"].any()


def test_extract_padded_vocabulary_keeps_base_shape(tmp_path):
    emb = torch.randn(10, 4)
    tuned = torch.cat([emb, torch.randn(2, 4)])
    tuned[3, 1] += 1.0
    base_f = write(tmp_path / "b.safetensors", {"model.embed_tokens.weight": emb})
    tuned_f = write(tmp_path / "t.safetensors", {"model.embed_tokens.weight": tuned})
    m = M.extract_mask(base_f, tuned_f, dtype="fp32", progress=False)["model.embed_tokens.weight"]
    assert m.shape == (10, 4) and int(m.sum()) == 1 and bool(m[3, 1])


class Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = torch.nn.Embedding(32, 16)
        self.up = torch.nn.Linear(16, 32)
        self.down = torch.nn.Linear(32, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(self.embed(ids)))).mean(1)


def run(net, opt, data, masks=None):
    named = list(net.named_parameters())
    for ids, y in data:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(ids), y).backward()
        if masks is not None:
            M.zero_grads_outside(named, masks)
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        opt.step()


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_retraining_on_a_real_update_mask(tmp_path, optimizer):
    """Dense steps -> extract the mask -> masked retraining from the source: outside bit-identical, inside moves."""
    g = torch.Generator().manual_seed(5)
    # only token ids < 12 occur, so most embedding rows never get a gradient and stay unchanged
    data = [(torch.randint(0, 12, (8, 4), generator=g), torch.randn(8, 4, generator=g)) for _ in range(2)]
    cfg = OptimConfig(optimizer=optimizer, lr=1e-3, momentum=0.9)
    source = Net()
    base_f = write(tmp_path / "base.safetensors", dict(source.state_dict()))
    dense = Net()
    run(dense, build_optimizer(list(dense.named_parameters()), cfg), data)
    tuned_f = write(tmp_path / "tuned.safetensors", dict(dense.state_dict()))
    mask = M.extract_mask(base_f, tuned_f, dtype="fp32", progress=False)
    assert 0.3 < M.density(mask) < 0.95

    sub = Net()
    fitted = M.fit_mask_to_model(mask, sub.named_parameters(), "mask")
    opt = build_optimizer(list(sub.named_parameters()), cfg, fitted)
    run(sub, opt, data, fitted)
    for name, p in sub.named_parameters():
        m, w0 = fitted[name], source.state_dict()[name]
        assert torch.equal(p.detach()[~m], w0[~m]), name
        assert bool((p.detach()[m] != w0[m]).all()), name
        # the dense run moved nothing outside its own mask, so the same steps reproduce it
        torch.testing.assert_close(p.detach(), dense.state_dict()[name], rtol=1e-6, atol=1e-7)


def test_overlap_by_block_adds_up():
    g = torch.Generator().manual_seed(2)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
             "model.layers.0.self_attn.q_proj.weight"]
    a = {n: torch.rand(6, 5, generator=g) < 0.3 for n in names}
    b = {n: torch.rand(6, 5, generator=g) < 0.5 for n in names}
    out = M.overlap(a, b)
    mlp = out["blocks"]["mlp"]
    assert mlp["both"] == sum(int((a[n] & b[n]).sum()) for n in names[:2]) and mlp["n"] == 60
    assert out["blocks"]["attention"]["a"] == int(a[names[2]].sum())


# ----------------------------------------------------------------------------- the fp32 top-update control


def test_top_update_like_keeps_per_tensor_counts_and_picks_the_largest(tmp_path):
    torch.manual_seed(1)
    w, b = torch.randn(20, 10), torch.randn(10)
    step_w = torch.rand(20, 10) * 1e-3          # distinct magnitudes: the top k is unique
    step_b = torch.rand(10) * 1e-3
    base_f = write(tmp_path / "base.safetensors", {"model.w": w, "model.b": b})
    tuned_f = write(tmp_path / "tuned.safetensors", {"model.w": w + step_w, "model.b": b - step_b})
    like = {"model.w": torch.zeros(20, 10, dtype=torch.bool), "model.b": torch.zeros(10, dtype=torch.bool)}
    like["model.w"].view(-1)[torch.randperm(200)[:37]] = True   # an arbitrary mask: only its counts matter
    like["model.b"][[0, 5]] = True
    top = M.top_update_like(base_f, tuned_f, like, progress=False)
    assert {k: int(v.sum()) for k, v in top.items()} == {"model.w": 37, "model.b": 2}
    # independent reference: the 37 largest fp32 changes of w, by sorting
    delta_w = ((w + step_w) - w).abs().flatten()
    expected = torch.zeros(200, dtype=torch.bool)
    expected[delta_w.argsort(descending=True)[:37]] = True
    assert torch.equal(top["model.w"].flatten(), expected)
    assert set(top["model.b"].nonzero().flatten().tolist()) == set(((b - step_b) - b).abs().argsort()[-2:].tolist())
    # an empty tensor stays empty; a count above the changed coordinates still gives exactly that count
    like["model.b"][:] = False
    assert not M.top_update_like(base_f, tuned_f, like, progress=False)["model.b"].any()


def test_top_update_like_differs_from_a_threshold_mask_and_names_missing_tensors(tmp_path):
    w = torch.ones(4, 4)
    tuned = w.clone()
    tuned[0, 0] += 1e-3      # large update
    tuned[1, 1] += 2e-6      # small update, still > 1e-6
    base_f = write(tmp_path / "base.safetensors", {"model.w": w})
    tuned_f = write(tmp_path / "tuned.safetensors", {"model.w": tuned})
    like = {"model.w": torch.zeros(4, 4, dtype=torch.bool)}
    like["model.w"][3, 3] = True                      # one coordinate, not the largest update
    top = M.top_update_like(base_f, tuned_f, like, progress=False)["model.w"]
    assert top[0, 0] and int(top.sum()) == 1
    with pytest.raises(UserError, match="model.other"):
        M.top_update_like(base_f, tuned_f, {"model.other": torch.ones(2, dtype=torch.bool)}, progress=False)
