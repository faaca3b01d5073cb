"""benches/fit_gemm_tiles.py on the H100 sweep checked in under benches/results (no GPU): the
constants of the tensor-core tile cost model in cuda/gemm/dispatch.cuh are what the fit gives, and
the model's picks come within 1% of the sweep's fastest tiles in total."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from bench_scripts import load_bench_script

ROOT = Path(__file__).resolve().parents[1]
SWEEP = ROOT / "benches" / "results" / "h100-kernels-gemm-tiles.json"
DISPATCH = ROOT / "cuda" / "gemm" / "dispatch.cuh"


@pytest.fixture(scope="module")
def fitted() -> dict:
    return load_bench_script("fit_gemm_tiles").fit(json.loads(SWEEP.read_text()))


def _shipped() -> dict[str, float]:
    """The constants as cuda/gemm/dispatch.cuh spells them, keyed as the fit names them."""
    text = DISPATCH.read_text()
    found = {
        "fill": float(re.search(r"kFillUs = ([\d.]+);", text).group(1)),  # type: ignore[union-attr]
        "reduce": float(re.search(r"kReduceUs = ([\d.]+);", text).group(1)),  # type: ignore[union-attr]
    }
    arrays = re.findall(r"std::array<double, 3>\{([\d., ]+)\}", text)
    # Declared in the order W8A8, W4A8 per-channel, W4A8 g128 (the fit's FORMATS).
    for op, values in zip(load_bench_script("fit_gemm_tiles").FORMATS, arrays, strict=True):
        for height, value in zip((64, 128, 256), values.split(","), strict=True):
            found[f"{op}@{height}"] = float(value)
    return found


def test_the_shipped_constants_are_the_fit_of_the_checked_in_sweep(fitted: dict) -> None:
    shipped = _shipped()
    assert set(shipped) == set(fitted["constants"])
    for name, value in fitted["constants"].items():
        assert shipped[name] == pytest.approx(value, abs=0.006), name


def test_the_model_picks_near_the_fastest_tile_and_beats_the_old_rule(fitted: dict) -> None:
    picks = fitted["picks"]
    assert len(picks) == 40  # 3 formats x 4 shapes x M 64..512 (W8A8: M 256, 1024)
    pick = sum(p["pick_us"] for p in picks)
    best = sum(p["best_us"] for p in picks)
    auto = sum(p["auto_us"] for p in picks)
    assert best <= pick <= 1.01 * best
    # The sweep's automatic path: the pre-model tile rule below M = 512, CUTLASS at 512.
    assert pick < 0.85 * auto
    assert fitted["median_error"] < 0.05
