import os

import pytest

# Tests never touch the network: a model id that is not a local folder must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A freshly built tiny-preset checkpoint folder, shared by the whole test session."""
    import agent
    return agent.build_tiny_model(str(tmp_path_factory.mktemp("tiny") / "tiny"), seed=0)


@pytest.fixture(scope="session")
def tiny(tiny_dir):
    """(model, tokenizer) of the tiny preset, fp32 on CPU. Treat as read-only."""
    import agent
    return agent.load_model(tiny_dir, device="cpu")
