"""Head patterns (formats/head_pattern.py): DuoAttention's directory format read and written, its
errors, and the global-quantile binarisation into streaming heads."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from omniserve.errors import ConfigError
from omniserve.formats.head_pattern import (
    load_head_pattern,
    random_gates,
    save_head_pattern,
    streaming_heads,
)

# As DuoAttention's training script writes it (numpy savetxt, tabs, "%.18e"), bf16 values and a
# tiny negative included; config.json trimmed to a few of its keys.
DUO_TSV = (
    "6.054687500000000000e-01\t-1.525878906250000000e-05\t9.687500000000000000e-01\n"
    "9.960937500000000000e-01\t0.000000000000000000e+00\t1.000000000000000000e+00\n"
)
DUO_CONFIG = {"lr": 0.02, "num_steps": 2000, "sink_size": 128, "recent_size": 256, "seed": 42}


def _write(directory: Path, tsv: str, config: object = DUO_CONFIG) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "full_attention_heads.tsv").write_text(tsv)
    (directory / "config.json").write_text(
        config if isinstance(config, str) else json.dumps(config)
    )
    return directory


def test_round_trip(tmp_path: Path) -> None:
    gates = torch.rand(5, 3, generator=torch.Generator().manual_seed(0))
    save_head_pattern(tmp_path / "p", gates, sink_size=64, recent_size=512, lr=0.02, seed=3)
    pattern = load_head_pattern(tmp_path / "p", 5, 3)
    assert torch.equal(pattern.gates, gates) and pattern.gates.dtype == torch.float32
    assert (pattern.sink_size, pattern.recent_size, pattern.path) == (64, 512, tmp_path / "p")
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config == {"sink_size": 64, "recent_size": 512, "lr": 0.02, "seed": 3}
    rows = (tmp_path / "p" / "full_attention_heads.tsv").read_text().splitlines()
    assert len(rows) == 5 and all(len(row.split("\t")) == 3 for row in rows)


def test_reads_duoattention_files_and_clips_tiny_negatives(tmp_path: Path) -> None:
    pattern = load_head_pattern(_write(tmp_path, DUO_TSV), 2, 3)
    expected = torch.tensor([[0.60546875, 0.0, 0.96875], [0.99609375, 0.0, 1.0]])
    assert torch.equal(pattern.gates, expected)
    assert (pattern.sink_size, pattern.recent_size) == (128, 256)


def test_window_sizes_are_optional(tmp_path: Path) -> None:
    pattern = load_head_pattern(_write(tmp_path, DUO_TSV, {"lr": 0.02}), 2, 3)
    assert (pattern.sink_size, pattern.recent_size) == (None, None)


SHAPE = "expected 2 rows x 3 columns (layers x KV heads)"


@pytest.mark.parametrize(
    "tsv, message",
    [
        ("", f"0 rows x 0 columns, {SHAPE}"),
        ("0.5\t0.5\t0.5\n", f"1 rows x 3 columns, {SHAPE}"),
        ("0.5\t0.5\n0.5\t0.5\n", f"2 rows x 2 columns, {SHAPE}"),
        ("0.5\t0.5\t0.5\n0.5\t0.5\n", f"row 2 has 2 columns, row 1 has 3; {SHAPE}"),
        ("0.5\t0.5\t0.5\n0.5\tabc\t0.5\n", "row 2 column 2 is not a number: 'abc'"),
        ("0.5\tnan\t0.5\n0.5\t0.5\t0.5\n", "row 1 column 2 is nan; gates lie in [0, 1]"),
        ("0.5\t0.5\t0.5\n0.5\t0.5\tinf\n", "row 2 column 3 is inf"),
        ("0.5\t-0.2\t0.5\n0.5\t0.5\t0.5\n", "row 1 column 2 is -0.2"),
        ("0.5\t0.5\t0.5\n1.5\t0.5\t0.5\n", "row 2 column 1 is 1.5"),
    ],
)
def test_bad_gates_name_the_file(tmp_path: Path, tsv: str, message: str) -> None:
    _write(tmp_path, tsv)
    with pytest.raises(ConfigError) as info:
        load_head_pattern(tmp_path, 2, 3)
    assert str(tmp_path / "full_attention_heads.tsv") in str(info.value)
    assert message in str(info.value)


@pytest.mark.parametrize(
    "config, message",
    [
        ("{not json", "not valid JSON"),
        ("[128, 256]", "expected a JSON object"),
        ({"sink_size": "128"}, "sink_size must be a token count"),
        ({"recent_size": -1}, "recent_size must be a token count"),
        ({"sink_size": True}, "sink_size must be a token count"),
    ],
)
def test_bad_config_names_the_file(tmp_path: Path, config: object, message: str) -> None:
    _write(tmp_path, DUO_TSV, config)
    with pytest.raises(ConfigError) as info:
        load_head_pattern(tmp_path, 2, 3)
    assert str(tmp_path / "config.json") in str(info.value) and message in str(info.value)


def test_missing_directory_or_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such directory"):
        load_head_pattern(tmp_path / "absent", 2, 3)
    for present, absent in (
        ("config.json", "full_attention_heads.tsv"),
        ("full_attention_heads.tsv", "config.json"),
    ):
        directory = _write(tmp_path / absent, DUO_TSV)
        (directory / absent).unlink()
        with pytest.raises(ConfigError, match=f"{directory / absent}: missing"):
            load_head_pattern(directory, 2, 3)
        assert (directory / present).is_file()


def test_streaming_heads_take_the_lowest_gates_of_the_whole_model() -> None:
    # Layers 0 and 1 hold the six lowest gates: a global quantile streams 3 heads of each and none
    # of layer 2, where a per-layer split would stream 2 of each.
    gates = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.5, 0.95, 0.4, 0.45], [0.6, 0.7, 0.99, 0.97]])
    expected = torch.tensor(
        [[True, True, False, True], [True, False, True, True], [False, False, False, False]]
    )
    assert torch.equal(streaming_heads(gates, 0.5), expected)


@pytest.mark.parametrize("sparsity", [0.0, 0.1, 0.25, 1 / 3, 0.5, 0.7, 0.9, 1.0])
def test_streaming_head_count_is_the_rounded_fraction(sparsity: float) -> None:
    gates = random_gates(8, 3, seed=1)
    streaming = streaming_heads(gates, sparsity)
    assert streaming.dtype == torch.bool and streaming.shape == (8, 3)
    assert int(streaming.sum()) == round(sparsity * 24)
    if 0 < sparsity < 1:  # every streaming gate is below every dense one
        assert gates[streaming].max() < gates[~streaming].min()


def test_zero_streams_nothing_and_one_streams_everything() -> None:
    gates = torch.full((4, 2), 0.5)
    assert not streaming_heads(gates, 0.0).any()
    assert streaming_heads(gates, 1.0).all()


def test_ties_go_in_layer_then_head_order() -> None:
    gates = torch.tensor([[0.5, 0.5], [0.2, 0.5], [0.5, 0.5]])
    # 0.2 first, then the tied 0.5s from (0, 0) on.
    assert streaming_heads(gates, 0.5).tolist() == [[True, True], [True, False], [False, False]]
    assert torch.equal(streaming_heads(gates, 0.5), streaming_heads(gates.clone(), 0.5))


@pytest.mark.parametrize("sparsity", [-0.1, 1.01, float("nan")])
def test_sparsity_outside_the_unit_interval_is_refused(sparsity: float) -> None:
    with pytest.raises(ConfigError, match="static_sparsity must be in"):
        streaming_heads(torch.ones(2, 2), sparsity)


def test_random_gates_are_seeded() -> None:
    a, b = random_gates(8, 2, seed=7), random_gates(8, 2, seed=7)
    assert torch.equal(a, b) and not torch.equal(a, random_gates(8, 2, seed=8))
    assert a.shape == (8, 2) and a.dtype == torch.float32 and ((a >= 0) & (a < 1)).all()
