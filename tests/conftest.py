"""Shared test fixtures: paths to ../shared (real tokenizers and corpora) and to fixtures/.

A test that needs ../shared fails (never skips) when CI is set and ../shared is missing, so CI cannot go green
by silently running nothing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "fixtures"
SHARED = REPO.parent / "shared"
TINY_TOKENIZER = FIXTURES / "tiny-tokenizer"
REAL_TOKENIZERS = ("qwen3", "llama3_1", "mistral-7b-v0.1")


def shared_path(*parts: str) -> Path:
    """Path inside ../shared; fails under CI and skips elsewhere when it is missing."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} is missing: tests need ../shared (real tokenizers and corpora) beside the checkout"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


@pytest.fixture(scope="session")
def load_tok():
    """Cached tokenizer loader: load_tok("qwen3") for a real one, load_tok("tiny") for the fixture."""
    from sftdata.tokenizer import load_tokenizer

    cache: dict[str, object] = {}

    def load(name: str):
        if name not in cache:
            path = TINY_TOKENIZER if name == "tiny" else shared_path("tokenizers", name)
            cache[name] = load_tokenizer(str(path))
        return cache[name]

    return load
