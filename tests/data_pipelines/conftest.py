"""Fixtures for the data pipeline tests (helpers that write corpora live in ``dp_helpers``)."""

import pytest


def pytest_configure(config):
    # megatron-core warns on import that Transformer Engine / Apex are absent; irrelevant to its datasets.
    config.addinivalue_line("filterwarnings", "ignore:.*Transformer Engine and Apex are not installed.*:UserWarning")


@pytest.fixture(scope="session")
def tok():
    from tandem.data_pipelines.tokenizer import load_tokenizer

    return load_tokenizer()
