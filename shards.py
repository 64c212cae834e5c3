"""A sharded, pre-tokenised corpus on disk, read through memory maps: the data path of atlas-scale runs.

Why: an in-memory `.h5ad` costs every rank the whole corpus as CSR (about 19 GB per rank at PanglaoDB size). Shards
are read through the page cache (row pointers as `numpy.memmap`, a cell's few KB with `os.pread`), so a node keeps
one copy that all its ranks and loader workers share, and a process holds only the cells it is reading.

Layout of a shard folder (written by `preprocess.py --out_format shards`, `ShardWriter`):

    manifest.json            format, kind, genes and their sha256, cells per shard, value meaning, preprocessing
                             parameters and summary (see `ShardWriter.close`)
    shard_00000.indptr.npy   (cells + 1,) int64 row pointers into the two arrays below
    shard_00000.indices.npy  (nnz,) gene column of each stored value: uint16 while genes < 65,536, else int32
    shard_00000.values.npy   (nnz,) uint8 per-gene value (only non-zero values are stored)
    shard_00000.obs.parquet  the shard's cells' obs table (cell names as index; labels, batches, ...)

`kind` says what the values are, so one format serves both model families:
- "scbert": floor(log2(1 + CP10K)) capped at 255, the expression bin before scBERT's `min(., bin_num)` cap, so the
  Performer's tokens are exactly those of the float values for any `--bin_num` below 255; values whose floor is 0
  are not stored (their token is 0 like an unexpressed gene's). About 3 bytes per stored value.
- "scgpt": the per-cell bins of `preprocess.py --recipe scgpt` (0..n_bins-1) exactly as the `.h5ad` holds them.

- `ShardWriter(folder, genes, kind=..., params=..., cells_per_shard=...)`: `add(block, obs)` row blocks, `close()`;
  written into a temporary folder renamed into place at the end (a killed write leaves nothing under the name).
- `ShardCorpus(folder)`: `n_obs`, `n_vars`, `var_names`, `obs`, `shape`, `row(i) -> (indices, values)`,
  `to_csr(rows)`; behaves like the AnnData the loaders read (`corpus.X` is the corpus itself); `to_anndata(rows)` and
  `blocks(n)` give AnnData row blocks (e.g. for `annotate.annotate`, block by block).
- `is_shard_folder(path)`, `open_corpus(path, kind=..., genes=...)` (checked, with one-sentence errors).
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import shutil
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from utils import ScbertError, atomic_write_bytes

__all__ = ["FORMAT", "KINDS", "ShardCorpus", "ShardWriter", "genes_sha256", "is_shard_folder", "open_corpus"]

FORMAT = "scbert-shards"
VERSION = 1
MANIFEST = "manifest.json"
KINDS = {"scbert": "floor(log2(1 + CP10K)) capped at 255; values below 1 not stored",
         "scgpt": "per-cell quantile bins of preprocess.py --recipe scgpt (0 = not expressed)"}
# 65,536 cells x ~1,000 non-zeros is ~200 MB per shard: large enough for sequential reads, small enough to write in
# one piece and to shuffle at shard-block granularity.
CELLS_PER_SHARD = 65536
# Shards whose files a reader keeps open (two descriptors each), the most recently used.
MAX_OPEN_SHARDS = 64


def genes_sha256(genes: Sequence[str]) -> str:
    """sha256 of the gene names joined by newlines (the same digest `genes.read_panglao_genes` checks)."""
    return hashlib.sha256("\n".join(str(g) for g in genes).encode("utf-8")).hexdigest()


def _shard_name(index: int) -> str:
    return f"shard_{index:05d}"


def to_stored_values(data: np.ndarray, kind: str) -> np.ndarray:
    """Float values of one block -> the uint8 values a shard stores (see the module docstring)."""
    if kind == "scbert":
        return np.clip(np.floor(data), 0, 255).astype(np.uint8)
    if data.size and (data.min() < 0 or data.max() > 255 or not np.all(data == np.round(data))):
        raise ScbertError("scgpt shards hold whole-number bins 0..255: pass the output of preprocess.py --recipe scgpt")
    return data.astype(np.uint8)


class ShardWriter:
    """Writes row blocks of a (cells, genes) matrix into shards of `cells_per_shard` cells, then the manifest.

    kind: "scbert" (log2(1 + CP10K) floats in, bins stored) or "scgpt" (bins in). params/summary: what produced the
    values (recorded in the manifest). Memory is bounded by one shard's arrays plus the block being added.
    """

    def __init__(self, folder: str, genes: Sequence[str], *, kind: str, params: dict[str, Any] | None = None,
                 cells_per_shard: int = CELLS_PER_SHARD):
        if kind not in KINDS:
            raise ScbertError(f"shard kind {kind!r} is not one of {', '.join(KINDS)}")
        self.folder, self.genes, self.kind = folder, [str(g) for g in genes], kind
        self.params, self.cells_per_shard = dict(params or {}), max(1, int(cells_per_shard))
        self.index_dtype = np.uint16 if len(self.genes) < 65536 else np.int32
        parent = os.path.dirname(os.path.abspath(folder))
        os.makedirs(parent, exist_ok=True)
        self.tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(folder))}.tmp{os.getpid()}")
        if os.path.exists(self.tmp):
            shutil.rmtree(self.tmp)
        os.makedirs(self.tmp)
        self.shards: list[dict[str, int]] = []
        self._pending: list[tuple[sp.csr_matrix, pd.DataFrame]] = []
        self._pending_cells = 0

    def add(self, block: sp.spmatrix, obs: pd.DataFrame) -> None:
        """Append cells: block (cells, genes) sparse or dense values; obs one row per cell."""
        block = sp.csr_matrix(block)
        if block.shape[1] != len(self.genes) or block.shape[0] != len(obs):
            raise ScbertError(f"a block of {block.shape} values with {len(obs)} obs rows does not fit "
                              f"{len(self.genes)} genes: pass one obs row per cell and the manifest's genes")
        self._pending.append((block, obs))
        self._pending_cells += block.shape[0]
        while self._pending_cells >= self.cells_per_shard:
            self._flush(self.cells_per_shard)

    def _flush(self, n_cells: int) -> None:
        matrix = sp.vstack([b for b, _ in self._pending], format="csr")
        obs = pd.concat([o for _, o in self._pending])
        head, rest = matrix[:n_cells], matrix[n_cells:]
        self._pending = [(rest, obs.iloc[n_cells:])] if rest.shape[0] else []
        self._pending_cells = rest.shape[0]
        self._write_shard(head, obs.iloc[:n_cells])

    def _write_shard(self, matrix: sp.csr_matrix, obs: pd.DataFrame) -> None:
        matrix.sort_indices()
        values = to_stored_values(matrix.data, self.kind)
        keep = values > 0  # a stored 0 is the same token as an absent value
        row_of = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))[keep]
        indptr = np.zeros(matrix.shape[0] + 1, dtype=np.int64)
        np.cumsum(np.bincount(row_of, minlength=matrix.shape[0]), out=indptr[1:])
        name = _shard_name(len(self.shards))
        base = os.path.join(self.tmp, name)
        np.save(f"{base}.indptr.npy", indptr)
        np.save(f"{base}.indices.npy", matrix.indices[keep].astype(self.index_dtype))
        np.save(f"{base}.values.npy", values[keep])
        obs = obs.copy()
        obs.index = obs.index.astype(str)
        obs.to_parquet(f"{base}.obs.parquet")
        self.shards.append({"name": name, "cells": int(matrix.shape[0]), "nnz": int(keep.sum())})

    def abort(self) -> None:
        """Remove the temporary folder (a failed write leaves nothing behind)."""
        shutil.rmtree(self.tmp, ignore_errors=True)

    def close(self, summary: dict[str, Any] | None = None, *, overwrite: bool = False) -> dict[str, Any]:
        """Write the last shard and the manifest, then move the folder into place. Returns the manifest."""
        if self._pending_cells:
            self._flush(self._pending_cells)
        if not self.shards:
            shutil.rmtree(self.tmp)
            raise ScbertError("no cells to write: check the input and --min_genes")
        manifest = {"format": FORMAT, "version": VERSION, "kind": self.kind, "values": KINDS[self.kind],
                    "n_cells": sum(s["cells"] for s in self.shards), "n_genes": len(self.genes),
                    "nnz": sum(s["nnz"] for s in self.shards), "index_dtype": np.dtype(self.index_dtype).name,
                    "value_dtype": "uint8", "genes_sha256": genes_sha256(self.genes), "genes": self.genes,
                    "params": self.params, "summary": dict(summary or {}), "shards": self.shards}
        atomic_write_bytes(os.path.join(self.tmp, MANIFEST), json.dumps(manifest, indent=1).encode("utf-8"))
        _move_into_place(self.tmp, self.folder, overwrite)
        return manifest


def _move_into_place(tmp: str, folder: str, overwrite: bool) -> None:
    if os.path.exists(folder):
        if not overwrite:
            shutil.rmtree(tmp)
            raise ScbertError(f"{folder} already exists; pass --overwrite True to replace it or choose another "
                              "--out_path")
        old = f"{tmp}.old"
        os.replace(folder, old)  # the new corpus is complete before the old one goes
        os.replace(tmp, folder)
        shutil.rmtree(old)
    else:
        os.replace(tmp, folder)


def is_shard_folder(path: str | None) -> bool:
    return bool(path) and os.path.isdir(path) and os.path.isfile(os.path.join(path, MANIFEST))


class ShardCorpus:
    """A shard folder opened read-only; arrays are memory-mapped on first use in each process (never pickled, so
    DataLoader workers map the files themselves and share the page cache)."""

    def __init__(self, folder: str):
        self.folder = folder
        try:
            with open(os.path.join(folder, MANIFEST), encoding="utf-8") as fh:
                self.manifest = json.load(fh)
        except (OSError, ValueError) as err:
            raise ScbertError(f"could not read {folder}/{MANIFEST} ({err}): pass a folder written by preprocess.py "
                              "--out_format shards") from err
        if self.manifest.get("format") != FORMAT:
            raise ScbertError(f"{folder} is not a shard corpus of this project: rerun preprocess.py --out_format "
                              "shards")
        self.genes = [str(g) for g in self.manifest["genes"]]
        if genes_sha256(self.genes) != self.manifest["genes_sha256"]:
            raise ScbertError(f"{folder}/{MANIFEST} lists genes that do not match its hash: rewrite the corpus")
        self.kind = self.manifest["kind"]
        cells = [int(s["cells"]) for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(cells)]).astype(np.int64)  # first row of each shard
        self._maps: OrderedDict[int, tuple] = OrderedDict()
        self._obs: pd.DataFrame | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_maps": OrderedDict(), "_obs": None}  # each process opens the files itself

    @property
    def n_obs(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_vars(self) -> int:
        return len(self.genes)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n_obs, self.n_vars

    @property
    def var_names(self) -> pd.Index:
        return pd.Index(self.genes, dtype=object)

    @property
    def X(self) -> ShardCorpus:  # noqa: N802 - AnnData's name, so loaders read a corpus like an AnnData
        return self

    @property
    def uns(self) -> dict[str, Any]:
        return {"shards": {"params": self.manifest.get("params", {}), "summary": self.manifest.get("summary", {})}}

    @property
    def obs(self) -> pd.DataFrame:
        """Every cell's obs, read from the shards' tables once (labels of a million cells are a few MB)."""
        if self._obs is None:
            parts = [pd.read_parquet(os.path.join(self.folder, f"{s['name']}.obs.parquet"))
                     for s in self.manifest["shards"]]
            self._obs = pd.concat(parts) if len(parts) > 1 else parts[0]
        return self._obs

    def obs_columns(self) -> list[str]:
        """The obs table's columns, from the first shard's parquet schema (no table read)."""
        import pyarrow.parquet as pq

        schema = pq.read_schema(os.path.join(self.folder, f"{self.manifest['shards'][0]['name']}.obs.parquet"))
        index = {c for c in (schema.pandas_metadata or {}).get("index_columns", []) if isinstance(c, str)}
        return [name for name in schema.names if name not in index]

    def obs_rows(self, start: int, end: int, columns: Sequence[str] | None = None) -> pd.DataFrame:
        """obs of cells start..end - 1 (only `columns`, default all), read from the shards holding them: what a
        reader of a block needs, without the whole table in memory."""
        if self._obs is not None:
            return self._obs.iloc[start:end] if columns is None else self._obs.iloc[start:end][list(columns)]
        parts, first = [], start
        while first < end:
            k = int(np.searchsorted(self.offsets, first, side="right")) - 1
            stop = min(end, int(self.offsets[k + 1]))
            path = os.path.join(self.folder, f"{self.manifest['shards'][k]['name']}.obs.parquet")
            table = pd.read_parquet(path, columns=None if columns is None else list(columns))
            parts.append(table.iloc[first - int(self.offsets[k]):stop - int(self.offsets[k])])
            first = stop
        return pd.concat(parts) if len(parts) > 1 else parts[0] if parts else pd.DataFrame()

    def _shard(self, k: int) -> tuple[np.ndarray, tuple[int, int, np.dtype], tuple[int, int, np.dtype]]:
        """Shard k's row pointers (memory-mapped) and, for its gene indices and values, (file descriptor, data
        offset, dtype). The most recently used MAX_OPEN_SHARDS shards stay open."""
        if k in self._maps:
            self._maps.move_to_end(k)
            return self._maps[k]
        base = os.path.join(self.folder, self.manifest["shards"][k]["name"])
        indptr = np.load(f"{base}.indptr.npy", mmap_mode="r")
        _advise(indptr, "MADV_RANDOM")
        self._maps[k] = (indptr, _open_array(f"{base}.indices.npy"), _open_array(f"{base}.values.npy"))
        if len(self._maps) > MAX_OPEN_SHARDS:
            _, (_, (fd_i, _, _), (fd_v, _, _)) = self._maps.popitem(last=False)
            os.close(fd_i)
            os.close(fd_v)
        return self._maps[k]

    def row(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """Cell i's stored genes (int64 column indices, ascending) and values (float32).

        The row pointers are memory-mapped; a cell's indices and values (a few KB) are read with `os.pread` from
        the same page cache: a memory-mapped payload would count whole page-cache folios (hundreds of KB per
        touched cell here) as each rank's resident memory, growing with how much of the corpus it has read."""
        k = int(np.searchsorted(self.offsets, i, side="right")) - 1
        indptr, indices, values = self._shard(k)
        local = i - int(self.offsets[k])
        start, end = int(indptr[local]), int(indptr[local + 1])
        return _read_range(indices, start, end).astype(np.int64), _read_range(values, start, end).astype(np.float32)

    def to_csr(self, rows: Sequence[int] | None = None) -> sp.csr_matrix:
        """(len(rows), genes) CSR float32 of the given cells (default all: only for small corpora and tests)."""
        rows = range(self.n_obs) if rows is None else rows
        if isinstance(rows, range) and rows.step == 1:
            return self._range_csr(max(rows.start, 0), min(rows.stop, self.n_obs))
        entries = [self.row(int(i)) for i in rows]
        indptr = np.concatenate([[0], np.cumsum([len(c) for c, _ in entries])]).astype(np.int64)
        cols = np.concatenate([c for c, _ in entries]) if entries else np.zeros(0, np.int64)
        vals = np.concatenate([v for _, v in entries]) if entries else np.zeros(0, np.float32)
        return sp.csr_matrix((vals, cols, indptr), shape=(len(entries), self.n_vars))


    def _range_csr(self, start: int, end: int) -> sp.csr_matrix:
        """Cells start..end - 1 as CSR float32: per shard one read of its gene indices and one of its values."""
        pointers, cols, vals, base = [np.zeros(1, np.int64)], [], [], 0
        while start < end:
            k = int(np.searchsorted(self.offsets, start, side="right")) - 1
            stop = min(end, int(self.offsets[k + 1]))
            indptr, indices, values = self._shard(k)
            a, b = start - int(self.offsets[k]), stop - int(self.offsets[k])
            first, last = int(indptr[a]), int(indptr[b])
            pointers.append(np.asarray(indptr[a + 1:b + 1], dtype=np.int64) - first + base)
            cols.append(_read_range(indices, first, last).astype(np.int64))
            vals.append(_read_range(values, first, last).astype(np.float32))
            base += last - first
            start = stop
        indptr = np.concatenate(pointers)
        cols = np.concatenate(cols) if cols else np.zeros(0, np.int64)
        vals = np.concatenate(vals) if vals else np.zeros(0, np.float32)
        return sp.csr_matrix((vals, cols, indptr), shape=(len(indptr) - 1, self.n_vars))

    def to_anndata(self, rows: Sequence[int] | range):
        """An AnnData of the given cells (X: their stored values as CSR float32, obs, var = the genes), e.g. a block
        of rows to pass to `annotate.annotate`: for scBERT's kind the tokens are those of the original values."""
        import anndata as ad

        X = self.to_csr(rows)
        rows = np.asarray(list(rows) if isinstance(rows, range) else rows, dtype=np.int64)
        return ad.AnnData(X=X, obs=self.obs.iloc[rows].copy(),
                          var=pd.DataFrame(index=self.var_names))

    def blocks(self, block_cells: int = CELLS_PER_SHARD):
        """(start, AnnData of cells start..start + block_cells - 1) over the corpus: prediction in row blocks."""
        for start in range(0, self.n_obs, block_cells):
            yield start, self.to_anndata(range(start, min(start + block_cells, self.n_obs)))


def _open_array(path: str) -> tuple[int, int, np.dtype]:
    """(read-only file descriptor, byte offset of the data, dtype) of a 1-d `.npy` file."""
    with open(path, "rb") as fh:
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        _, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if fortran:
        raise ScbertError(f"{path} is not a shard array written by this project: rewrite the corpus")
    return os.open(path, os.O_RDONLY), offset, np.dtype(dtype)


def _read_range(array: tuple[int, int, np.dtype], start: int, end: int) -> np.ndarray:
    fd, offset, dtype = array
    data = os.pread(fd, (end - start) * dtype.itemsize, offset + start * dtype.itemsize)
    return np.frombuffer(data, dtype=dtype)


def _advise(array: np.ndarray, advice: str) -> None:
    """madvise on a memory-mapped array's mapping, where the platform has it (Linux, macOS)."""
    mapping = getattr(array, "_mmap", None)
    flag = getattr(mmap, advice, None)
    if mapping is not None and flag is not None and hasattr(mapping, "madvise"):
        mapping.madvise(flag)


def open_corpus(path: str, *, kind: str | None = None) -> ShardCorpus:
    """Open a shard folder; with `kind`, refuse a corpus made for the other model family."""
    if not is_shard_folder(path):
        raise ScbertError(f"{path!r} is not a shard folder (no {MANIFEST}): pass a folder written by preprocess.py "
                          "--out_format shards")
    corpus = ShardCorpus(path)
    if kind is not None and corpus.kind != kind:
        recipe = "--recipe scgpt " if kind == "scgpt" else ""
        raise ScbertError(f"{path!r} holds {corpus.kind} values but this model reads {kind} values: rerun "
                          f"preprocess.py {recipe}--out_format shards on the raw counts")
    if corpus.n_obs == 0:
        raise ScbertError(f"{path!r} holds no cells: rerun preprocess.py on the raw counts")
    return corpus
