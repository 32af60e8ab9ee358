"""Read row blocks of one tensor from a safetensors file, without memory-mapping it.

Why not `safe_open(...).get_slice`: it memory-maps the whole file, and every page that is
touched stays in the process's resident set until the file is closed — streaming a pair of
1 GB checkpoints would end with 2 GB "resident" although no tensor is held. Here each row
block is read with `os.pread` into a private buffer that is freed when dropped, so peak
memory is what the analysis holds (the kernel's page cache still speeds up re-reads).

Format (safetensors): 8-byte little-endian header length N, N bytes of JSON
{key: {dtype, shape, data_offsets: [begin, end]}}, then the data, row-major.

Example::

    rows = read_rows(Path("model.safetensors"), "model.embed_tokens.weight", 0, 4096)
"""

from __future__ import annotations

import json
import os
import struct
import threading
from functools import lru_cache
from pathlib import Path

import torch

from opdlab.errors import UserError

_DTYPES = {
    "BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
FLOAT_DTYPES = {"BF16", "F16", "F32", "F64"}
_lock = threading.Lock()


@lru_cache(maxsize=256)
def _header(path: Path, mtime_ns: int) -> tuple[int, dict]:
    """(absolute offset of the data section, parsed header) of a safetensors file."""
    try:
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({type(exc).__name__}); it may be truncated") from None
    return 8 + n, header


def tensor_info(path: Path, key: str) -> tuple[str, tuple[int, ...], int]:
    """(safetensors dtype string, shape, absolute byte offset) of `key` in `path`."""
    with _lock:
        base, header = _header(Path(path), Path(path).stat().st_mtime_ns)
    entry = header[key]
    return entry["dtype"], tuple(entry["shape"]), base + int(entry["data_offsets"][0])


def read_rows(path: Path, key: str, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of tensor `key` (a 0-D or 1-D tensor is read whole), in its storage dtype."""
    dtype_name, shape, offset = tensor_info(path, key)
    if dtype_name not in _DTYPES:
        raise UserError(f"{path}: tensor '{key}' has dtype {dtype_name}, which opdlab cannot read")
    dtype = _DTYPES[dtype_name]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if len(shape) <= 1:
        start, stop, row_shape = 0, 1, tuple(shape)
        row_elems = shape[0] if shape else 1
    else:
        row_shape = tuple(shape[1:])
        row_elems = 1
        for d in row_shape:
            row_elems *= d
    nbytes = (stop - start) * row_elems * itemsize
    fd = os.open(path, os.O_RDONLY)
    try:
        # A torch buffer, not a bytearray: large blocks then come from torch's allocator (which
        # backs them with huge pages when THP_MEM_ALLOC_ENABLE is set, see opdlab/__main__.py).
        buf = torch.empty(nbytes, dtype=torch.uint8)
        view = memoryview(buf.numpy()).cast("B")
        done = 0
        while done < nbytes:  # pread may return short reads on some filesystems
            got = os.preadv(fd, [view[done:]], offset + start * row_elems * itemsize + done)
            if got <= 0:
                raise UserError(f"{path}: tensor '{key}' is cut short (file truncated?); re-save the checkpoint")
            done += got
    finally:
        os.close(fd)
    t = buf.view(dtype) if nbytes else torch.empty(0, dtype=dtype)
    return t.reshape(row_shape if len(shape) <= 1 else (stop - start, *row_shape))


def row_ranges(num_rows: int, row_elems: int, max_elems: int) -> list[tuple[int, int]]:
    """Split `num_rows` rows into contiguous ranges of at most `max_elems` elements (≥ 1 row each)."""
    per = max(1, max_elems // max(1, row_elems))
    return [(i, min(num_rows, i + per)) for i in range(0, max(num_rows, 1), per)]
