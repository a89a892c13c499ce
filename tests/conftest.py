"""Shared test setup.

Triton kernels run under the interpreter (TRITON_INTERPRET=1) unless a CUDA device is present, in
which case the same tests run compiled on the GPU. This must happen before anything imports triton.
Model files come from the registry (pulled from PyPI on first use, then cached in $LLAMATRON_HOME).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

DATA = Path(__file__).parent / "data"


def kernel_device() -> str:
    """Where Triton kernel tests put their tensors: the GPU when present, else CPU + interpreter."""
    return "cuda" if HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"


def model_file(name: str) -> Path:
    from engine.loading.registry import resolve

    try:
        return resolve(name)
    except Exception as e:  # no network and no cache: say so rather than fail obscurely
        pytest.skip(f"model {name} unavailable: {e}")


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    return model_file("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def gemma3_path() -> Path:
    return model_file("gemma-3-270m")


@pytest.fixture(scope="session")
def qwen_path() -> Path:
    return model_file("qwen2.5-coder-0.5b-instruct")
