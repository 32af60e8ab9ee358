"""Figures from training logs and experiment outputs: one function per figure, table -> Figure.

Figures are built on `matplotlib.figure.Figure` directly (Agg canvas, no pyplot state),
so they are safe in tests, threads and headless machines. The inputs are the parsed
files of docs/formats.md; the caller decides which figures have data.

    fig = training_curves({"opd": run.metrics}, "eval/accuracy", "eval accuracy")
    png = figure_png(fig)
"""

from __future__ import annotations

import io
import math
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

OPTIMIZER_LABELS = {"adamw": "AdamW", "sgd": "SGD", "sgd_momentum": "SGD + momentum"}
ARM_LABELS = {"full": "full OPD", "subnetwork": "OPD mask", "random": "random mask", "lora": "LoRA"}


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(float(x))


def _new(width: float = 5.6, height: float = 3.5, ncols: int = 1) -> tuple[Figure, list[Any]]:
    fig = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    for ax in axes:
        ax.grid(True, alpha=0.3)
    return fig, axes


def figure_png(fig: Figure) -> bytes:
    """The figure as PNG bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def series(metrics: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of the metric rows that have a finite `key` and `step`."""
    pts = [(float(m["step"]), float(m[key])) for m in metrics if _finite(m.get("step")) and _finite(m.get(key))]
    pts.sort()
    return [p[0] for p in pts], [p[1] for p in pts]


def training_curves(runs: dict[str, list[dict[str, Any]]], key: str, ylabel: str) -> Figure:
    """One metric (e.g. "eval/accuracy") against step, one line per run, on one axes."""
    fig, (ax,) = _new()
    for name, metrics in runs.items():
        x, y = series(metrics, key)
        if x:
            ax.plot(x, y, marker="o" if len(x) <= 20 else None, markersize=3, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} during training")
    if key.endswith("loss") or key.endswith("reverse_kl"):
        values = [v for m in runs.values() for v in series(m, key)[1]]
        if values and min(values) > 0 and max(values) / min(values) > 30:
            ax.set_yscale("log")
    ax.legend(fontsize="small")
    return fig


def optimizer_sweep(sweep: list[dict[str, Any]], metric: str = "accuracy") -> Figure:
    """`metric` against learning rate (log scale), one line per optimizer; the best point of each is ringed."""
    fig, (ax,) = _new()
    for opt in sorted({str(r.get("optimizer")) for r in sweep}):
        pts = sorted((float(r["lr"]), float(r[metric])) for r in sweep
                     if r.get("optimizer") == opt and _finite(r.get("lr")) and _finite(r.get(metric)))
        if not pts:
            continue
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=OPTIMIZER_LABELS.get(opt, opt))
        best = max(pts, key=lambda p: p[1] if metric == "accuracy" else -p[1])
        ax.plot([best[0]], [best[1]], marker="o", markersize=12, fillstyle="none", color=line.get_color())
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel(metric.replace("_", " "))
    ax.set_title(f"Optimizer sweep: {metric.replace('_', ' ')} vs learning rate")
    ax.legend(fontsize="small")
    return fig


def subnetwork_bars(source: dict[str, Any], arms: dict[str, dict[str, Any]]) -> Figure:
    """Accuracy and eval reverse KL of each arm (full OPD, OPD mask, random mask, LoRA); the source dashed.

    `arms` is subnetwork.json's "runs" ({arm: row}); `source` its "source".
    """
    names = list(arms)
    metrics = [k for k in ("accuracy", "reverse_kl") if any(_finite(r.get(k)) for r in arms.values())]
    fig, axes = _new(width=3.4 * max(1, len(metrics)) + 0.6, ncols=max(1, len(metrics)))
    for ax, key in zip(axes, metrics):
        vals = [float(arms[n][key]) if _finite(arms[n].get(key)) else 0.0 for n in names]
        bars = ax.bar(range(len(names)), vals, color=["C0", "C2", "C3", "C4", "C5", "C6"][: len(names)])
        for b, n in zip(bars, names):
            frac = arms[n].get("trainable_fraction")
            if _finite(frac):
                ax.annotate(f"{100 * float(frac):.0f}% trained", (b.get_x() + b.get_width() / 2, b.get_height()),
                            ha="center", va="bottom", fontsize="x-small")
        if _finite(source.get(key)):
            ax.axhline(float(source[key]), color="k", linestyle="--", linewidth=1, label="source")
            ax.legend(fontsize="small")
        ax.set_xticks(range(len(names)), [ARM_LABELS.get(n, n) for n in names], rotation=20, fontsize="small")
        ax.set_ylabel("eval " + key.replace("_", " "))
    fig.suptitle("Subnetwork retraining")
    return fig


def lr_sweep_sparsity(points: list[dict[str, Any]]) -> Figure:
    """Left: bf16 and fp32 sparsity and the below-half-ULP fraction vs lr. Right: ‖Δ‖/‖W‖ vs lr."""
    fig, (ax, ax2) = _new(width=9.0, ncols=2)
    pts = sorted((p for p in points if _finite(p.get("lr"))), key=lambda p: float(p["lr"]))
    for key, label in (("sparsity_bf16", "sparsity, bf16 checkpoints"), ("sparsity_fp32", "sparsity, fp32 checkpoints"),
                       ("below_half_ulp_fraction", "update < ½ bf16 ULP")):
        xy = [(float(p["lr"]), float(p[key])) for p in pts if _finite(p.get(key))]
        if xy:
            ax.plot([a for a, _ in xy], [b for _, b in xy], marker="o", label=label)
    ax.set_xscale("log")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("learning rate")
    ax.set_ylabel("fraction of coordinates")
    ax.set_title("How much of 'sparse' is storage precision")
    ax.legend(fontsize="small")
    xy = [(float(p["lr"]), float(p["relative_update_norm"])) for p in pts
          if _finite(p.get("relative_update_norm")) and float(p["relative_update_norm"]) > 0]
    if xy:
        ax2.plot([a for a, _ in xy], [b for _, b in xy], marker="o", color="C3")
        ax2.set_yscale("log")
    ax2.set_xscale("log")
    ax2.set_xlabel("learning rate")
    ax2.set_ylabel("‖Δ‖ / ‖W‖")
    ax2.set_title("Update size")
    return fig


def second_moment_cv(by_method: dict[str, Any]) -> Figure:
    """Median over tensors of the coefficient of variation of √v (Adam's second moment), per method."""
    fig, (ax,) = _new(width=4.8)
    items = [(m, float(v)) for m, v in by_method.items() if _finite(v)]
    ax.bar([m.upper() for m, _ in items], [v for _, v in items], color=["C0", "C1", "C2", "C3"][: len(items)])
    ax.set_ylabel("median CV of √v within a tensor")
    ax.set_title("Adam second-moment spread by method")
    return fig


def overlap_bars(compares: dict[str, dict[str, Any]]) -> Figure:
    """Jaccard of two runs' changed masks next to its independent-mask baseline, one pair per group of bars."""
    fig, (ax,) = _new(width=max(4.8, 1.6 * len(compares) + 2))
    names = list(compares)
    xs = range(len(names))
    obs = [float(compares[n].get("jaccard")) if _finite(compares[n].get("jaccard")) else 0.0 for n in names]
    rnd = [float(compares[n].get("jaccard_random")) if _finite(compares[n].get("jaccard_random")) else 0.0
           for n in names]
    ax.bar([x - 0.2 for x in xs], obs, width=0.4, label="observed")
    ax.bar([x + 0.2 for x in xs], rnd, width=0.4, label="independent masks", color="0.6")
    ax.set_xticks(list(xs), names, rotation=15, fontsize="small")
    ax.set_ylabel("Jaccard of changed masks")
    ax.set_title("Overlap of runs' updates vs chance")
    ax.legend(fontsize="small")
    return fig
