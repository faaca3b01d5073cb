"""Marks shared by the GPU kernel tests."""

import pytest

skip_failed_check_crash = pytest.mark.skip(
    reason="on the H100 image (torch 2.11, seen 2026-11-27) a failed TORCH_CHECK in our extensions "
    "whose message formats an integer kills the process with SIGSEGV, while checks whose message "
    "formats only strings or dtypes raise RuntimeError; cause not yet found, so these tests "
    "would take the whole pytest process down"
)
