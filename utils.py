"""Code shared by the scripts: user-facing errors, boolean flags, the preprocessed-data contract and tokenisation.

Scripts stay thin: they parse arguments and call functions from here, from `training.py` and from the model package.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from performer_pytorch.errors import ModelInputError

# The project's user-facing error: the model package's ModelInputError under the scripts' name, so that a problem
# found in the package (an unreadable checkpoint) and one found by a script (a missing label column) are one type.
ScbertError = ModelInputError

__all__ = [
    "PREPROCESS_UNS_KEY",
    "ScbertError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_h5ad",
    "write_json",
    "check_expression",
    "read_preprocessed",
    "run_cli",
    "str2bool",
    "tokenize",
]

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


def atomic_write(path: str, write: Callable[[str], None], *, suffix: str = "") -> None:
    """The one way files are written: `write(tmp)` fills a temporary file in the same folder, which is then renamed
    to `path`, so readers never see half a file and a crash leaves the old file (if any) in place. suffix: an
    extension the writer needs on the temporary name (e.g. ".h5ad")."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}{suffix}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_bytes(path: str, data: bytes) -> None:
    """Write `data` to `path` atomically (see `atomic_write`), synced to disk before the rename."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())

    atomic_write(path, write)


def write_json(path: str, value: Any) -> None:
    """`value` as indented JSON, written atomically."""
    atomic_write_bytes(path, (json.dumps(value, indent=2) + "\n").encode("utf-8"))


def atomic_write_h5ad(adata, path: str) -> None:
    """`adata.write_h5ad` atomically (see `atomic_write`)."""
    atomic_write(path, adata.write_h5ad, suffix=".h5ad")


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


def check_gene_order(data_genes: Sequence[str], model_genes: Sequence[str], *, data_name: str, fix: str) -> None:
    """Refuse data whose genes are not the model's genes in the model's order, saying where they first differ."""
    data_genes, model_genes = list(map(str, data_genes)), list(map(str, model_genes))
    if data_genes == model_genes:
        return
    missing = len(set(model_genes) - set(data_genes))
    first = next((i for i, (a, b) in enumerate(zip(data_genes, model_genes, strict=False)) if a != b), None)
    where = (
        f"first difference at position {first}: {data_genes[first]!r} vs {model_genes[first]!r}"
        if first is not None
        else "one list is a prefix of the other"
    )
    raise ScbertError(
        f"the genes of {data_name} ({len(data_genes)}) are not the model's {len(model_genes)} genes in order "
        f"({missing} missing, {where}): {fix}"
    )


CHECK_CHUNK = 1 << 22  # values checked at a time, so a check of a huge matrix needs no full-size temporary


def first_fractional(values: np.ndarray) -> int | None:
    """Position of the first value that is not a whole number, or None: the one test of "these are counts"."""
    values = np.asarray(values).ravel()
    if values.dtype.kind in "biu":
        return None
    for start in range(0, values.size, CHECK_CHUNK):
        chunk = values[start : start + CHECK_CHUNK]
        fractional = np.flatnonzero(chunk != np.floor(chunk))
        if fractional.size:
            return start + int(fractional[0])
    return None


def looks_like_counts(data: np.ndarray) -> bool:
    """True when stored values are all whole numbers with some large ones: raw counts, not log2(1 + CP10K).

    (Small whole numbers alone could be log values of a tiny matrix; log2(1 + CP10K) never reaches 30.)"""
    if data.size == 0:
        return False
    sample = data[: 1_000_000]
    return first_fractional(sample) is None and bool(sample.max() > 30)


def check_expression(matrix, *, name: str) -> sp.csr_matrix:
    """The expression matrix as CSR float32, checked to hold log2(1 + CP10K) values: finite, not negative, not raw
    counts. name: how messages call the data (e.g. the file's path)."""
    # No copy of a CSR float32 matrix (a preprocess.py output already is one): a second copy of X at load would double
    # the memory every rank needs for an in-memory corpus.
    matrix = (sp.csr_matrix(matrix, dtype=np.float32) if not sp.isspmatrix_csr(matrix)
              else matrix.astype(np.float32, copy=False))
    values = matrix.data
    if not np.isfinite(values).all():
        raise ScbertError(f"{name} contains NaN or infinite expression values: fix the input and rerun preprocess.py")
    if values.size and values.min() < 0:
        raise ScbertError(
            f"{name} contains negative expression values (scaled data?): scBERT needs log2(1 + CP10K) values from "
            "preprocess.py"
        )
    if looks_like_counts(values):
        raise ScbertError(
            f"{name} holds raw counts (whole numbers up to {values.max():.0f}) where log-normalised values are "
            "expected: run preprocess.py on it first"
        )
    return matrix


def read_preprocessed(path: str, *, genes: Sequence[str] | None = None, fix_genes: str | None = None):
    """Read a preprocess.py output: AnnData with X as CSR float32 log2(1 + CP10K) values, checked.

    genes: when given, `var_names` must be exactly these genes in this order (the model's).
    Raises ScbertError for a missing/unreadable file, NaN/inf values, raw counts, negative values, or other genes.
    """
    import anndata as ad

    if not os.path.isfile(path):
        raise ScbertError(f"data file {path!r} does not exist: check --data_path")
    try:
        adata = ad.read_h5ad(path)
    except Exception as err:  # h5py and anndata raise many types for foreign files
        raise ScbertError(
            f"could not read {path!r} as an .h5ad file ({type(err).__name__}): pass the output of preprocess.py"
        ) from err
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise ScbertError(f"{path!r} holds no cells or no genes ({adata.n_obs} x {adata.n_vars}): check the input")
    if adata.X is None:
        raise ScbertError(f"{path!r} has no expression matrix in X: pass the output of preprocess.py")
    adata.X = check_expression(adata.X, name=repr(path))
    if PREPROCESS_UNS_KEY not in adata.uns:
        print(
            f"warning: {path!r} was not written by preprocess.py; assuming X holds log2(1 + CP10K) values over the "
            "model's genes",
            file=sys.stderr,
        )
    if genes is not None:
        check_gene_order(
            adata.var_names,
            genes,
            data_name=repr(path),
            fix=fix_genes or "run preprocess.py with --ref <checkpoint> so the data use the model's gene list",
        )
    return adata
