"""Head calibration (omniserve/calibrate, `omniserve calibrate-heads`) on CPU.

- The streaming attention (pages gathered per query page) is the Λ mask of `StreamWindow.visible`.
- The gated model loads HF Llama checkpoints as transformers computes them, and refuses what it
  would compute differently.
- The command writes a pattern `load_head_pattern` reads, with gates moved from 1, the same for
  the same seed.
- The shipped pattern of the bundled model, at static_sparsity 0.5, keeps passkey retrieval where
  random patterns of that sparsity lose it: the bundled model retrieves through one KV head
  (layer 5, head 1: streaming it alone loses every needle outside the window; keeping it alone
  dense, with the 15 others streaming, keeps them all), so a random half streams it about half of
  the time.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from omniserve.calibrate.checkpoint import load_gated_llama, load_tokenizer
from omniserve.calibrate.gated_model import streaming_attention
from omniserve.calibrate.retrieval import retrieval_accuracy
from omniserve.cli.main import main
from omniserve.engine.engine import bundled_model_path
from omniserve.errors import CheckpointError
from omniserve.formats.head_pattern import load_head_pattern, random_gates, streaming_heads
from omniserve.formats.streaming import StreamWindow
from omniserve.training.needles import PasskeyBuilder
from tiny_models import save_checkpoint

MODEL = bundled_model_path()
CPU = torch.device("cpu")


@pytest.mark.parametrize(
    "window, length",
    [
        (StreamWindow(1, 8, 64), 1000),
        (StreamWindow(0, 2, 16), 100),
        (StreamWindow(2, 1, 16), 37),
        (StreamWindow(3, 0, 8), 200),
        (StreamWindow(1, 8, 64), 300),
        (StreamWindow(0, 0, 4), 33),
    ],
)
def test_streaming_attention_is_the_visibility_rule(window: StreamWindow, length: int) -> None:
    q, k, v = torch.randn(3, 2, 3, length, 16, dtype=torch.float64).unbind(0)
    pos = torch.arange(length)
    mask = window.visible(pos[:, None], pos[None, :])
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(streaming_attention(q, k, v, window), expected)


@pytest.mark.parametrize("family", ["llama3", "llama_linear_mha", "llama_head_dim"])
def test_dense_gated_model_is_the_hf_model(tmp_path: Path, family: str) -> None:
    hf = save_checkpoint(family, tmp_path, max_shard_size="40KB")
    model = load_gated_llama(
        tmp_path, StreamWindow(1, 1, 4), device=CPU, dtype=torch.float32, max_positions=64
    )
    ids = torch.randint(3, 300, (2, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(ids, output_hidden_states=True)
        hidden = model(ids)
        torch.testing.assert_close(hidden, expected.hidden_states[-1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(model.logits(hidden), expected.logits, atol=1e-4, rtol=1e-4)
        model.set_gates(torch.ones(2, hf.config.num_key_value_heads))
        torch.testing.assert_close(model(ids), hidden)  # gates of 1: the dense model
    with pytest.raises(ValueError, match="gates of shape"):
        model.set_gates(torch.ones(3, hf.config.num_key_value_heads))


@pytest.mark.parametrize(
    "family, reason",
    [("mistral", "sliding-window attention"), ("qwen2", "attention or MLP biases")],
)
def test_refuses_what_it_would_compute_differently(
    tmp_path: Path, family: str, reason: str
) -> None:
    save_checkpoint(family, tmp_path)
    with pytest.raises(CheckpointError, match=reason):
        load_gated_llama(
            tmp_path, StreamWindow(1, 1, 4), device=CPU, dtype=torch.float32, max_positions=64
        )


def _calibrate(output: Path, *extra: str) -> int:
    args = ["calibrate-heads", "--model", str(MODEL), "--output", str(output), "--no-progress"]
    return main([*args, "--steps", "3", "--context-lengths", "700,800", *extra])


def test_command_writes_a_pattern_deterministically(tmp_path: Path) -> None:
    assert _calibrate(tmp_path / "a") == 0
    assert _calibrate(tmp_path / "b") == 0
    assert _calibrate(tmp_path / "c", "--seed", "1") == 0
    a, b, c = (load_head_pattern(tmp_path / x, 8, 2) for x in "abc")
    assert (a.gates < 1).all() and (a.gates >= 0).all()
    assert torch.equal(a.gates, b.gates) and not torch.equal(a.gates, c.gates)
    assert (a.sink_size, a.recent_size) == (64, 512)
    config = json.loads((tmp_path / "a" / "config.json").read_text())
    assert config["num_steps"] == 3 and config["context_lengths"] == [700, 800]
    assert config["lr"] == 0.02 and config["reg_weight"] == 0.05 and config["seed"] == 0
    assert config["command"].startswith(f"omniserve calibrate-heads --model {MODEL} ")


@pytest.mark.slow
def test_shipped_pattern_keeps_retrieval_that_random_patterns_lose() -> None:
    pattern = load_head_pattern(MODEL / "attn_pattern", 8, 2)
    assert (pattern.sink_size, pattern.recent_size) == (64, 512)
    window = StreamWindow.of_tokens(pattern.sink_size, pattern.recent_size, 64)
    model = load_gated_llama(MODEL, window, device=CPU, dtype=torch.float32, max_positions=2048)
    tok = load_tokenizer(MODEL)
    builder = PasskeyBuilder(tok)

    def accuracy(streaming: torch.Tensor | None) -> float:
        # Needles 1000-1500 tokens before the question: outside the 640-token window.
        options = dict(lengths=[2048], depths=[0.25, 0.5], samples=4, seed=5)
        return retrieval_accuracy(model, tok, builder, streaming, **options)

    dense = accuracy(None)
    shipped = accuracy(streaming_heads(pattern.gates, 0.5))
    random = [accuracy(streaming_heads(random_gates(8, 2, seed), 0.5)) for seed in range(4)]
    assert dense >= shipped >= 0.875
    assert dense >= max(random)
    assert shipped >= sum(random) / len(random) + 0.3


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "steps >= 1"),
        (["--context-lengths", "600"], "must exceed the streaming window (640 tokens)"),
        (["--context-lengths", "9000"], "exceed the model's 8192"),
        (["--context-lengths", "700", "--sink-tokens", "-1"], "--sink-tokens and --local-tokens"),
        (["--context-lengths", "20,700"], "a passkey document needs at least"),
        (["--device", "tpu:x"], "tpu"),
    ],
)
def test_bad_settings_are_reported(
    tmp_path: Path, flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["calibrate-heads", "--model", str(MODEL), "--output", str(tmp_path / "p")]
    assert main([*args, *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("omniserve calibrate-heads: error:") and message in err
    assert not (tmp_path / "p").exists()


@pytest.mark.parametrize(
    "flags", [["--context-lengths", "1k"], ["--dtype", "float64"], ["--steps", "x"]]
)
def test_malformed_flags_are_usage_errors(tmp_path: Path, flags: list[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["calibrate-heads", "--model", str(MODEL), "--output", str(tmp_path), *flags])
    assert exc.value.code == 2


def test_missing_or_quantized_model_is_reported(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "absent"
    assert main(["calibrate-heads", "--model", str(missing), "--output", str(tmp_path / "p")]) == 2
    assert f"{missing}: no config.json" in capsys.readouterr().err
    quantized = tmp_path / "quantized"
    quantized.mkdir()
    config = json.loads((MODEL / "config.json").read_text())
    config["quantization_config"] = {"precision": "w4a8kv4"}
    (quantized / "config.json").write_text(json.dumps(config))
    assert (
        main(["calibrate-heads", "--model", str(quantized), "--output", str(tmp_path / "p")]) == 2
    )
    assert "is a quantized checkpoint; calibrate the fp checkpoint" in capsys.readouterr().err
