"""Sparse-delta math: encodings rebuild the exact bits, and the smallest encoding is chosen."""

from __future__ import annotations

import pytest
import torch

from opdlab.errors import UserError
from opdlab.subnet import delta as D


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(D.bits(a), D.bits(b))


@pytest.mark.parametrize("n", [1, 7, 8, 9, 64, 1001])
def test_pack_bits_round_trips_and_sets_the_documented_bit(n):
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    packed = D.pack_bits(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == (n + 7) // 8
    assert torch.equal(D.unpack_bits(packed, n), mask)
    # bit j of byte i is coordinate 8*i + j (hand check on the first byte)
    first = sum(1 << j for j in range(min(8, n)) if mask[j])
    assert int(packed[0]) == first


def test_choose_encoding_picks_the_smallest():
    # bf16 (2 bytes): index costs 6 bytes a coordinate, bitmap numel/8 + 2 a coordinate, dense 2 a coordinate
    assert D.choose_encoding(1000, 0, 2) == "none"
    assert D.choose_encoding(1000, 10, 2) == "index"      # 60 vs 145 vs 2000
    assert D.choose_encoding(1000, 100, 2) == "bitmap"    # 600 vs 325 vs 2000
    assert D.choose_encoding(1000, 950, 2) == "dense"     # 5700 vs 2025 vs 2000
    sizes = D.encoding_bytes(1000, 100, 4)
    assert sizes == {"none": -1, "index": 800, "bitmap": 125 + 400, "dense": 4000}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16, torch.int64, torch.bool])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.2, 0.9, 1.0])
def test_encode_decode_rebuilds_every_bit(dtype, density):
    g = torch.Generator().manual_seed(0)
    base = (torch.randn(37, 29, generator=g) * 10).to(dtype)
    change = torch.rand(base.shape, generator=g) < density
    tuned = base.clone()
    if dtype == torch.bool:
        tuned[change] = ~tuned[change]
    else:
        tuned[change] = (tuned[change].float() * 1.5 + 1).to(dtype)
    encoding, stored, changed = D.encode(base, tuned)
    assert changed == int((D.bits(base) != D.bits(tuned)).sum())
    assert encoding == D.choose_encoding(base.numel(), changed, base.element_size())
    for part in stored.values():
        if part.dtype.is_floating_point:
            assert part.dtype == dtype  # values kept in the checkpoint's dtype
    assert _bits_equal(D.decode(base, encoding, stored), tuned)


def test_signed_zero_and_nan_payloads_count_as_changes_and_come_back():
    base = torch.tensor([0.0, 1.0, float("nan"), 2.0], dtype=torch.float32)
    tuned = base.clone()
    tuned_bits = D.bits(tuned)
    tuned[0] = -0.0                       # equal as values, different bits
    tuned_bits[2] = 0x7FC00001            # a NaN with another payload
    encoding, stored, changed = D.encode(base, tuned)
    assert changed == 2
    out = D.decode(base, encoding, stored)
    assert _bits_equal(out, tuned)
    assert int(D.bits(out)[2]) == 0x7FC00001


def test_like_tuned_casts_floats_only():
    b = torch.randn(5)
    assert D.like_tuned(b, torch.float32, "w") is b
    assert torch.equal(D.like_tuned(b, torch.bfloat16, "w"), b.to(torch.bfloat16))
    with pytest.raises(UserError, match="'w' is int64 in BASE but float32 in TUNED"):
        D.like_tuned(torch.zeros(3, dtype=torch.int64), torch.float32, "w")


def test_decode_rejects_damaged_parts():
    base = torch.zeros(10)
    with pytest.raises(ValueError, match="outside"):
        D.decode(base, "index", {"index": torch.tensor([12], dtype=torch.int32), "value": torch.ones(1)})
    with pytest.raises(ValueError, match="bitmap marks"):
        D.decode(base, "bitmap", {"bitmap": D.pack_bits(torch.ones(10, dtype=torch.bool)), "value": torch.ones(3)})
    with pytest.raises(ValueError, match="stored values are"):
        D.decode(base, "dense", {"value": torch.ones(10, dtype=torch.float64)})


def test_sha256_is_of_the_stored_bytes():
    import hashlib

    t = torch.tensor([1.0, -2.0], dtype=torch.bfloat16)
    assert D.tensor_sha256(t) == hashlib.sha256(bytes([0x80, 0x3F, 0x00, 0xC0])).hexdigest()
