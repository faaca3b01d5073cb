"""QServe int4 layout: exact round trips, the documented byte positions, and shape errors."""

from __future__ import annotations

import pytest
import torch

from omniserve.formats.packing import (
    pack_w4,
    permute_group_columns,
    unpack_w4,
    unpermute_group_columns,
)


@pytest.mark.parametrize(("n", "k"), [(32, 32), (64, 128), (96, 64), (256, 384)])
def test_pack_round_trip(n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n * 1000 + k)
    q = torch.randint(0, 16, (n, k), generator=g, dtype=torch.uint8)
    packed = pack_w4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (n, k // 2)
    assert torch.equal(unpack_w4(packed), q)
    # Every byte value is reachable, so unpack∘pack round-trips too: pack(unpack(p)) == p.
    p = torch.randint(0, 256, (n, k // 2), generator=g, dtype=torch.uint8)
    assert torch.equal(pack_w4(unpack_w4(p)), p)


def test_byte_positions_match_qserve_description() -> None:
    """docs/formats.md#w4-packing: oc = a·16 + b·8 + c, ic = d·16 + e·4 + f; bytes ordered
    (tile, c, e, d, b, f);
    low nibble a = 0, high nibble a = 1; tiles row-major [N/32][K/32], 512 bytes each."""
    n, k = 64, 96
    q = torch.randint(0, 16, (n, k), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    flat = pack_w4(q).reshape(-1)
    for oc, ic in [(0, 0), (16, 0), (9, 5), (31, 31), (40, 70), (63, 95), (37, 50)]:
        nt, r = divmod(oc, 32)
        a, r = divmod(r, 16)
        b, c = divmod(r, 8)
        kt, r = divmod(ic, 32)
        d, r = divmod(r, 16)
        e, f = divmod(r, 4)
        byte = (nt * (k // 32) + kt) * 512 + (((c * 4 + e) * 2 + d) * 2 + b) * 4 + f
        nibble = (int(flat[byte]) >> (4 * a)) & 0xF
        assert nibble == int(q[oc, ic]), (oc, ic)


def test_group_column_order() -> None:
    t = torch.arange(64, dtype=torch.int32).unsqueeze(0).repeat(3, 1)
    p = permute_group_columns(t)
    assert p[0, :8].tolist() == [0, 8, 16, 24, 1, 9, 17, 25]
    assert p[0, 32:36].tolist() == [32, 40, 48, 56]
    assert torch.equal(unpermute_group_columns(p), t)
    r = torch.randint(
        -128, 128, (4, 96), generator=torch.Generator().manual_seed(1), dtype=torch.int8
    )
    assert torch.equal(unpermute_group_columns(permute_group_columns(r)), r)


@pytest.mark.parametrize("shape", [(48, 32), (32, 48), (16, 16)])
def test_pack_rejects_unaligned_shapes(shape: tuple[int, int]) -> None:
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_w4(torch.zeros(shape, dtype=torch.uint8))


def test_pack_rejects_bad_codes_and_dtypes() -> None:
    with pytest.raises(ValueError, match=r"\[0, 15\], found 16"):
        pack_w4(torch.full((32, 32), 16, dtype=torch.uint8))
    with pytest.raises(ValueError, match="uint8"):
        pack_w4(torch.zeros((32, 32), dtype=torch.int8))
    with pytest.raises(ValueError, match="multiple of 32"):
        unpack_w4(torch.zeros((32, 8), dtype=torch.uint8))
    with pytest.raises(ValueError, match="multiple of 32"):
        permute_group_columns(torch.zeros((1, 40), dtype=torch.int8))
