"""Figures of `opdlab analyze` and `opdlab compare`: one function per figure, tables in, PNG out.

Nothing here computes a metric: every function reads rows/dicts written by opdlab.analysis
(tensors.csv / analysis.json / compare.json rows) and saves one PNG (Agg backend, no display).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from opdlab.fileio import atomic_path  # noqa: E402

RHOS = (0.01, 0.05, 0.1, 0.2)
_MODULE_ORDER = ("q", "k", "v", "o", "gate", "up", "down", "embed", "lm_head", "norm", "vision", "projector", "other")


def _num(x: Any) -> float:
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path


def layer_sparsity(layer_rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Sparsity (atol 0 and 1e-5) per decoder layer, from the "layer" group table."""
    rows = [r for r in layer_rows if isinstance(r["group"], int)]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    xs = [r["group"] for r in rows]
    ax.plot(xs, [_num(r["sparsity"]) for r in rows], "o-", label="atol 0 (bitwise)")
    ax.plot(xs, [_num(r["sparsity_atol_1e-05"]) for r in rows], "s--", label="atol 1e-5")
    ax.set(xlabel="layer", ylabel="sparsity (share unchanged)", ylim=(0, 1.02), title="Unchanged coordinates by layer")
    ax.legend()
    return _save(fig, path)


def movement_heatmap(tensor_rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Relative update norm √(ΣΔ²/ΣW²) by layer × module type, from tensors.csv rows."""
    cells: dict[tuple[int, str], list[float]] = {}
    for r in tensor_rows:
        if r["layer"] in ("", None):
            continue
        acc = cells.setdefault((int(r["layer"]), str(r["module"])), [0.0, 0.0])
        acc[0] += _num(r["delta_sq"])
        acc[1] += _num(r["source_sq"])
    layers = sorted({k[0] for k in cells})
    modules = [m for m in _MODULE_ORDER if any(k[1] == m for k in cells)]
    grid = [[math.sqrt(cells[(l, m)][0] / cells[(l, m)][1]) if (l, m) in cells and cells[(l, m)][1] > 0 else math.nan
             for m in modules] for l in layers]
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * max(1, len(modules)), 1.5 + 0.25 * max(1, len(layers))))
    im = ax.imshow(grid or [[math.nan]], aspect="auto", cmap="viridis", origin="lower")
    ax.set_xticks(range(len(modules)), modules)
    ax.set_yticks(range(len(layers)), layers)
    ax.set(xlabel="module", ylabel="layer", title="Relative update norm ‖Δ‖/‖W‖")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def energy_share_by_module(module_rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Share of ΣΔ² per module type next to its share of parameters, from the "module" table."""
    total_params = sum(_num(r["num_params"]) for r in module_rows) or 1.0
    names = [str(r["group"]) for r in module_rows]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([x - 0.2 for x in xs], [_num(r["energy_share"]) for r in module_rows], 0.4, label="update energy share")
    ax.bar([x + 0.2 for x in xs], [_num(r["num_params"]) / total_params for r in module_rows], 0.4,
           label="parameter share", alpha=0.6)
    ax.set_xticks(list(xs), names)
    ax.set(ylabel="share", title="Where the update energy goes")
    ax.legend()
    return _save(fig, path)


def delta_spectra(spectra: Mapping[str, Sequence[float]], path: Path) -> Path:
    """Normalized singular values σ_i/σ_1 of a few Δ (name → descending values)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for name, sv in spectra.items():
        sv = [float(x) for x in sv]
        if not sv or sv[0] <= 0:
            continue
        ax.semilogy([i / len(sv) for i in range(1, len(sv) + 1)], [x / sv[0] for x in sv], label=name)
    ax.set(xlabel="index / min(m, n)", ylabel="σ_i / σ_1", title="Singular values of Δ")
    if ax.get_legend_handles_labels()[0]:  # nothing to plot when no matrix changed
        ax.legend(fontsize=7)
    return _save(fig, path)


def principal_energy_by_rho(summary: Mapping[str, Any], path: Path) -> Path:
    """Projection energy of Δ onto W's top-k singular subspaces vs the random baseline, by ρ."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for side, marker in (("both", "o"), ("left", "s"), ("right", "^")):
        line, = ax.plot(RHOS, [_num(summary.get(f"principal_energy_{side}_rho_{r:g}")) for r in RHOS],
                        marker + "-", label=f"E_{side}")
        ax.plot(RHOS, [_num(summary.get(f"principal_energy_{side}_rho_{r:g}_random")) for r in RHOS],
                marker + ":", color=line.get_color(), label=f"E_{side} random")
    ax.set(xlabel="ρ", ylabel="share of ‖Δ‖²", title="Δ in the principal subspaces of W")
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def magnitude_enrichment_by_rho(summary: Mapping[str, Any], path: Path) -> Path:
    """Low-magnitude and principal-mask enrichment by ρ (1 = chance)."""
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(RHOS, [_num(summary.get(f"low_magnitude_enrichment_rho_{r:g}")) for r in RHOS], "o-",
            label="low-magnitude mask L_ρ")
    ax.plot(RHOS, [_num(summary.get(f"principal_mask_enrichment_rho_{r:g}")) for r in RHOS], "s-",
            label="principal mask P_ρ")
    ax.axhline(1.0, color="gray", ls=":", label="chance")
    ax.set(xlabel="ρ", ylabel="enrichment", title="Do updates land on small or principal weights?")
    ax.legend()
    return _save(fig, path)


def compare_jaccard_by_module(module_rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Jaccard of two runs' changed masks per module type next to the independent-mask baseline."""
    names = [str(r["group"]) for r in module_rows]
    xs = range(len(names))
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.bar([x - 0.2 for x in xs], [_num(r["jaccard"]) for r in module_rows], 0.4, label="Jaccard")
    ax.bar([x + 0.2 for x in xs], [_num(r["jaccard_random"]) for r in module_rows], 0.4, label="independent masks",
           alpha=0.6)
    ax.set_xticks(list(xs), names)
    ax.set(ylabel="Jaccard", ylim=(0, 1.02), title="Overlap of the two runs' updates")
    ax.legend()
    return _save(fig, path)
