"""State-dict helpers shared by checkpoint writers."""

from __future__ import annotations

from typing import Any


def unique_tensors(state: dict[str, Any]) -> dict[str, Any]:
    """`state` without exact aliases of an earlier tensor (same storage, offset, shape and strides).

    Tied weights (a language-model head that *is* the embedding) are kept once, under the first
    name in the state dict (`model.embed_tokens.weight`), as `save_pretrained` writes them and
    `from_pretrained` re-ties them. Views at other offsets of one storage are distinct tensors
    and are all kept.
    """
    seen: set[tuple[Any, ...]] = set()
    out = {}
    for name, tensor in state.items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape), tensor.stride())
        if key in seen:
            continue
        seen.add(key)
        out[name] = tensor
    return out
