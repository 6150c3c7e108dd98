"""Shared fixtures: the real corpus, a BM25 index over it, and the tiny and embedded models (built once per run)."""

import pytest

import data
import models
import tools


@pytest.fixture(scope="session")
def corpus():
    return data.wiki_corpus()


@pytest.fixture(scope="session")
def bm25(corpus):
    return tools.BM25Search(corpus)


@pytest.fixture(scope="session")
def tiny():
    """(model, tokenizer) of the 2-layer random model with SmolLM2's tokenizer."""
    return models.load_model(models.TINY)


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the real embedded SmolLM2-135M-Instruct."""
    return models.load_model(models.EMBEDDED)
