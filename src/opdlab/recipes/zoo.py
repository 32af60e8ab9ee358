"""`opdlab zoo list | build NAME [--rebuild]`: the built-in tiny teacher/student pairs.

    opdlab zoo list                      # name, task, size, whether it is cached
    opdlab zoo build sort-tiny          # copy the shipped pair into the cache; prints its folder
    opdlab zoo build sort-tiny --rebuild   # retrain it from its seed (a few minutes on 2 cores)
"""

from __future__ import annotations

from pathlib import Path

from opdlab.config import ZooConfig
from opdlab.errors import UserError
from opdlab.models import zoo as zoo_models


def pair_table() -> str:
    """One row per built-in pair: name, distillation task, parameters per model, cache state."""
    rows = [("name", "task", "params", "status", "description")]
    for spec in zoo_models.list_pairs():
        folder = zoo_models.pair_dir(spec.name)
        if zoo_models.is_cached(spec.name):
            status = "cached"
            params = str(zoo_models.read_metadata(folder).get("num_params", "?"))
        else:
            status = "shipped" if zoo_models.shipped_dir(spec.name) else "not built"
            params = f"~{zoo_models.approx_params(spec) / 1e6:.2f}M"
        rows.append((spec.name, spec.task, params, status, spec.description))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def zoo(cfg: ZooConfig) -> str | Path:
    """List the pairs (returns the table) or build one (returns its cache folder)."""
    if cfg.action == "list":
        return pair_table()
    if not cfg.name:
        raise UserError(f"name a pair to build, e.g. `opdlab zoo build sort-tiny` (known: {', '.join(p.name for p in zoo_models.list_pairs())})")
    paths = zoo_models.build_pair(cfg.name, rebuild=cfg.rebuild)
    return paths.student.parent
