"""Training data: the preprocessed input checked against the flags and a checkpoint, datasets, samplers, loaders.

- `load_training_data(args, genes=...)`: the preprocessed `.h5ad` or shard folder (shards.py), checked (written by
  preprocess.py, `--gene_num`, the genes of a checkpoint); `check_gene_num`, `check_checkpoint_genes`;
  `split_indices`.
- `CellDataset`: one cell at a time from the CSR matrix or shard corpus, made into batch entries by the model
  family's vocab.
- `build_loader`: DistributedSampler for training (`BlockShuffleSampler` for shards: deterministic from (seed,
  epoch), resumable, no per-epoch index list), `ShardSampler` (every cell exactly once over the ranks) for
  evaluation, or any sampler given (e.g. `BootstrapSampler`); `ResumableSampler` lets any of them start mid-epoch;
  `set_loader_epoch`; `to_device`, `batch_cells`.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from distributed import DistContext
from models import BinVocab, Vocab
from shards import is_shard_folder, open_corpus
from utils import PREPROCESS_UNS_KEY, ScbertError, check_gene_order, read_preprocessed

__all__ = [
    "BlockShuffleSampler",
    "BootstrapSampler",
    "CellDataset",
    "ResumableSampler",
    "ShardSampler",
    "batch_cells",
    "build_loader",
    "check_checkpoint_genes",
    "check_gene_num",
    "load_training_data",
    "set_loader_epoch",
    "split_indices",
    "to_device",
]


# ---------------------------------------------------------------------------------------------------------------


def check_gene_num(gene_num: int, n_genes: int, data_path: str) -> None:
    """`--gene_num` must equal the data's gene count: the model's sequence length is gene_num + 1."""
    if gene_num != n_genes:
        raise ScbertError(
            f"--gene_num {gene_num} does not match {data_path!r}, which has {n_genes} genes: pass --gene_num "
            f"{n_genes} (or preprocess the data onto the {gene_num}-gene reference list)"
        )


def load_training_data(
    args: argparse.Namespace, *, genes: Sequence[str] | None = None, genes_source: str | None = None
):
    """Read `--data_path` (a preprocess.py output) and check it against the flags and, if given, a gene list.

    genes: the gene list of a checkpoint being resumed or started from; the data's genes must equal it in order.
    A shard folder is opened with memory maps instead (`shards.ShardCorpus`, read like the AnnData: n_obs,
    var_names, obs, X). Returns the AnnData with X as CSR float32. Raises ScbertError when the file was not written
    by preprocess.py, when `--gene_num` differs from its gene count, or when its genes differ from `genes`.
    """
    if not args.data_path:
        raise ScbertError("no input given: pass --data_path <preprocessed .h5ad from preprocess.py>")
    if is_shard_folder(args.data_path):
        return _load_shards(args, genes, genes_source)
    if os.path.isdir(args.data_path):
        raise ScbertError(f"--data_path {args.data_path!r} is a folder without a shard manifest: pass a preprocessed "
                          ".h5ad, or a folder written by preprocess.py --out_format shards")
    if getattr(args, "model_type", "performer") == "transformer":
        # The transformer reads bins (preprocess.py --recipe scgpt); its gene count comes from the data.
        from scgpt_preprocess import read_binned

        fix = f"run preprocess.py --recipe scgpt --ref {genes_source} on the raw counts" if genes_source else None
        adata = read_binned(args.data_path, genes=genes, fix_genes=fix)
        args.gene_num, args.genes = adata.n_vars, [str(g) for g in adata.var_names]
        return adata
    fix = (f"preprocess the data with the gene list of {genes_source} (preprocess.py --ref {genes_source})"
           if genes_source else None)
    adata = read_preprocessed(args.data_path, genes=genes, fix_genes=fix)
    if PREPROCESS_UNS_KEY not in adata.uns:
        raise ScbertError(
            f"{args.data_path!r} was not written by preprocess.py (no uns[{PREPROCESS_UNS_KEY!r}]): run preprocess.py "
            "on the raw counts first, so the genes are aligned to the reference list and the values normalised"
        )
    check_gene_num(args.gene_num, adata.n_vars, args.data_path)
    return adata


def _load_shards(args: argparse.Namespace, genes: Sequence[str] | None, genes_source: str | None):
    """A shard folder (`preprocess.py --out_format shards`) checked like an `.h5ad`: kind, gene order, --gene_num."""
    transformer = getattr(args, "model_type", "performer") == "transformer"
    corpus = open_corpus(args.data_path, kind="scgpt" if transformer else "scbert")
    if genes is not None:
        fix = (f"preprocess the data with the gene list of {genes_source} (preprocess.py --ref {genes_source} "
               "--out_format shards)" if genes_source else "preprocess the data with --ref <checkpoint>")
        check_gene_order(corpus.genes, genes, data_name=repr(args.data_path), fix=fix)
    if transformer:
        args.gene_num, args.genes = corpus.n_vars, list(corpus.genes)
    else:
        check_gene_num(args.gene_num, corpus.n_vars, args.data_path)
    return corpus


def split_indices(
    n: int, test_size: float, seed: int, stratify: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) cell indices from sklearn's train_test_split with random_state=seed (same on every rank)."""
    from sklearn.model_selection import train_test_split

    train, valid = train_test_split(np.arange(n), test_size=test_size, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(valid)


class CellDataset(Dataset):
    """Cells of a CSR matrix, tokenised one at a time (never densifying the whole matrix).

    matrix: (cells, genes) CSR log2(1 + CP10K) values, or a `shards.ShardCorpus` (read through its memory maps, one
    cell at a time). indices: which rows to serve (default all).
    labels: optional integer label per row of `matrix`. vocab: the model family's vocabulary (`model.vocab`), which
    turns a cell's values into its batch entries; default scBERT's bins with `bin_num`.
    Items: the vocab's entries ({"tokens": (genes + 1,) int64} for the Performer), "index": row number in `matrix`,
    "label": int64 (when labels given).
    """

    def __init__(self, matrix: sp.spmatrix, *, bin_num: int = 5, indices: Sequence[int] | None = None,
                 labels: Sequence[int] | np.ndarray | None = None, vocab: Vocab | None = None):
        # A shard corpus (shards.ShardCorpus) is read row by row from its memory maps; anything else becomes CSR.
        self.matrix = matrix if sp.isspmatrix_csr(matrix) or hasattr(matrix, "row") else sp.csr_matrix(matrix)
        self.vocab = vocab if vocab is not None else BinVocab(bin_num=bin_num, gene_num=self.matrix.shape[1])
        self.indices = np.arange(self.matrix.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, Any]:
        row = int(self.indices[item])
        values = np.zeros(self.matrix.shape[1], dtype=np.float32)
        if hasattr(self.matrix, "row"):
            columns, stored = self.matrix.row(row)
            values[columns] = stored
        else:
            start, end = self.matrix.indptr[row], self.matrix.indptr[row + 1]
            values[self.matrix.indices[start:end]] = self.matrix.data[start:end]
        out = {**self.vocab.make_cell(values), "index": row}
        if self.labels is not None:
            out["label"] = int(self.labels[row])
        return out


class ShardSampler(Sampler[int]):
    """Evaluation order: rank r takes positions r, r + world_size, ...: every item exactly once over all ranks."""

    def __init__(self, n: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world_size = n, rank, world_size

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world_size))


class BootstrapSampler(Sampler[int]):
    """Each epoch, ceil(n / world_size) positions drawn with replacement per rank (the reference's sampling).

    Seeded by (seed, epoch, rank) through `set_epoch`, so runs and resumes repeat; every rank has the same count,
    which DDP needs.
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.n, self.rank, self.world_size, self.seed, self.epoch = n, rank, world_size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch * 1009 + self.rank)
        return iter(torch.randint(self.n, (len(self),), generator=generator).tolist())


class BlockShuffleSampler(Sampler[int]):
    """A deterministic, resumable training order for corpora too large for a per-epoch list of every index.

    Each epoch (set by `set_epoch`) the items are cut into blocks of `block_size` consecutive positions (consecutive
    cells of a shard, so reads stay local), the blocks are shuffled, and groups of `buffer_blocks` blocks form
    windows whose cells are shuffled again; every random draw comes from (seed, epoch, window), so every rank and
    every resumed run computes the same order with nothing stored but the position. Rank r takes positions
    r, r + world_size, ... of that order: ceil(n / world_size) items on every rank (the first few items are repeated
    at the end when n is not a multiple, as DistributedSampler does), so every item is seen once per epoch over all
    ranks. Memory: one window of indices and the block order (n / block_size integers).
    `set_start(k)`: skip the first k items of this rank's share (a run resumed mid-epoch).
    """

    def __init__(self, n: int, *, rank: int = 0, world_size: int = 1, seed: int = 0, block_size: int = 256,
                 buffer_blocks: int = 64):
        if n < 1:
            raise ScbertError("no cells to train on: check --data_path")
        self.n, self.rank, self.world_size, self.seed = int(n), int(rank), int(world_size), int(seed)
        self.block_size, self.buffer_blocks = max(1, int(block_size)), max(1, int(buffer_blocks))
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch, self.start = int(epoch), 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    @property
    def per_rank(self) -> int:
        return math.ceil(self.n / self.world_size)

    def __len__(self) -> int:
        return max(0, self.per_rank - self.start)

    def _windows(self) -> tuple[np.ndarray, np.ndarray]:
        """(the shuffled block order, first sequence position of each window and the end)."""
        n_blocks = math.ceil(self.n / self.block_size)
        order = np.random.default_rng([self.seed, self.epoch]).permutation(n_blocks)
        sizes = np.minimum(self.block_size, self.n - order * self.block_size)
        lengths = np.add.reduceat(sizes, np.arange(0, n_blocks, self.buffer_blocks))
        return order, np.concatenate([[0], np.cumsum(lengths)])

    def _window_items(self, order: np.ndarray, w: int) -> np.ndarray:
        blocks = order[w * self.buffer_blocks:(w + 1) * self.buffer_blocks]
        items = np.concatenate([np.arange(b * self.block_size, min((b + 1) * self.block_size, self.n))
                                for b in blocks])
        return np.random.default_rng([self.seed, self.epoch, w + 1]).permutation(items)

    def __iter__(self) -> Iterator[int]:
        order, bounds = self._windows()
        lo = hi = 0
        items = np.zeros(0, dtype=np.int64)
        for k in range(self.start, self.per_rank):
            position = (self.rank + k * self.world_size) % self.n  # wraps only for the padding at the end
            if not lo <= position < hi:
                w = int(np.searchsorted(bounds, position, side="right")) - 1
                items, lo, hi = self._window_items(order, w), int(bounds[w]), int(bounds[w + 1])
            yield int(items[position - lo])


class ResumableSampler(Sampler[int]):
    """Any sampler with `set_start(k)`: the first k items of the current epoch are skipped (a run resumed
    mid-epoch continues at the next unseen batch); `set_epoch` passes through and starts at 0 again."""

    def __init__(self, inner: Sampler[int]):
        self.inner, self.start = inner, 0

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.inner, "set_epoch"):
            self.inner.set_epoch(epoch)
        self.start = 0

    def set_start(self, start: int) -> None:
        self.start = int(start)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.start)

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.inner), self.start, None)


def build_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    ctx: DistContext,
    train: bool,
    seed: int = 0,
    num_workers: int = 0,
    sampler: Sampler | None = None,
) -> DataLoader:
    """A DataLoader over this rank's share of `dataset`.

    train=True: a shuffling DistributedSampler (also for one process; call `set_loader_epoch` each epoch), padded so
    every rank runs the same number of steps; for a shard corpus a `BlockShuffleSampler` (no per-epoch index list).
    Training samplers can skip the first items of an epoch (`set_start`; others are wrapped in `ResumableSampler`).
    train=False: `ShardSampler`, every item exactly once over the ranks,
    in order. sampler: use this one instead (e.g. `BootstrapSampler`); it should give each rank the same length.
    """
    if sampler is None:
        if train and hasattr(getattr(dataset, "matrix", None), "row"):
            sampler = BlockShuffleSampler(len(dataset), rank=ctx.rank, world_size=ctx.world_size, seed=seed)
        elif train:
            sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                         seed=seed, drop_last=False)
        else:
            sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
    if train and not hasattr(sampler, "set_start"):
        sampler = ResumableSampler(sampler)
    # A vocabulary with variable-length cells (the transformer's) pads each batch itself.
    collate = getattr(getattr(dataset, "vocab", None), "collate", None)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, collate_fn=collate,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=num_workers > 0)


def set_loader_epoch(loader: DataLoader, epoch: int, start: int = 0) -> None:
    """Tell the loader's sampler which epoch it is (a new shuffle per epoch, identical on a resumed run) and how
    many of this rank's items of that epoch were already trained on (a run resumed mid-epoch)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)
    if start and hasattr(loader.sampler, "set_start"):
        loader.sampler.set_start(start)


def to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def batch_cells(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(next(iter(batch.values())).shape[0])
    if isinstance(batch, list | tuple):
        return int(batch[0].shape[0])
    return int(batch.shape[0])



def check_checkpoint_genes(
    ckpt_genes: Sequence[str] | None, data_genes: Sequence[str], path: str, *, n_positions: int | None = None
) -> None:
    """A checkpoint's gene list must equal the data's (same genes, same order); reference files carry none, so only
    their length can be checked."""
    if ckpt_genes is None:
        if n_positions is not None and n_positions != len(data_genes):
            raise ScbertError(
                f"{path!r} was trained on {n_positions} genes but the data have {len(data_genes)}: preprocess the "
                "data onto that model's gene list"
            )
        print(f"warning: {path!r} stores no gene list, so the data's gene order cannot be checked against it",
              file=sys.stderr)
        return
    check_gene_order(data_genes, ckpt_genes, data_name="--data_path",
                     fix=f"preprocess the data with --ref {path} so they use the checkpoint's gene list")
