"""Masked (sparse-state) AdamW / SGD against torch's dense optimizers, exactness outside the mask,
state_dict round trips and state memory."""

from __future__ import annotations

import io

import pytest
import torch

from opdlab.config import OptimConfig
from opdlab.errors import UserError
from opdlab.subnet.masks import zero_grads_outside
from opdlab.subnet.optimizers import MaskedAdamW, MaskedSGD, build_optimizer, clip_gradients, optimizer_state_bytes


class TinyNet(torch.nn.Module):
    """Embedding -> Linear -> LayerNorm -> Linear: matrices, vectors and an embedding with unused rows."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(32, 16)
        self.up = torch.nn.Linear(16, 48)
        self.norm = torch.nn.LayerNorm(48)
        self.down = torch.nn.Linear(48, 8)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.down(self.norm(torch.relu(self.up(self.embed(ids))))).sum(1)


def make_net(seed: int = 0) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet()


def batches(n: int, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 32, (8, 5), generator=g), torch.randn(8, 8, generator=g)) for _ in range(n)]


def random_masks(net: torch.nn.Module, p: float, seed: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: torch.rand(q.shape, generator=g) < p for n, q in net.named_parameters()}


def train(net, opt, masks, data, sched=None, clip: float = 1.0) -> None:
    named = list(net.named_parameters())
    for ids, y in data:
        opt.zero_grad(set_to_none=True)
        torch.nn.functional.mse_loss(net(ids), y).backward()
        if masks is not None:
            zero_grads_outside(named, masks)
        if clip:
            torch.nn.utils.clip_grad_norm_(net.parameters(), clip)
        opt.step()
        if sched is not None:
            sched.step()


def snapshot(net) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in net.named_parameters()}


def test_build_optimizer_without_mask_is_torch():
    net = make_net()
    cfg = OptimConfig(optimizer="adamw", lr=0.01, beta1=0.8, beta2=0.95, eps=1e-6, weight_decay=0.1)
    opt = build_optimizer(list(net.named_parameters()), cfg)
    assert type(opt) is torch.optim.AdamW
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (0.01, (0.8, 0.95), 1e-6, 0.1)
    sgd = build_optimizer(list(net.named_parameters()), OptimConfig(optimizer="sgd", lr=0.1, momentum=0.5))
    assert type(sgd) is torch.optim.SGD and sgd.param_groups[0]["momentum"] == 0.5
    masked = build_optimizer(list(net.named_parameters()), cfg, random_masks(net, 0.3))
    assert isinstance(masked, MaskedAdamW) and isinstance(masked, torch.optim.Optimizer)


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_masked_adamw_matches_torch_adamw_on_mask(weight_decay):
    """Same gradients into both; masked coordinates agree, the rest keep their bits."""
    torch.manual_seed(0)
    shapes = [(40, 30), (30,), (7, 3, 5)]
    ps = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    qs = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    masks = [torch.rand(s) < 0.25 for s in shapes]
    before = [p.detach().clone() for p in ps]
    ours = MaskedAdamW(ps, masks, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    ref = torch.optim.AdamW(qs, lr=3e-2, betas=(0.8, 0.99), eps=1e-6, weight_decay=weight_decay)
    for step in range(6):
        for p, q in zip(ps, qs):
            g = torch.randn(p.shape)
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q, m, b in zip(ps, qs, masks, before):
        torch.testing.assert_close(p.detach()[m], q.detach()[m], rtol=1e-6, atol=1e-7)
        assert not torch.equal(p.detach()[m], b[m])
        assert torch.equal(p.detach()[~m], b[~m])


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 0.05), (0.0, 0.05)])
def test_masked_sgd_matches_torch_sgd_on_mask(momentum, weight_decay):
    torch.manual_seed(1)
    p = torch.nn.Parameter(torch.randn(50, 20))
    q = torch.nn.Parameter(p.detach().clone())
    m = torch.rand(50, 20) < 0.1
    before = p.detach().clone()
    ours = MaskedSGD([p], [m], lr=0.05, momentum=momentum, weight_decay=weight_decay)
    ref = torch.optim.SGD([q], lr=0.05, momentum=momentum, weight_decay=weight_decay)
    for _ in range(5):
        g = torch.randn(50, 20)
        p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
        assert torch.equal(p.grad, g)  # the optimizer never writes into the gradient
    torch.testing.assert_close(p.detach()[m], q.detach()[m], rtol=1e-6, atol=1e-7)
    assert torch.equal(p.detach()[~m], before[~m])
    st = ours.state[p]
    assert ("momentum_buffer" in st) == (momentum != 0)
    if momentum:
        assert st["momentum_buffer"].shape == (int(m.sum()),)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_training_keeps_outside_bit_identical(optimizer):
    """Full loop with clipping, weight decay and a LambdaLR schedule on a small model."""
    net = make_net()
    masks = random_masks(net, 0.2)
    masks["norm.bias"] = torch.zeros_like(masks["norm.bias"])  # a fully frozen tensor
    before = snapshot(net)
    cfg = OptimConfig(optimizer=optimizer, lr=0.05, weight_decay=0.1, momentum=0.9)
    opt = build_optimizer(list(net.named_parameters()), cfg, masks)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    train(net, opt, masks, batches(6), sched)
    assert opt.param_groups[0]["lr"] == pytest.approx(0.05 / 7)
    moved = 0
    for name, p in net.named_parameters():
        m = masks[name]
        assert torch.equal(p.detach()[~m], before[name][~m]), name
        moved += int((p.detach()[m] != before[name][m]).sum())
    assert moved > 0.8 * sum(int(m.sum()) for m in masks.values())
    assert net.norm.bias not in opt.state or not opt.state[net.norm.bias]


def test_all_true_mask_equals_torch_adamw_exactly():
    a, b = make_net(), make_net()
    masks = {n: torch.ones_like(p, dtype=torch.bool) for n, p in a.named_parameters()}
    cfg = OptimConfig(lr=0.01, weight_decay=0.1)
    opt_a = build_optimizer(list(a.named_parameters()), cfg, masks)
    opt_b = build_optimizer(list(b.named_parameters()), cfg)
    data = batches(4)
    train(a, opt_a, masks, data)
    train(b, opt_b, None, data)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
    assert opt_a.index_bytes() == 0


def test_nan_gradient_outside_mask_does_not_leak():
    net = make_net()
    masks = random_masks(net, 0.5)
    before = snapshot(net)
    opt = build_optimizer(list(net.named_parameters()), OptimConfig(lr=0.01), masks)
    torch.nn.functional.mse_loss(net(batches(1)[0][0]), torch.zeros(8, 8)).backward()
    net.up.weight.grad[~masks["up.weight"]] = float("nan")
    zero_grads_outside(list(net.named_parameters()), masks)
    total = torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    assert torch.isfinite(total)
    opt.step()
    for name, p in net.named_parameters():
        assert torch.isfinite(p).all()
        assert torch.equal(p.detach()[~masks[name]], before[name][~masks[name]])


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_state_dict_round_trip_resumes_bit_identically(optimizer):
    cfg = OptimConfig(optimizer=optimizer, lr=0.02, weight_decay=0.05, momentum=0.9)
    data = batches(8)
    net = make_net()
    masks = random_masks(net, 0.3)
    opt = build_optimizer(list(net.named_parameters()), cfg, masks)
    train(net, opt, masks, data)  # uninterrupted reference

    first = make_net()
    opt1 = build_optimizer(list(first.named_parameters()), cfg, masks)
    train(first, opt1, masks, data[:3])
    buf = io.BytesIO()
    torch.save({"model": first.state_dict(), "optim": opt1.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    second = make_net(seed=99)  # different init: everything must come from the checkpoint
    second.load_state_dict(saved["model"])
    opt2 = build_optimizer(list(second.named_parameters()), cfg, masks)
    opt2.load_state_dict(saved["optim"])
    train(second, opt2, masks, data[3:])
    for (n, p), q in zip(net.named_parameters(), second.parameters()):
        assert torch.equal(p, q), n


def test_resume_with_another_mask_is_an_error():
    net = make_net()
    masks = random_masks(net, 0.3)
    opt = build_optimizer(list(net.named_parameters()), OptimConfig(), masks)
    train(net, opt, masks, batches(1))
    other = build_optimizer(list(net.named_parameters()), OptimConfig(), random_masks(net, 0.3, seed=4))
    with pytest.raises(UserError, match="different mask"):
        other.load_state_dict(opt.state_dict())


@pytest.mark.parametrize("p", [0.01, 0.05, 0.2])
def test_state_memory_scales_with_density(p):
    torch.manual_seed(0)
    big = [torch.nn.Parameter(torch.randn(256, 512)), torch.nn.Parameter(torch.randn(512))]
    masks = [torch.rand(x.shape) < p for x in big]
    ours = MaskedAdamW(big, masks)
    dense = torch.optim.AdamW([torch.nn.Parameter(x.detach().clone()) for x in big])
    for x, y in zip(big, dense.param_groups[0]["params"]):
        g = torch.randn(x.shape)
        x.grad, y.grad = g, g.clone()
    ours.step()
    dense.step()
    nnz = sum(int(m.sum()) for m in masks)
    numel = sum(x.numel() for x in big)
    measured = optimizer_state_bytes(ours)
    # compact exp_avg + exp_avg_sq (fp32) + int32 indices = 12 bytes per masked coordinate
    assert measured == 12 * nnz
    assert measured <= 1.5 * (nnz / numel) * optimizer_state_bytes(dense)


def test_bad_masks_rejected_by_optimizer():
    p = torch.nn.Parameter(torch.randn(4, 4))
    with pytest.raises(ValueError, match="bool of shape"):
        MaskedAdamW([p], [torch.ones(4, 4)])
    with pytest.raises(ValueError, match="bool of shape"):
        MaskedSGD([p], [torch.ones(4, 3, dtype=torch.bool)])


def test_benchmark_smoke(tmp_path):
    """bench/bench_optimizer.py at its smallest size writes a complete result file."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "bench" / "bench_optimizer.py"
    spec = importlib.util.spec_from_file_location("bench_optimizer", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "optimizer.json"
    bench.main(["--size", "tiny", "--trials", "1", "--steps", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    names = [r["name"] for r in report["results"]]
    assert names[:2] == ["torch AdamW (foreach=False)", "torch AdamW (foreach=True)"] and len(names) == 6
    for r in report["results"]:
        assert r["step_ms_median"] > 0 and r["state_bytes"] > 0
        if r["density"] < 1:
            assert r["state_vs_density_x_dense"] <= 1.5
    assert report["versions"]["torch"] == torch.__version__


# ----------------------------------------------------------------------------- compact gradients


def mixed_masks(net: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Partial masks, one all-false tensor (up.weight, a matrix with its own weight-gradient matmul) and one all-true."""
    masks = random_masks(net, 0.2)
    masks["up.weight"] = torch.zeros_like(masks["up.weight"])
    masks["down.bias"] = torch.ones_like(masks["down.bias"])
    return masks


def accumulate_and_step(net, opt, masks, data, compact: bool, clip: float, micro: int = 3):
    """One optimizer step per `micro` batches (gradient accumulation), clipped; dense or compact path."""
    named = list(net.named_parameters())
    norms = []
    for start in range(0, len(data), micro):
        for ids, y in data[start:start + micro]:
            (torch.nn.functional.mse_loss(net(ids), y) / micro).backward()
        if compact:
            norms.append(float(clip_gradients(named, opt, clip)))
        else:
            zero_grads_outside(named, masks)
            norms.append(float(torch.nn.utils.clip_grad_norm_(net.parameters(), clip or float("inf"))))
        opt.step()
        opt.zero_grad(set_to_none=True)
    return norms


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
@pytest.mark.parametrize("clip", [0.0, 0.05])
def test_compact_gradients_train_like_the_dense_path(optimizer, clip):
    """Same data, masks and settings: the compact path gives the dense path's weights.

    Bit for bit without clipping (the accumulated gradients are the same fp32 sums); within fp32
    rounding with clipping active (the norm is summed in another order). Outside the mask every
    coordinate keeps its bits on both paths.
    """
    dense_net, compact_net = make_net(), make_net()
    masks = mixed_masks(dense_net)
    before = snapshot(dense_net)
    cfg = OptimConfig(optimizer=optimizer, lr=0.05, weight_decay=0.1, momentum=0.9)
    dense_opt = build_optimizer(list(dense_net.named_parameters()), cfg, masks)
    compact_opt = build_optimizer(list(compact_net.named_parameters()), cfg, masks)
    assert compact_opt.reduce_gradients_in_backward()
    data = batches(12)
    dense_norms = accumulate_and_step(dense_net, dense_opt, masks, data, compact=False, clip=clip)
    compact_norms = accumulate_and_step(compact_net, compact_opt, masks, data, compact=True, clip=clip)
    assert compact_norms == pytest.approx(dense_norms, rel=1e-6)
    if clip:
        assert max(dense_norms) > clip  # clipping was active
    for (name, p), q in zip(compact_net.named_parameters(), dense_net.parameters()):
        m = masks[name]
        assert torch.equal(p.detach()[~m], before[name][~m]), name
        if clip:
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=name)
        else:
            assert torch.equal(p.detach(), q.detach()), name
        if m.any():
            assert not torch.equal(p.detach()[m], before[name][m]), name


def backward_output_shapes(fn) -> list[tuple[int, ...]]:
    """Shapes of every new tensor (not a view) an aten op produced while `fn` ran."""
    from torch.utils._python_dispatch import TorchDispatchMode

    shapes: list[tuple[int, ...]] = []

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
            out = func(*args, **(kwargs or {}))
            if func.is_view:  # e.g. the transposed weight autograd reads: no new memory, no compute
                return out
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    shapes.append(tuple(t.shape))
            return out

    with Record():
        fn()
    return shapes


def test_empty_mask_parameter_never_gets_a_dense_gradient():
    """A tensor with an empty mask has no gradient computed at all; partial ones keep only (nnz,) buffers."""
    ids, y = batches(1)[0]
    shapes = {}
    for compact in (False, True):
        net = make_net()
        masks = mixed_masks(net)
        opt = build_optimizer(list(net.named_parameters()), OptimConfig(lr=0.01), masks)
        if compact:
            opt.reduce_gradients_in_backward()
        loss = torch.nn.functional.mse_loss(net(ids), y)
        shapes[compact] = backward_output_shapes(loss.backward)
        if compact:
            assert net.up.weight.requires_grad is False and net.up.weight.grad is None
            partial = [n for n, m in masks.items() if m.any() and not m.all()]
            for name, p in net.named_parameters():
                assert p.grad is None or masks[name].all(), name  # no dense gradient kept for masked tensors
            assert net.down.bias.grad is not None  # all-true: the dense gradient is the compact one
            assert sorted(g.numel() for g in opt.compact_gradients()) == sorted(int(masks[n].sum()) for n in partial)
    weight_grad = tuple(make_net().up.weight.shape)  # (48, 16): only the up.weight gradient has this shape
    assert weight_grad in shapes[False]  # the control: dense training computes it
    assert weight_grad not in shapes[True]  # masked: no weight-gradient matmul for the frozen matrix


def test_compact_gradients_are_freed_by_zero_grad_and_can_be_undone():
    net = make_net()
    masks = mixed_masks(net)
    opt = build_optimizer(list(net.named_parameters()), OptimConfig(lr=0.01), masks)
    opt.reduce_gradients_in_backward()
    torch.nn.functional.mse_loss(net(batches(1)[0][0]), torch.zeros(8, 8)).backward()
    assert opt.compact_gradients()
    opt.zero_grad(set_to_none=True)
    assert opt.compact_gradients() == []
    opt.restore_dense_gradients()
    assert net.up.weight.requires_grad and not opt.reduces_gradients
    torch.nn.functional.mse_loss(net(batches(1)[0][0]), torch.zeros(8, 8)).backward()
    assert all(p.grad is not None for p in net.parameters())


def test_an_empty_mask_everywhere_is_an_error():
    net = make_net()
    masks = {n: torch.zeros_like(p, dtype=torch.bool) for n, p in net.named_parameters()}
    opt = build_optimizer(list(net.named_parameters()), OptimConfig(lr=0.01), masks)
    with pytest.raises(UserError, match="selects no coordinate"):
        opt.reduce_gradients_in_backward()
