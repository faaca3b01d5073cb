"""`_scheduler.pyi` names exactly what the Rust extension exports, and the extension's own
description of the step protocol and of its config holds together."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

import omniserve._scheduler as ext
from omniserve.config import SCHEDULER_OPTIONS, EngineConfig
from omniserve.engine.step_io import StepIO
from omniserve.errors import ConfigError
from omniserve.runner.step_plan import PLAN_BUFFERS, StepPlan

STUB = Path(ext.__file__).with_name("_scheduler.pyi")
TREE = ast.parse(STUB.read_text())


def _members(nodes: list[ast.stmt]) -> set[str]:
    names = {n.name for n in nodes if isinstance(n, (ast.ClassDef, ast.FunctionDef))}
    names |= {
        n.target.id
        for n in nodes
        if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)
    }
    return {n for n in names if not n.startswith("_")}


def _annotated(cls: str) -> list[str]:
    """The attribute annotations of a stub class, in order, less its upper-case constants."""
    (node,) = [n for n in TREE.body if isinstance(n, ast.ClassDef) and n.name == cls]
    return [
        n.target.id
        for n in node.body
        if isinstance(n, ast.AnnAssign)
        and isinstance(n.target, ast.Name)
        and not n.target.id.isupper()
    ]


def test_stub_matches_the_extension() -> None:
    assert _members(TREE.body) == {n for n in dir(ext) if not n.startswith("_")}
    for node in TREE.body:
        if isinstance(node, ast.ClassDef) and not issubclass(
            getattr(ext, node.name), BaseException
        ):
            real = {n for n in dir(getattr(ext, node.name)) if not n.startswith("_")}
            assert _members(node.body) == real, node.name


def test_stub_lists_fields_in_the_extensions_order() -> None:
    assert _annotated("SchedulerConfig") == list(ext.SchedulerConfig.FIELDS)
    assert _annotated("StepCounts") == list(ext.StepCounts.FIELDS)


def test_error_hierarchy() -> None:
    for error in (ext.ConfigError, ext.InvalidRequestError):
        assert issubclass(error, ext.OmniserveError)
        assert issubclass(error, ValueError)
    assert issubclass(ext.RequestRejectedError, ext.OmniserveError)
    assert issubclass(ext.SchedulerInternalError, ext.OmniserveError)
    assert ConfigError is ext.ConfigError


def test_buffer_description_is_consistent() -> None:
    names = [spec.name for spec in ext.STEP_BUFFERS]
    assert len(set(names)) == len(names)
    for spec in ext.STEP_BUFFERS:
        assert spec.dtype in ("int32", "int64"), spec
        assert spec.doc, spec
        if spec.phase == "update":
            assert spec.count == "num_outputs", spec
        else:
            assert spec.count in ext.StepCounts.FIELDS, spec
    assert [s.name for s in PLAN_BUFFERS] == [
        s.name for s in ext.STEP_BUFFERS if s.phase == "schedule" and s.reader == "runner"
    ]
    (sampled,) = [s for s in ext.STEP_BUFFERS if s.phase == "input"]
    assert sampled.name == "sampled"


def test_buffers_have_the_described_sizes() -> None:
    config = ext.SchedulerConfig(num_dense_pages=10, max_model_len=128, max_num_seqs=4)
    buffers = ext.Scheduler(config).buffers()
    assert list(buffers) == [spec.name for spec in ext.STEP_BUFFERS]
    for spec in ext.STEP_BUFFERS:
        itemsize = 8 if spec.dtype == "int64" else 4
        assert len(buffers[spec.name]) == spec.capacity(config) * itemsize, spec


def test_a_step_read_through_the_description() -> None:
    config = ext.SchedulerConfig(num_dense_pages=10, max_model_len=128, page_size=16)
    io = StepIO(ext.Scheduler(config))
    io.scheduler.add_request(7, list(range(1, 21)), max_tokens=1)
    counts, plan = io.schedule()
    assert counts == ext.StepCounts(num_reqs=1, num_tokens=20, num_page_updates=2)
    assert plan is not None and set(plan) == {s.name for s in PLAN_BUFFERS}
    assert plan.input_ids.tolist() == list(range(1, 21))
    assert plan.qstart.tolist() == [0, 20]
    assert plan.page_updates.shape == (2, 3)
    assert plan.flags.tolist() == [ext.FLAG_PREFILL | ext.FLAG_NEEDS_LOGITS | ext.FLAG_NEW_ROW]
    assert io.req_ids(counts) == [7]
    out = io.update(torch.tensor([0]), torch.tensor([5], dtype=torch.int32))
    assert out == ([7], [5], [0], [ext.FINISH_LENGTH])
    assert ext.FINISH_REASONS[ext.FINISH_LENGTH] == "length"


def test_hand_made_plans_fill_what_is_not_given() -> None:
    plan = StepPlan.of(
        rows=torch.tensor([0, 1], dtype=torch.int32),
        input_ids=torch.zeros(5, dtype=torch.int32),
    )
    assert plan.num_reqs == 2 and plan.num_tokens == 5
    assert plan.qstart.shape == (3,) and plan.page_updates.shape == (0, 3)
    with pytest.raises(TypeError, match="unknown"):
        StepPlan.of(req_ids=torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ValueError, match="items"):
        StepPlan.of(rows=torch.zeros(2, dtype=torch.int32), pos0=torch.zeros(3, dtype=torch.int32))
    with pytest.raises(AttributeError, match="no buffer"):
        _ = plan.sampled


def test_config_by_name() -> None:
    config = ext.SchedulerConfig(
        num_dense_pages=10, max_model_len=128, watermark=0, scheduling_policy="priority"
    )
    assert (config.watermark, config.scheduling_policy) == (0.0, "priority")
    defaults = ext.SchedulerConfig.DEFAULTS
    assert list(defaults) == list(ext.SchedulerConfig.FIELDS[2:])
    assert all(
        getattr(config, k) == v
        for k, v in defaults.items()
        if k not in ("watermark", "scheduling_policy")
    )
    for bad in (
        {"policy": "fcfs"},
        {"max_num_seqs": -1},
        {"max_num_seqs": True},
        {"max_num_seqs": 1.5},
        {"scheduling_policy": "lifo"},
        {"max_num_seqs": 64, "max_num_batched_tokens": 32},
    ):
        with pytest.raises(ConfigError):
            ext.SchedulerConfig(num_dense_pages=10, max_model_len=128, **bad)
    with pytest.raises(ConfigError, match="num_dense_pages"):
        ext.SchedulerConfig(num_dense_pages=1, max_model_len=128)
    ext.SchedulerConfig.check(max_num_seqs=8)
    with pytest.raises(ConfigError, match="max_model_len"):
        ext.SchedulerConfig.check(max_model_len=1)


def test_engine_config_hands_over_the_scheduler_options() -> None:
    defaults = ext.SchedulerConfig.DEFAULTS
    config = EngineConfig(model="m")
    assert "page_size" in SCHEDULER_OPTIONS and "scheduling_policy" in SCHEDULER_OPTIONS
    # None: the engine decides `enable_prefix_caching` (on unless streaming heads are) and
    # `async_scheduling` (on with a CUDA device).
    decided = {"enable_prefix_caching", "async_scheduling"}
    assert config.scheduler_options() == {
        name: defaults[name] for name in SCHEDULER_OPTIONS if name not in decided
    }
    off = EngineConfig(
        model="m", enable_prefix_caching=False, async_scheduling=False
    ).scheduler_options()
    assert off["enable_prefix_caching"] is False and off["async_scheduling"] is False
    with pytest.raises(ConfigError, match="enable_prefix_caching"):
        EngineConfig(model="m", enable_prefix_caching=True, static_sparsity=0.5)
    # The scheduler options an engine user cannot set: the runner derives them (the streaming
    # pool's size and table layout, `ModelRunner.scheduler_options`).
    assert set(defaults) - set(SCHEDULER_OPTIONS) == {
        "num_stream_pages",
        "stream_sink_pages",
        "stream_local_pages",
    }
    with pytest.raises(ConfigError, match="max_num_batched_tokens"):
        EngineConfig.from_kwargs("m", max_num_seqs=64, max_num_batched_tokens=32)
    with pytest.raises(ConfigError, match="num_dense_pages"):
        EngineConfig.from_kwargs("m", num_kv_pages=1)
