"""Optimizers for (optionally masked) training, with optimizer state only where the mask is true.

`build_optimizer` returns plain `torch.optim.AdamW` / `torch.optim.SGD` without a mask; with a
mask it returns `MaskedAdamW` / `MaskedSGD`, which keep, per parameter, the flat indices of the
masked coordinates (int32 when the tensor has fewer than 2**31 elements) and compact state
vectors of length nnz. Each step gathers the gradient at those indices, does torch's own update
math on the compact vectors and writes only the masked coordinates back (`index_add_` of the
update, or — when weight decay needs the parameter values — gather, decay, update, `scatter_`).
Every coordinate outside the mask therefore keeps its exact bits (gradient, step and weight decay
included), and state memory scales with the mask's density: 12 bytes per masked fp32 coordinate
(two moments + an int32 index) against 8 per coordinate for dense AdamW.

    opt = build_optimizer(list(model.named_parameters()), cfg.optim, masks)
    opt.reduce_gradients_in_backward()            # optional: compact gradients (below)
    loss.backward(); clip_gradients(named, opt, max_norm); opt.step(); opt.zero_grad()

Compact gradients (`reduce_gradients_in_backward`) make masked training cheaper, not only sparse
in state: a parameter whose mask is empty gets `requires_grad=False`, so autograd computes no
gradient for it at all (no weight-gradient matmul, no buffer); a partially masked parameter gets a
post-accumulate-grad hook that adds its fresh gradient's masked coordinates into a compact (nnz,)
buffer and frees the dense `.grad` at once, so a dense gradient lives only while backward is
producing it. Clipping (`clip_gradients`) and the step then read the compact buffers. Gathering
each micro-batch's gradient and summing the gathered vectors performs the same fp32 additions as
summing dense gradients and gathering once, so the accumulated gradient is bit-identical; only the
clipping norm sums in another order (fp32 rounding). Not under FSDP2: sharded (DTensor)
parameters keep dense gradients, masked after backward (`masks.zero_grads_outside`).

Deviations from torch, and why:
1. `step` is a Python int in the state (torch keeps a float tensor): it costs no tensor memory,
   and the bias corrections use the same float arithmetic (`beta ** step` in Python doubles).
2. The mask indices are not part of `state_dict()`: they are rebuilt from the mask file the run
   was started with. The state records `nnz` and an index checksum so a resume with a different
   mask fails loudly instead of mixing up coordinates.
3. A parameter whose mask is all true is stepped in place without indices (no gather/scatter),
   and one whose mask is all false gets no state at all.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch

from opdlab.errors import UserError

if TYPE_CHECKING:
    from opdlab.config import OptimConfig

_INT32_LIMIT = 2**31


def _local(t: torch.Tensor) -> torch.Tensor:
    """The rank's shard of a DTensor (FSDP2 parameter, gradient or mask); a plain tensor as is.

    Under FSDP2 masks are sharded like their parameters, so indices, state and updates all
    refer to local coordinates, and the in-place writes go straight into the local shard.
    """
    return t.to_local() if hasattr(t, "to_local") else t


def build_optimizer(
    named_params: list[tuple[str, torch.nn.Parameter]],
    cfg: "OptimConfig",
    masks: dict[str, torch.Tensor] | None = None,
) -> torch.optim.Optimizer:
    """The optimizer `cfg.optimizer` over `named_params`; masked (sparse-state) when `masks` is given.

    `masks` maps parameter names (as in `named_params`) to bool tensors of the parameter's
    shape; a parameter without an entry is frozen entirely (see `masks.fit_mask_to_model`).
    """
    params = [p for _, p in named_params]
    if masks is None:
        if cfg.optimizer == "adamw":
            return torch.optim.AdamW(params, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                                     weight_decay=cfg.weight_decay)
        if cfg.optimizer == "sgd":
            return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
        raise UserError(f"config field 'optim.optimizer' must be adamw or sgd; got {cfg.optimizer!r}")
    mask_list = []
    for name, p in named_params:
        m = masks.get(name)
        if m is None:
            m = torch.zeros(p.shape, dtype=torch.bool, device=p.device)
        mask_list.append(m)
    if cfg.optimizer == "adamw":
        return MaskedAdamW(params, mask_list, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps,
                           weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return MaskedSGD(params, mask_list, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise UserError(f"config field 'optim.optimizer' must be adamw or sgd; got {cfg.optimizer!r}")


def mask_to_index(mask: torch.Tensor) -> torch.Tensor | None:
    """Flat indices of the true entries of `mask` (int32 when it fits), or None when all are true.

    mask: bool, any shape -> (nnz,) int32/int64 on the mask's device.
    """
    flat = mask.reshape(-1)
    if bool(flat.all()):
        return None
    idx = flat.nonzero().squeeze(1)
    return idx.to(torch.int32) if flat.numel() < _INT32_LIMIT else idx


def _checksum(index: torch.Tensor | None) -> int:
    """A cheap fingerprint of an index set: sum of indices + count (an all-true mask -> -1)."""
    if index is None:
        return -1
    return int(index.sum(dtype=torch.int64).item()) + index.numel()


class _MaskedBase(torch.optim.Optimizer):
    """Shared mask bookkeeping: per-parameter indices, gather/scatter and state checks."""

    def __init__(self, params: Iterable[torch.nn.Parameter], masks: Iterable[torch.Tensor],
                 defaults: dict[str, Any]) -> None:
        params = list(params)
        masks = list(masks)
        if len(params) != len(masks):
            raise ValueError(f"got {len(params)} parameters but {len(masks)} masks")
        super().__init__(params, defaults)
        # Keyed by the parameter object, like `self.state`; not saved in state_dict (deviation 2).
        self._index: dict[torch.nn.Parameter, torch.Tensor | None] = {}
        self._nnz: dict[torch.nn.Parameter, int] = {}
        self._sum: dict[torch.nn.Parameter, int] = {}
        for i, (p, m) in enumerate(zip(params, masks)):
            if m.dtype != torch.bool or tuple(m.shape) != tuple(p.shape):
                raise ValueError(f"mask {i} must be bool of shape {tuple(p.shape)}; got {m.dtype} {tuple(m.shape)}")
            p_local, m = _local(p), _local(m)
            if tuple(m.shape) != tuple(p_local.shape):
                raise ValueError(f"mask {i} is not sharded like its parameter: {tuple(m.shape)} vs {tuple(p_local.shape)}")
            if not p_local.is_contiguous():
                raise ValueError(f"parameter {i} is not contiguous; masked updates write through a flat view")
            idx = mask_to_index(m.to(p_local.device))
            self._index[p] = idx
            self._nnz[p] = p_local.numel() if idx is None else idx.numel()
            self._sum[p] = _checksum(idx)
        # Compact gradients (module docs): (nnz,) accumulators filled by backward hooks.
        self._compact: dict[torch.nn.Parameter, torch.Tensor] = {}
        self._hooks: list[Any] = []
        self._frozen: list[torch.nn.Parameter] = []

    def reduce_gradients_in_backward(self) -> bool:
        """From now on, keep gradients only on masked coordinates (module docs, "compact gradients").

        Freezes (`requires_grad_(False)`) every parameter with an empty mask and hooks every
        partially masked one. Returns True when enabled; False, changing nothing, when the
        parameters are FSDP2-sharded (DTensors), which keep dense gradients. Idempotent.
        """
        params = [p for group in self.param_groups for p in group["params"]]
        if any(hasattr(p, "to_local") for p in params):
            return False
        if self._hooks or self._frozen:
            return True
        if params and all(self._nnz[p] == 0 for p in params):
            raise UserError("the mask selects no coordinate of the model; nothing would be trained")
        for p in params:
            if self._nnz[p] == 0:
                if p.requires_grad:
                    p.requires_grad_(False)
                    self._frozen.append(p)
            elif self._index[p] is not None and p.requires_grad:
                self._hooks.append(p.register_post_accumulate_grad_hook(self._reduce_hook(self._index[p])))
        return True

    def restore_dense_gradients(self) -> None:
        """Undo `reduce_gradients_in_backward`: remove the hooks, unfreeze, drop compact gradients."""
        for handle in self._hooks:
            handle.remove()
        for p in self._frozen:
            p.requires_grad_(True)
        self._hooks, self._frozen = [], []
        self._compact.clear()

    def _reduce_hook(self, idx: torch.Tensor) -> Callable[[torch.Tensor], None]:
        def hook(p: torch.Tensor) -> None:
            part = p.grad.reshape(-1).index_select(0, idx)
            acc = self._compact.get(p)
            if acc is None:
                self._compact[p] = part
            else:
                acc.add_(part)  # the same fp32 addition as accumulating the dense gradients
            p.grad = None
        return hook

    @property
    def reduces_gradients(self) -> bool:
        """True while gradients are reduced to the mask in backward."""
        return bool(self._hooks or self._frozen)

    def compact_gradients(self) -> list[torch.Tensor]:
        """The compact (nnz,) gradients accumulated since the last `zero_grad` (for clipping)."""
        return list(self._compact.values())

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none=set_to_none)
        if set_to_none:
            self._compact.clear()
        else:
            for acc in self._compact.values():
                acc.zero_()

    def mask_info(self, p: torch.nn.Parameter) -> tuple[torch.Tensor | None, int, int]:
        """(flat indices into p's local shard, or None when all are masked; nnz; index checksum).

        How p's compact state vectors are laid out: for checkpoint formats that expand them.
        """
        return self._index[p], self._nnz[p], self._sum[p]

    def index_bytes(self) -> int:
        """Bytes held by the mask indices (part of this optimizer's memory, not of its state_dict)."""
        return sum(i.numel() * i.element_size() for i in self._index.values() if i is not None)

    def _active(self) -> Iterable[tuple[dict[str, Any], torch.nn.Parameter, torch.Tensor | None]]:
        """(group, param, index) for every parameter with a gradient and a non-empty mask."""
        for group in self.param_groups:
            for p in group["params"]:
                if self._nnz.get(p, 0) == 0:
                    continue
                if p in self._compact:
                    yield group, p, self._index[p]
                    continue
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("masked optimizers do not support sparse gradients")
                yield group, p, self._index[p]

    def _grad(self, p: torch.nn.Parameter, idx: torch.Tensor | None) -> torch.Tensor:
        """p's gradient on its masked coordinates, (nnz,): the compact buffer, else gathered from p.grad."""
        acc = self._compact.get(p)
        return acc if acc is not None else self._gather(p.grad, idx)

    @staticmethod
    def _gather(t: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
        """t's masked coordinates as a fresh (nnz,) vector (a flat view of a contiguous t when idx is None)."""
        t = _local(t)
        return t.reshape(-1) if idx is None else t.reshape(-1).index_select(0, idx)

    @staticmethod
    def _scatter(p: torch.Tensor, idx: torch.Tensor | None, values: torch.Tensor) -> None:
        """Overwrite p's masked coordinates with `values`; nothing else is touched.

        `scatter_` wants int64 indices; the int64 copy is transient (one tensor at a time) and
        still ~1.5x faster on CPU than `index_put_` with the stored int32 indices.
        """
        if idx is not None:
            _local(p).view(-1).scatter_(0, idx.long(), values)

    @staticmethod
    def _add(p: torch.Tensor, idx: torch.Tensor | None, update: torch.Tensor, alpha: float = 1.0) -> None:
        """p[masked] += alpha * update, touching nothing else (one pass instead of gather + scatter)."""
        p = _local(p)
        if idx is None:
            p.view(-1).add_(update, alpha=alpha)
        else:
            p.view(-1).index_add_(0, idx, update, alpha=alpha)

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        """One update of every parameter that has a gradient and a non-empty mask."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group, p, idx in self._active():
            state = self.state[p]
            if not state:
                state.update({"step": 0, "nnz": self._nnz[p], "index_checksum": self._sum[p]})
            state["step"] += 1
            self._update(group, p, idx, state)
        return loss

    def _update(self, group: dict[str, Any], p: torch.nn.Parameter, idx: torch.Tensor | None,
                state: dict[str, Any]) -> None:
        """Update p's masked coordinates in place; `state["step"]` already counts this step."""
        raise NotImplementedError

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        super().load_state_dict(state_dict)
        for group in self.param_groups:
            for i, p in enumerate(group["params"]):
                st = self.state.get(p)
                if not st:
                    continue
                if st.get("nnz") != self._nnz[p] or st.get("index_checksum") != self._sum[p]:
                    raise UserError(
                        f"optimizer state for parameter {i} (shape {list(p.shape)}) was saved with a different mask "
                        f"({st.get('nnz')} vs {self._nnz[p]} coordinates); resume with the run's original --mask"
                    )


class MaskedAdamW(_MaskedBase):
    """AdamW that updates, decays and keeps state for masked coordinates only.

    On the masked coordinates it performs exactly `torch.optim.AdamW`'s single-tensor update
    (decoupled decay `p *= 1 - lr*wd`, `lerp_` first moment, bias-corrected denominator).
    State per parameter: `exp_avg`, `exp_avg_sq` of shape (nnz,) in the parameter's dtype.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], masks: Iterable[torch.Tensor], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2) -> None:
        if lr < 0 or eps < 0 or weight_decay < 0 or not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"invalid AdamW settings lr={lr} betas={betas} eps={eps} weight_decay={weight_decay}")
        super().__init__(params, masks, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay))

    def _update(self, group: dict[str, Any], p: torch.nn.Parameter, idx: torch.Tensor | None,
                state: dict[str, Any]) -> None:
        lr, (beta1, beta2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if "exp_avg" not in state:
            state["exp_avg"] = torch.zeros(self._nnz[p], dtype=p.dtype, device=p.device)
            state["exp_avg_sq"] = torch.zeros(self._nnz[p], dtype=p.dtype, device=p.device)
        exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
        grad = self._grad(p, idx)
        step = state["step"]
        exp_avg.lerp_(grad, 1 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        bias_correction1 = 1 - beta1**step
        bias_correction2_sqrt = (1 - beta2**step) ** 0.5
        step_size = lr / bias_correction1
        denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(eps)
        if wd != 0 or idx is None:
            # torch's order: decay, then addcdiv, on the gathered values (in place when dense).
            param = self._gather(p, idx)
            if wd != 0:
                param.mul_(1 - lr * wd)
            param.addcdiv_(exp_avg, denom, value=-step_size)
            self._scatter(p, idx, param)
        else:
            # Without decay the update needs no parameter values: one index_add_ pass.
            # (-step_size * exp_avg) / denom is addcdiv's own evaluation order.
            self._add(p, idx, torch.mul(exp_avg, -step_size).div_(denom))


class MaskedSGD(_MaskedBase):
    """SGD (optionally with momentum) on masked coordinates only; L2 weight decay on those only.

    Matches `torch.optim.SGD` (dampening 0, no Nesterov) on the masked coordinates to float
    tolerance: the write-back `index_add_(.., alpha=-lr)` rounds `-lr * update` before adding,
    where torch's dense `add_` may fuse the multiply-add (differences of 1 ulp were seen).
    State: `momentum_buffer` of shape (nnz,) when momentum != 0, else only the step count.
    """

    def __init__(self, params: Iterable[torch.nn.Parameter], masks: Iterable[torch.Tensor], lr: float = 1e-3,
                 momentum: float = 0.0, weight_decay: float = 0.0) -> None:
        if lr < 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"invalid SGD settings lr={lr} momentum={momentum} weight_decay={weight_decay}")
        super().__init__(params, masks, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    def _update(self, group: dict[str, Any], p: torch.nn.Parameter, idx: torch.Tensor | None,
                state: dict[str, Any]) -> None:
        lr, momentum, wd = group["lr"], group["momentum"], group["weight_decay"]
        # Only out-of-place ops touch `grad` below, so p.grad is left as it was (as in torch).
        grad = self._grad(p, idx)
        if wd != 0:
            grad = grad.add(self._gather(p, idx), alpha=wd)
        if momentum != 0:
            buf = state.get("momentum_buffer")
            if buf is None:
                buf = state["momentum_buffer"] = grad.clone()
            else:
                buf.mul_(momentum).add_(grad)
            grad = buf
        self._add(p, idx, grad, alpha=-lr)


def clip_gradients(named_params: Iterable[tuple[str, torch.nn.Parameter]], optimizer: torch.optim.Optimizer,
                   max_norm: float) -> torch.Tensor:
    """Scale the gradients `optimizer` will step on to total L2 norm <= `max_norm` (0 = no limit).

    Returns the total norm before clipping, as `torch.nn.utils.clip_grad_norm_` does (and is that
    function for a dense optimizer or dense gradients). With compact gradients the norm covers the
    dense `.grad`s left (all-true masks) and the compact buffers: the norm of the dense gradients
    with zeros outside the mask, summed in another order.
    """
    params = [p for _, p in named_params]
    limit = max_norm or float("inf")
    if not (isinstance(optimizer, _MaskedBase) and optimizer.reduces_gradients):
        return torch.nn.utils.clip_grad_norm_(params, limit)
    grads = [p.grad for p in params if p.grad is not None] + optimizer.compact_gradients()
    total = torch.nn.utils.get_total_norm(grads, 2.0)
    coef = torch.clamp(limit / (total + 1e-6), max=1.0)  # torch's formula, applied to every gradient
    for g in grads:
        g.mul_(coef)
    return total


def optimizer_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every tensor in the optimizer's state, plus mask indices for masked optimizers."""
    total = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, torch.Tensor):
                total += v.numel() * v.element_size()
    if isinstance(opt, _MaskedBase):
        total += opt.index_bytes()
    return total
