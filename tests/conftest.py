import os

import pytest
import torch

# Hypothesis example counts: CI default, raised for long runs with
# KVCOMPACT_FUZZ_EXAMPLES (e.g. 20000).
FUZZ_EXAMPLES = int(os.environ.get("KVCOMPACT_FUZZ_EXAMPLES", "0")) or None

HAS_CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device")
