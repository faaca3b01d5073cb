"""Checkpoint loading: sharded and single-file safetensors, dummy weights, and errors that say
which tensor is wrong and how."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import PretrainedConfig

from omniserve.config import EngineConfig
from omniserve.errors import CheckpointError
from omniserve.kernels import dispatch
from omniserve.kernels.dispatch import KernelChoices
from omniserve.models.llama import kernel_shape
from omniserve.models.loader import load_hf_config, load_model
from omniserve.runner.model_runner import ModelRunner
from tiny_models import PagedRequests, hf_logits, save_checkpoint, tiny_config

CPU = torch.device("cpu")


def _runner(directory: Path, **kwargs: object) -> ModelRunner:
    config = EngineConfig.from_kwargs(
        str(directory),
        device="cpu",
        page_size=16,
        num_kv_pages=16,
        max_num_seqs=4,
        max_num_batched_tokens=64,
        **kwargs,
    )
    return ModelRunner(config)


def _last_logits(runner: ModelRunner, prompt: list[int]) -> torch.Tensor:
    return runner.compute_logits(PagedRequests(16, 16).step([(0, prompt)]))[1][0]


def _load(directory: Path) -> None:
    hf_config = load_hf_config(str(directory))
    load_model(
        str(directory),
        hf_config,
        device=CPU,
        dtype=torch.float32,
        max_positions=64,
        kernels=_cpu_kernels(hf_config),
    )


def _cpu_kernels(hf_config: PretrainedConfig) -> KernelChoices:
    return dispatch.decide(
        device=CPU,
        dtype=torch.float32,
        attention_backend="auto",
        shape=kernel_shape(hf_config, None),
    )


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("single")
    save_checkpoint("llama3", directory)
    return directory


def _edited_copy(src: Path, dst: Path, edit: dict[str, torch.Tensor | None]) -> Path:
    """Copy of the single-file checkpoint `src` with tensors replaced, added, or (None) removed."""
    tensors = load_file(src / "model.safetensors")
    for name, tensor in edit.items():
        if tensor is None:
            del tensors[name]
        else:
            tensors[name] = tensor
    dst.mkdir()
    (dst / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def test_sharded_checkpoint(tmp_path: Path) -> None:
    hf = save_checkpoint("qwen2", tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 3
    prompt = list(range(5, 30))
    torch.testing.assert_close(
        _last_logits(_runner(tmp_path), prompt), hf_logits(hf, prompt)[-1], atol=1e-4, rtol=1e-4
    )


def test_missing_tensor_is_named(single: Path, tmp_path: Path) -> None:
    bad = _edited_copy(single, tmp_path / "bad", {"model.layers.1.mlp.up_proj.weight": None})
    with pytest.raises(CheckpointError, match=r"missing tensors: model\.layers\.1\.mlp\.up_proj\."):
        _load(bad)


def test_wrong_shape_is_named(single: Path, tmp_path: Path) -> None:
    edit = {"model.layers.0.self_attn.k_proj.weight": torch.zeros(16, 64)}
    bad = _edited_copy(single, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError) as info:
        _load(bad)
    assert "model.layers.0.self_attn.k_proj.weight" in str(info.value)
    assert "[16, 64]" in str(info.value) and "[32, 64]" in str(info.value)


def test_unexpected_tensor_is_named(single: Path, tmp_path: Path) -> None:
    bad = _edited_copy(single, tmp_path / "bad", {"model.layers.0.extra.weight": torch.zeros(3)})
    with pytest.raises(CheckpointError, match=r"unexpected tensors: model\.layers\.0\.extra\."):
        _load(bad)


def test_integer_tensor_is_named(single: Path, tmp_path: Path) -> None:
    edit = {"model.norm.weight": torch.ones(64, dtype=torch.int8)}
    bad = _edited_copy(single, tmp_path / "bad", edit)
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight has dtype I8"):
        _load(bad)


def test_bf16_checkpoint_loads_into_fp32(single: Path, tmp_path: Path) -> None:
    tensors = load_file(single / "model.safetensors")
    half = _edited_copy(single, tmp_path / "bf16", {n: t.bfloat16() for n, t in tensors.items()})
    hf_config = load_hf_config(str(half))
    model = load_model(
        str(half),
        hf_config,
        device=CPU,
        dtype=torch.float32,
        max_positions=64,
        kernels=_cpu_kernels(hf_config),
    ).model
    expected = tensors["model.layers.0.self_attn.v_proj.weight"].bfloat16().float()
    assert torch.equal(model.model.layers[0].self_attn.qkv_proj.weight[-32:], expected)


def test_tied_lm_head_in_checkpoint_is_ignored(tmp_path: Path) -> None:
    save_checkpoint("qwen2", tmp_path / "tied")
    tensors = load_file(tmp_path / "tied" / "model.safetensors")
    assert "lm_head.weight" not in tensors
    extra = {"lm_head.weight": torch.zeros_like(tensors["model.embed_tokens.weight"])}
    _load(_edited_copy(tmp_path / "tied", tmp_path / "with_head", extra))


def test_unsupported_architecture(tmp_path: Path) -> None:
    config = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}
    (tmp_path / "config.json").write_text(json.dumps(config))
    expected = r"unsupported model.*llama, mistral, qwen2.*LlamaForCausalLM"
    with pytest.raises(CheckpointError, match=expected):
        load_hf_config(str(tmp_path))


def test_unsupported_rope_scaling(tmp_path: Path) -> None:
    rope = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0}
    tiny_config("llama3", rope_parameters=rope).save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"rope_type 'yarn'.*default, linear, llama3"):
        _load(tmp_path)


def test_missing_files(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no config.json"):
        load_hf_config(str(tmp_path))
    tiny_config("mistral").save_pretrained(str(tmp_path))
    with pytest.raises(CheckpointError, match=r"no model\.safetensors"):
        _load(tmp_path)


def test_dummy_weights_from_config_alone(tmp_path: Path) -> None:
    tiny_config("mistral").save_pretrained(str(tmp_path))
    prompt = list(range(3, 20))
    a = _last_logits(_runner(tmp_path, load_format="dummy", seed=1), prompt)
    b = _last_logits(_runner(tmp_path, load_format="dummy", seed=1), prompt)
    c = _last_logits(_runner(tmp_path, load_format="dummy", seed=2), prompt)
    assert torch.equal(a, b) and not torch.equal(a, c)
    bf16 = _last_logits(_runner(tmp_path, load_format="dummy", seed=1, dtype="bfloat16"), prompt)
    assert bf16.isfinite().all()
