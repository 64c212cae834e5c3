"""Shared test fixtures: the reference fixture from ../shared and tiny models."""

import os
import sys
from pathlib import Path

# scanpy's seurat_v3 HVGs run numba-parallel code; a numba pool of 2 threads started after torch has run kernels
# made every later torch op in the same process 10-20x slower on the busy 2-core machine (seen: a tiny pretraining
# loop 0.55 s -> 12 s per epoch). One numba thread avoids it; must be set before numba is imported.
os.environ.setdefault("NUMBA_NUM_THREADS", "1")

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
REFERENCE = SHARED / "reference" / "scbert_reference_small.pt"
LAYOUT = SHARED / "reference" / "scbert_state_dict_layout.json"

if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tests use tiny models, for which one thread is fastest; more threads only spin against each other when the
# machine is busy (seen here: 30x slower with 2 threads under load). Benchmarks set their own thread counts.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def reference():
    """Outputs of the reference implementation for given weights and tokens (SPEC section 9)."""
    if not REFERENCE.exists():
        pytest.fail(f"the reference fixture {REFERENCE} is missing: CI provides ../shared beside the checkout")
    return torch.load(REFERENCE, weights_only=True)


@pytest.fixture(scope="session")
def reference_lm_state_dict(reference):
    """The pretraining checkpoint built from the fine-tuned one: `to_out.*` replaced by the LM head."""
    finetuned = reference["finetune_checkpoint"]["model_state_dict"]
    state = {k: v for k, v in finetuned.items() if not k.startswith("to_out.")}
    state.update(reference["lm_head"])
    return state
