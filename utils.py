"""Code shared by the scripts: user-facing errors, boolean flags, the preprocessed-data contract and tokenisation.

Scripts stay thin: they parse arguments and call functions from here, from `training.py` and from the model package.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from performer_pytorch.errors import ScbertError

__all__ = ["PREPROCESS_UNS_KEY", "ScbertError", "atomic_write_bytes", "run_cli", "str2bool", "tokenize"]

# Key under which preprocess.py records what it did; later scripts read it to check their input.
PREPROCESS_UNS_KEY = "scbert_preprocess"


def run_cli(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Run a script's `main`, turning a `ScbertError` into one line on stderr and exit code 2 (no traceback)."""
    try:
        main(argv)
    except ScbertError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def str2bool(text: str | bool) -> bool:
    """Parse `True/False/yes/no/1/0` for argparse; the reference's `type=bool` made `--flag False` mean True."""
    if isinstance(text, bool):
        return text
    value = str(text).strip().lower()
    if value in {"true", "t", "yes", "y", "1", "on"}:
        return True
    if value in {"false", "f", "no", "n", "0", "off"}:
        return False
    raise argparse.ArgumentTypeError(f"expected True or False, got {text!r}")


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` via a temporary file in the same folder and a rename: readers never see half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def tokenize(values: np.ndarray | sp.spmatrix | torch.Tensor, bin_num: int = 5) -> torch.Tensor:
    """Expression bins of scBERT: `min(floor(v), bin_num)` per gene, then one appended 0 token (SPEC section 1).

    values: (cells, genes) or (genes,) log2(1 + CP10K) expression, dense or sparse.
    Returns int64 tokens of shape (cells, genes + 1) or (genes + 1,).
    """
    if sp.issparse(values):
        values = values.toarray()
    tensor = torch.as_tensor(np.asarray(values) if not isinstance(values, torch.Tensor) else values)
    single = tensor.dim() == 1
    if single:
        tensor = tensor.unsqueeze(0)
    tokens = torch.clamp(torch.floor(tensor.float()), min=0, max=bin_num).long()
    tokens = torch.cat([tokens, torch.zeros(tokens.shape[0], 1, dtype=torch.long)], dim=1)
    return tokens[0] if single else tokens
