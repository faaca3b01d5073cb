"""Precision parsing: every documented choice, aliases, and errors that name the valid choices."""

from __future__ import annotations

import pytest

from omniserve.errors import ConfigError
from omniserve.formats.precision import PRECISION_CHOICES, Precision, parse


@pytest.mark.parametrize(
    ("text", "bits"),
    [
        ("w4a8kv4", (4, 8, 4)),
        ("w4a8kv8", (4, 8, 8)),
        ("w4a8", (4, 8, 8)),
        ("w8a8kv4", (8, 8, 4)),
        ("w8a8kv8", (8, 8, 8)),
        ("w8a8", (8, 8, 8)),
        ("w16a16kv4", (16, 16, 4)),
        ("w16a16kv8", (16, 16, 8)),
        ("w16a16", (16, 16, None)),
    ],
)
def test_parse_per_channel(text: str, bits: tuple[int, int, int | None]) -> None:
    p = parse(text, -1)
    assert (p.weight_bits, p.act_bits, p.kv_bits, p.group_size) == (*bits, -1)
    assert parse(p.name, -1) == p  # the canonical name round-trips


def test_aliases_and_g128() -> None:
    assert parse("w4a8") == parse("w4a8kv8")
    assert parse("W8A8 ") == parse("w8a8kv8")
    assert parse("w4a8kv4", 128) == Precision(4, 8, 4, 128)
    assert parse("w4a8", 128).name == "w4a8kv8"
    assert parse("w16a16").name == "w16a16" and not parse("w16a16").quantized_weights


def test_unknown_precision_names_choices() -> None:
    with pytest.raises(ConfigError) as info:
        parse("w4a4")
    for choice in PRECISION_CHOICES:
        assert choice in str(info.value)


@pytest.mark.parametrize("text", ["w8a8kv4", "w8a8", "w16a16kv8", "w16a16"])
def test_g128_only_for_w4a8(text: str) -> None:
    with pytest.raises(ConfigError, match=r"only valid for W4A8.*w4a8kv4, w4a8kv8, w4a8.*-1"):
        parse(text, 128)


@pytest.mark.parametrize("group_size", [0, 64, 256, -2])
def test_bad_group_size_names_choices(group_size: int) -> None:
    with pytest.raises(ConfigError, match=r"valid choices: -1, 128"):
        parse("w4a8kv4", group_size)


def test_precision_is_frozen() -> None:
    p = parse("w4a8kv4")
    with pytest.raises(AttributeError):
        p.kv_bits = 8  # type: ignore[misc]
