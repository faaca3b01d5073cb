"""SamplingParams: defaults, normalisation, and validation messages that name field and range."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from omniserve.errors import InvalidRequestError
from omniserve.sampling_params import SamplingParams


def test_defaults() -> None:
    p = SamplingParams()
    assert (p.temperature, p.top_p, p.top_k, p.min_p) == (1.0, 1.0, 0, 0.0)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty) == (1.0, 0.0, 0.0)
    assert (p.max_tokens, p.min_tokens, p.stop, p.stop_token_ids) == (16, 0, (), ())
    assert not p.ignore_eos and not p.include_stop_str_in_output and p.skip_special_tokens
    assert p.seed is None and p.logprobs is None and not p.greedy


def test_stop_is_normalised_to_a_tuple() -> None:
    assert SamplingParams(stop="###").stop == ("###",)
    assert SamplingParams(stop=["a", "b"]).stop == ("a", "b")  # type: ignore[arg-type]
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)  # type: ignore[arg-type]
    assert SamplingParams.from_dict({"stop": ["x"], "stop_token_ids": [7]}).stop == ("x",)
    assert SamplingParams.from_dict({"stop": "x"}).stop == ("x",)
    # Tuples keep the struct hashable, so equal params can share cached state.
    listed = SamplingParams(stop=["a"])  # type: ignore[arg-type]
    assert hash(listed) == hash(SamplingParams(stop=("a",)))


def test_frozen() -> None:
    with pytest.raises(AttributeError):
        SamplingParams().temperature = 0.5  # type: ignore[misc]


def test_greedy_and_top_k_off_spellings() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy
    assert not SamplingParams(temperature=0.01).greedy
    assert SamplingParams(top_k=-1).top_k == -1 and SamplingParams(top_k=0).top_k == 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": -0.1}, "temperature must be >= 0"),
        ({"temperature": float("nan")}, "temperature must be >= 0"),
        ({"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ({"top_p": 1.5}, r"top_p must be in \(0, 1\]"),
        ({"top_k": -2}, "top_k must be >= 1, or 0 or -1"),
        ({"min_p": 1.1}, r"min_p must be in \[0, 1\]"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ({"presence_penalty": 2.5}, r"presence_penalty must be in \[-2, 2\]"),
        ({"frequency_penalty": -3.0}, r"frequency_penalty must be in \[-2, 2\]"),
        ({"max_tokens": 0}, "max_tokens must be >= 1"),
        ({"min_tokens": -1}, r"min_tokens must be in \[0, max_tokens=16\]"),
        ({"min_tokens": 5, "max_tokens": 4}, r"min_tokens must be in \[0, max_tokens=4\]"),
        ({"stop": ["ok", ""]}, "stop must not contain empty strings"),
        ({"stop": ""}, "stop must not contain empty strings"),
        ({"stop_token_ids": [-1]}, "stop_token_ids must be >= 0"),
        ({"logprobs": 21}, r"logprobs must be in \[0, 20\]"),
        ({"logprobs": -1}, r"logprobs must be in \[0, 20\]"),
    ],
)
def test_invalid_values(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, ValueError)
    assert ", got " in str(info.value)  # the offending value is echoed back
    # The same check applies to untrusted input.
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams.from_dict(kwargs)


def test_boundaries_accepted() -> None:
    SamplingParams(temperature=0, top_p=1, top_k=-1, min_p=1, presence_penalty=-2)
    SamplingParams(frequency_penalty=2, max_tokens=1, min_tokens=1, logprobs=20)
    SamplingParams(logprobs=0, seed=-5, repetition_penalty=1e-3)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"temperature": "hot"}, r"Expected `float`, got `str` - at `\$.temperature`"),
        ({"max_tokens": 1.5}, r"Expected `int`, got `float` - at `\$.max_tokens`"),
        ({"ignore_eos": 1}, r"Expected `bool`, got `int` - at `\$.ignore_eos`"),
        ({"stop": [1]}, r"at `\$.stop"),
        ({"best_of": 2}, "unknown field `best_of`"),
    ],
)
def test_from_dict_reports_type_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(InvalidRequestError, match=message):
        SamplingParams.from_dict(data)


def test_from_dict_roundtrip() -> None:
    p = SamplingParams(temperature=0.3, stop=("a",), seed=3, logprobs=2, top_k=40)
    assert SamplingParams.from_dict(msgspec.to_builtins(p)) == p
    assert SamplingParams.from_dict({"temperature": 1}) == SamplingParams()  # int is a float
