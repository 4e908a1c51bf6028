"""Shared fixtures: real catalogue models, loaded once per test session."""

from __future__ import annotations

import re

import pytest

from rh_lens.model.loading import load_model


@pytest.fixture(scope="session")
def real_model():
    """`real_model(name)`: a catalogue model on the CPU, loaded once for every test module
    that asks for it (the first run downloads it into the cache)."""
    loaded = {}

    def load(name: str):
        if name not in loaded:
            loaded[name] = load_model(name, device="cpu")
        return loaded[name]

    return load


@pytest.fixture(scope="session")
def pydoc_words():
    """`pydoc_words(n)`: n words of natural English from CPython's own documentation (present
    everywhere), runs of reStructuredText underline characters removed."""
    from pydoc_data.topics import topics

    words = [w for w in " ".join(topics[k] for k in sorted(topics)).split() if not re.fullmatch(r"[-=*^~]{3,}", w)]
    return lambda n: " ".join(words[:n])
