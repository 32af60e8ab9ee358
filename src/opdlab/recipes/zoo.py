"""`opdlab zoo list | build NAME [--rebuild]`: the built-in tiny teacher/student pairs.

    opdlab zoo list                      # name, task, size, whether it is cached
    opdlab zoo build sort-tiny          # copy the shipped pair into the cache; prints its folder
    opdlab zoo build sort-tiny --rebuild   # retrain it from its seed (a few minutes on 2 cores)
    opdlab zoo build shapes-vlm-tiny       # the vision-language pair (docs/vlm.md)
    opdlab zoo build smollm2-135m-instruct # the real model: dequantize its GGUF into the cache (docs/real.md)
"""

from __future__ import annotations

from pathlib import Path

from opdlab.config import ZooConfig
from opdlab.errors import UserError
from opdlab.models import gguf, vlm_zoo
from opdlab.models import zoo as zoo_models
from opdlab.recipes.zoo_train import build_or_train_pair
from opdlab.recipes.zoo_train_vlm import build_or_train_vlm_pair


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
    for vspec in vlm_zoo.list_vlm_pairs():
        folder = vlm_zoo.vlm_pair_dir(vspec.name)
        if vlm_zoo.is_vlm_cached(vspec.name):
            status = "cached"
            params = str(vlm_zoo.read_metadata(folder).get("num_params", "?"))
        else:
            shipped = vlm_zoo.shipped_vlm_dir(vspec.name)
            status = "shipped" if shipped else "not built"
            params = str(vlm_zoo.read_metadata(shipped).get("num_params", "?")) if shipped else "?"
        rows.append((vspec.name, vspec.task, params, status, "VLM: " + vspec.description))
    for name, (dist_name, file_name) in gguf.SHIPPED.items():
        try:
            gguf.shipped_gguf(name)
            status = "installed"
        except UserError:
            status = "needs opdlab[real]"
        rows.append((name, gguf.SHIPPED_TASKS[name], "135M", status,
                     f"real: {file_name} from PyPI {dist_name}; its own teacher with --method opsd (docs/real.md)"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows)


def zoo(cfg: ZooConfig) -> str | Path:
    """List the pairs (returns the table) or build one (returns its cache folder)."""
    if cfg.action == "list":
        return pair_table()
    known = [p.name for p in zoo_models.list_pairs()] + [p.name for p in vlm_zoo.list_vlm_pairs()] + list(gguf.SHIPPED)
    if not cfg.name:
        raise UserError(f"name a pair to build, e.g. `opdlab zoo build sort-tiny` (known: {', '.join(known)})")
    if cfg.name in gguf.SHIPPED:  # dequantize into the cache (what --student NAME does on first use)
        return gguf.gguf_folder(gguf.shipped_gguf(cfg.name))
    if cfg.name in vlm_zoo.VLM_PAIRS:
        return build_or_train_vlm_pair(cfg.name, rebuild=cfg.rebuild).student.parent
    return build_or_train_pair(cfg.name, rebuild=cfg.rebuild).student.parent
