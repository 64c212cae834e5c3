"""Training plumbing shared by `pretrain.py` and `finetune.py`: flags, processes, data, schedule, loops, checkpoints.

Everything here is generic: the scripts bring their own loss (a `loss_fn(model, batch) -> (loss, stats)` callback)
and their own evaluation step; this module runs them the same way as plain `python`, under `torchrun` or under the
legacy `python -m torch.distributed.launch`, on CPU (gloo) or GPU (NCCL).

Public API, in the order a script uses it:

- `get_common_parser()`: the shared flags with the published defaults (a parent parser, `add_help=False`);
  `resolve_log_path(args)`.
- `setup_distributed(args)` -> `DistContext` (rank, local_rank, world_size, device, distributed, is_main);
  `cleanup_distributed`, `barrier`, `reduce_sum`, `reduce_mean`, `gather_tensors`; `print0` prints on rank 0 only.
- `seed_everything(seed, rank)`: seed + rank for masking and dropout (SPEC section 7); data splits use the base seed
  on every rank (`split_indices`).
- `load_training_data(args, genes=...)`: the preprocessed `.h5ad`, checked (written by preprocess.py, `--gene_num`,
  the genes of a checkpoint); `check_gene_num`, `check_checkpoint_genes`.
- `CellDataset` (one cell tokenised at a time from the CSR matrix, optional labels), `build_loader`
  (DistributedSampler for training, `ShardSampler` (every cell exactly once over the ranks) for evaluation, or any
  sampler given, e.g. `BootstrapSampler`), `set_loader_epoch`.
- `build_model_from_args(args, genes, checkpoint_path=..., head=...)`, `check_model_flags`, `wrap_model` (DDP when
  distributed), `unwrap_model`.
- `CosineAnnealingWarmupRestarts` (SPEC section 6; the pure `cosine_warmup_restarts_lr`), `Amp` (`--amp`).
- `train_one_epoch(...)` (raises `NonFiniteLossError`), `evaluate(...)`.
- `epoch_checkpoint_path`, `named_checkpoint_path`, `save_training_checkpoint` (called on every rank; rank 0 writes
  atomically), `find_latest_checkpoint`, `resolve_resume`, `restore_training_state`.
- `JsonlLogger`: one JSON line per epoch, rank 0 only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler

from performer_pytorch import PerformerLM, build_model, checkpoint_payload, load_checkpoint, save_checkpoint
from performer_pytorch.checkpoint import CheckpointError, read_checkpoint_file
from performer_pytorch.cpu_threads import configure_threads
from utils import PREPROCESS_UNS_KEY, ScbertError, check_gene_order, read_preprocessed, str2bool, tokenize

__all__ = [
    "Amp",
    "BootstrapSampler",
    "CellDataset",
    "CosineAnnealingWarmupRestarts",
    "DistContext",
    "JsonlLogger",
    "NonFiniteLossError",
    "ShardSampler",
    "barrier",
    "build_loader",
    "build_model_from_args",
    "check_checkpoint_genes",
    "check_gene_num",
    "check_model_flags",
    "cleanup_distributed",
    "cosine_warmup_restarts_lr",
    "epoch_checkpoint_path",
    "evaluate",
    "find_latest_checkpoint",
    "gather_tensors",
    "get_common_parser",
    "load_training_data",
    "named_checkpoint_path",
    "print0",
    "reduce_mean",
    "reduce_sum",
    "resolve_log_path",
    "resolve_resume",
    "restore_training_state",
    "save_training_checkpoint",
    "seed_everything",
    "set_loader_epoch",
    "setup_distributed",
    "split_indices",
    "train_one_epoch",
    "unwrap_model",
    "wrap_model",
]


# ---------------------------------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------------------------------


def get_common_parser() -> argparse.ArgumentParser:
    """The flags pretrain.py and finetune.py share, with the published defaults (a parent parser: `add_help=False`).

    Each script adds its own flags and sets its own `--model_name` default with `parser.set_defaults(...)`.
    `--resume` defaults to None, meaning "automatic": continue from the last complete epoch checkpoint of this
    `--model_name` in `--ckpt_dir` when there is one (so rerunning the same command resumes), start fresh otherwise;
    see `resolve_resume`.
    """
    parser = argparse.ArgumentParser(add_help=False)
    data = parser.add_argument_group("data")
    data.add_argument("--data_path", type=str, default=None,
                      help="preprocessed .h5ad written by preprocess.py (CSR log2(1 + CP10K) over the model's genes)")
    data.add_argument("--bin_num", type=int, default=5,
                      help="expression bins: token = min(floor(v), bin_num); the mask/pad token is bin_num + 1 "
                           "(published: 5 and 6)")
    data.add_argument("--gene_num", type=int, default=16906,
                      help="genes per cell; must equal the data's gene count (16906 for the published PanglaoDB list)")
    data.add_argument("--num_workers", type=int, default=0,
                      help="DataLoader worker processes per rank; tokenising is cheap, so 0-2 is usually enough")

    run = parser.add_argument_group("run")
    run.add_argument("--ckpt_dir", type=str, default="./ckpts/",
                     help="folder for <model_name>_<epoch>.pth checkpoints and the JSONL log")
    run.add_argument("--model_name", type=str, default=None,
                     help="prefix of checkpoint and log files; a different name starts a separate run")
    run.add_argument("--epoch", type=int, default=100, help="number of epochs (the published runs use 100)")
    run.add_argument("--seed", type=int, default=2021,
                     help="base seed: data splits use it on every rank, masking and dropout use seed + rank")
    run.add_argument("--batch_size", type=int, default=3,
                     help="cells per rank per step (3 fits a full-size model on one GPU); raise it for small models")
    run.add_argument("--learning_rate", type=float, default=1e-4,
                     help="peak learning rate of the warm-up/cosine schedule (the schedule starts at 1e-6)")
    run.add_argument("--grad_acc", type=int, default=60,
                     help="steps of gradient accumulation per optimiser step (effective batch = batch_size * "
                          "grad_acc * ranks); use 1-4 for small data")
    run.add_argument("--valid_every", type=int, default=1, help="validate every this many epochs")
    run.add_argument("--resume", type=str2bool, default=None,
                     help="True: continue from the last complete epoch checkpoint of --model_name in --ckpt_dir; "
                          "False: start fresh (refused if such checkpoints exist, so none is overwritten); "
                          "default: resume when one exists, so rerunning the same command continues the run")
    run.add_argument("--log_path", type=str, default=None,
                     help="JSONL file, one line per epoch (default: <ckpt_dir>/<model_name>_log.jsonl)")

    model = parser.add_argument_group("model")
    model.add_argument("--pos_embed", type=str2bool, default=True,
                       help="add gene2vec positional embeddings (True needs --gene2vec_path or a checkpoint that "
                            "holds the table)")
    model.add_argument("--gene2vec_path", type=str, default=None,
                       help=".npy of (gene_num, dim) gene2vec rows in the data's gene order (from gene2vec.py)")
    model.add_argument("--dim", type=int, default=200, help="embedding width (200 = gene2vec size in the paper)")
    model.add_argument("--depth", type=int, default=6, help="Performer blocks (6 in the paper)")
    model.add_argument("--heads", type=int, default=10, help="attention heads (10 in the paper)")
    model.add_argument("--dim_head", type=int, default=64,
                       help="width per attention head (64 in the paper); smaller values make tiny test models")

    system = parser.add_argument_group("system")
    system.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when available (NCCL between ranks), else CPU (gloo)")
    system.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none",
                        help="mixed precision: bf16 autocast (CPU or GPU; about 2x faster on CPU) or fp16 with a "
                             "gradient scaler (GPU only)")
    system.add_argument("--local_rank", "--local-rank", dest="local_rank", type=int, default=None,
                        help="set by the legacy torch.distributed.launch; the LOCAL_RANK variable wins when present")
    return parser


def resolve_log_path(args: argparse.Namespace) -> str:
    """`--log_path`, or `<ckpt_dir>/<model_name>_log.jsonl` when not given."""
    return args.log_path or os.path.join(args.ckpt_dir, f"{args.model_name}_log.jsonl")


# ---------------------------------------------------------------------------------------------------------------
# Processes
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class DistContext:
    """Where this process stands: rank among world_size processes, its device, whether it prints and writes."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    distributed: bool = False
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ScbertError("--device cuda was asked for but PyTorch sees no CUDA GPU: pass --device cpu")
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def setup_distributed(args: argparse.Namespace | None = None, device: str | None = None) -> DistContext:
    """Join the process group when a launcher started us, else run as one plain process.

    A launcher (torchrun, or `python -m torch.distributed.launch`, which in torch 2.x passes `--local-rank=N` and
    sets the variables too) sets RANK and WORLD_SIZE; LOCAL_RANK is read first, `--local_rank` second. The backend is
    NCCL on CUDA and gloo on CPU.
    """
    device_name = device or (getattr(args, "device", None) if args is not None else None) or "auto"
    env_local = os.environ.get("LOCAL_RANK")
    arg_local = getattr(args, "local_rank", None) if args is not None else None
    local_rank = int(env_local) if env_local is not None else int(arg_local or 0)
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    if not launched:
        return DistContext(local_rank=local_rank, device=_pick_device(device_name, local_rank))
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch_device = _pick_device(device_name, local_rank)
    backend = "nccl" if torch_device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": torch_device} if torch_device.type == "cuda" else {}
        dist.init_process_group(backend=backend, rank=rank, world_size=world_size, **kwargs)
    return DistContext(rank=rank, local_rank=local_rank, world_size=world_size, device=torch_device,
                       distributed=True, backend=backend)


def cleanup_distributed(ctx: DistContext) -> None:
    """Leave the process group (a no-op for one plain process)."""
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    """Wait for every rank (a no-op for one plain process)."""
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.device.index])
        else:
            dist.barrier()


def reduce_sum(values: dict[str, float] | torch.Tensor, ctx: DistContext):
    """Sum numbers over ranks: a dict of floats/0-dim tensors -> dict of floats, or a tensor -> a tensor."""
    if isinstance(values, torch.Tensor):
        tensor = values.detach().to(ctx.device, torch.float64).clone()
        if ctx.distributed:
            dist.all_reduce(tensor)
        return tensor
    keys = sorted(values)
    if not keys:
        return {}
    tensor = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=ctx.device)
    if ctx.distributed:
        dist.all_reduce(tensor)
    return dict(zip(keys, tensor.tolist(), strict=True))


def reduce_mean(values: dict[str, float] | torch.Tensor, ctx: DistContext):
    """Mean over ranks of numbers (each rank weighs the same)."""
    summed = reduce_sum(values, ctx)
    if isinstance(summed, torch.Tensor):
        return summed / ctx.world_size
    return {k: v / ctx.world_size for k, v in summed.items()}


def gather_tensors(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Concatenate along dim 0 the tensors of all ranks (lengths may differ), in rank order; returned on CPU."""
    if not ctx.distributed:
        return tensor.detach().cpu()
    local = tensor.detach().to(ctx.device)
    length = torch.tensor([local.shape[0]], device=ctx.device)
    lengths = [torch.zeros_like(length) for _ in range(ctx.world_size)]
    dist.all_gather(lengths, length)
    longest = int(max(int(n) for n in lengths))
    padded = torch.zeros((longest, *local.shape[1:]), dtype=local.dtype, device=ctx.device)
    padded[: local.shape[0]] = local
    parts = [torch.zeros_like(padded) for _ in range(ctx.world_size)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(n)].cpu() for part, n in zip(parts, lengths, strict=True)])


def print0(*values: Any, ctx: DistContext | None = None, **kwargs: Any) -> None:
    """print() on rank 0 only (ctx None: read RANK from the environment); flushed so logs interleave sanely."""
    rank = ctx.rank if ctx is not None else int(os.environ.get("RANK", "0"))
    if rank == 0:
        kwargs.setdefault("flush", True)
        print(*values, **kwargs)


def seed_everything(seed: int, rank: int = 0) -> None:
    """Seed python, numpy and torch (CPU and CUDA) with seed + rank, so ranks mask and drop out differently."""
    value = int(seed) + int(rank)
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def rng_state() -> dict[str, Any]:
    """This process's random states as tensors and plain values (loadable with weights_only=True)."""
    np_state = np.random.get_state()
    return {
        "python": [list(item) if isinstance(item, tuple) else item for item in random.getstate()],
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["key"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _gather_rng_states(ctx: DistContext) -> list[dict[str, Any]]:
    """Every rank's random state, on every rank (collective)."""
    mine = rng_state()
    if not ctx.distributed:
        return [mine]
    states: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(states, mine)
    return states


# ---------------------------------------------------------------------------------------------------------------
# Data
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
    Returns the AnnData with X as CSR float32. Raises ScbertError when the file was not written by preprocess.py,
    when `--gene_num` differs from its gene count, or when its genes differ from `genes`.
    """
    if not args.data_path:
        raise ScbertError("no input given: pass --data_path <preprocessed .h5ad from preprocess.py>")
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


def split_indices(
    n: int, test_size: float, seed: int, stratify: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, valid) cell indices from sklearn's train_test_split with random_state=seed (same on every rank)."""
    from sklearn.model_selection import train_test_split

    train, valid = train_test_split(np.arange(n), test_size=test_size, random_state=seed, stratify=stratify)
    return np.sort(train), np.sort(valid)


class CellDataset(Dataset):
    """Cells of a CSR matrix, tokenised one at a time (never densifying the whole matrix).

    matrix: (cells, genes) CSR log2(1 + CP10K) values. indices: which rows to serve (default all).
    labels: optional integer label per row of `matrix`.
    Items: {"tokens": (genes + 1,) int64, "index": row number in `matrix`, "label": int64 (when labels given)}.
    """

    def __init__(self, matrix: sp.spmatrix, *, bin_num: int = 5, indices: Sequence[int] | None = None,
                 labels: Sequence[int] | np.ndarray | None = None):
        self.matrix = matrix if sp.isspmatrix_csr(matrix) else sp.csr_matrix(matrix)
        self.bin_num = bin_num
        self.indices = np.arange(self.matrix.shape[0]) if indices is None else np.asarray(indices, dtype=np.int64)
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict[str, Any]:
        row = int(self.indices[item])
        start, end = self.matrix.indptr[row], self.matrix.indptr[row + 1]
        values = np.zeros(self.matrix.shape[1], dtype=np.float32)
        values[self.matrix.indices[start:end]] = self.matrix.data[start:end]
        out = {"tokens": tokenize(values, self.bin_num), "index": row}
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
    every rank runs the same number of steps. train=False: `ShardSampler`, every item exactly once over the ranks,
    in order. sampler: use this one instead (e.g. `BootstrapSampler`); it should give each rank the same length.
    """
    if sampler is None:
        if train:
            sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                         seed=seed, drop_last=False)
        else:
            sampler = ShardSampler(len(dataset), ctx.rank, ctx.world_size)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                      pin_memory=ctx.device.type == "cuda", persistent_workers=num_workers > 0)


def set_loader_epoch(loader: DataLoader, epoch: int) -> None:
    """Tell the loader's sampler which epoch it is (a new shuffle per epoch, identical on a resumed run)."""
    if hasattr(loader.sampler, "set_epoch"):
        loader.sampler.set_epoch(epoch)


def _to_device(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _batch_cells(batch: Any) -> int:
    if isinstance(batch, dict):
        return int(next(iter(batch.values())).shape[0])
    if isinstance(batch, list | tuple):
        return int(batch[0].shape[0])
    return int(batch.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------


def build_model_from_args(
    args: argparse.Namespace,
    genes: Sequence[str],
    *,
    checkpoint_path: str | None = None,
    head: str = "lm",
) -> PerformerLM:
    """A PerformerLM from the flags, or from a starting checkpoint.

    From flags: num_tokens = bin_num + 2, max_seq_len = gene_num + 1, dim/depth/heads/dim_head, gene2vec from
    `--gene2vec_path` when `--pos_embed True`; head "lm" builds the pretraining head, "none" leaves `to_out` None.
    From a checkpoint: its stored architecture and weights (`load_checkpoint` + `build_model(head=...)`, where head is
    "lm", "none" or "checkpoint"); its gene list must equal `genes`.
    """
    check_gene_num(args.gene_num, len(genes), args.data_path or "the data")
    if checkpoint_path is not None:
        ckpt = load_checkpoint(checkpoint_path)
        check_checkpoint_genes(ckpt.genes, genes, checkpoint_path, n_positions=ckpt.config["max_seq_len"] - 1)
        if ckpt.config["num_tokens"] != args.bin_num + 2:
            raise ScbertError(
                f"{checkpoint_path!r} was trained with {ckpt.config['num_tokens'] - 2} bins but --bin_num is "
                f"{args.bin_num}: pass --bin_num {ckpt.config['num_tokens'] - 2}"
            )
        return build_model(ckpt, head=head)
    if args.pos_embed and not args.gene2vec_path:
        raise ScbertError(
            "--pos_embed True needs gene2vec rows: pass --gene2vec_path <.npy from gene2vec.py> (one row per gene of "
            "the data, width --dim), or --pos_embed False to train without them"
        )
    if args.gene2vec_path and args.pos_embed and not os.path.isfile(args.gene2vec_path):
        raise ScbertError(f"gene2vec file {args.gene2vec_path!r} does not exist: check --gene2vec_path")
    return PerformerLM(
        num_tokens=args.bin_num + 2,
        max_seq_len=args.gene_num + 1,
        dim=args.dim,
        depth=args.depth,
        heads=args.heads,
        dim_head=args.dim_head,
        g2v_position_emb=args.pos_embed,
        gene2vec=args.gene2vec_path if args.pos_embed else None,
        lm_head=head == "lm",
    )


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


def check_model_flags(args: argparse.Namespace, config: dict[str, Any], path: str) -> None:
    """The model-size flags must describe the checkpoint being resumed (rerunning the same command does)."""
    wanted = {"dim": args.dim, "depth": args.depth, "heads": args.heads, "dim_head": args.dim_head,
              "g2v_position_emb": args.pos_embed, "num_tokens": args.bin_num + 2, "max_seq_len": args.gene_num + 1}
    flag = {"g2v_position_emb": "--pos_embed", "num_tokens": "--bin_num (+2)", "max_seq_len": "--gene_num (+1)"}
    differing = [k for k, v in wanted.items() if k in config and config[k] != v]
    if differing:
        detail = ", ".join(f"{flag.get(k, '--' + k)} {wanted[k]} vs {config[k]}" for k in differing)
        raise ScbertError(
            f"the flags differ from the run saved in {path!r} ({detail}): rerun with that run's flags to resume it, "
            "or pass another --model_name or --ckpt_dir to start a separate run"
        )


def wrap_model(
    model: torch.nn.Module, ctx: DistContext, *, seed: int | None = None, **ddp_kwargs: Any
) -> torch.nn.Module:
    """Move to the device, set the CPU thread count for its size (`cpu_threads`); with `seed`, draw projection
    redraws from (seed, redraw count), the same on every rank; wrap in DistributedDataParallel when distributed (DDP
    kwargs passed through)."""
    model = model.to(ctx.device)
    if seed is not None and hasattr(model, "set_redraw_seed"):
        model.set_redraw_seed(seed)
    configure_threads(model, ctx.device)
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=device_ids, **ddp_kwargs)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------------------------
# Learning-rate schedule (SPEC section 6)
# ---------------------------------------------------------------------------------------------------------------


def cosine_warmup_restarts_lr(
    step: int,
    *,
    first_cycle_steps: int = 15,
    cycle_mult: float = 2.0,
    max_lr: float = 1e-4,
    min_lr: float = 1e-6,
    warmup_steps: int = 5,
    gamma: float = 0.9,
) -> float:
    """Learning rate after `step` scheduler steps (step 0 = the first epoch).

    Each cycle: linear warm-up from min_lr to the cycle's max over `warmup_steps`, then a half cosine down towards
    min_lr over the rest of the cycle. After a cycle, its length becomes (length - warmup) * cycle_mult + warmup and
    the max is multiplied by gamma. With the defaults: cycles of 15, 25, 45, 85 steps.
    """
    cycle, position, length = 0, step, first_cycle_steps
    while position >= length:
        position -= length
        cycle += 1
        length = int((length - warmup_steps) * cycle_mult) + warmup_steps
    peak = max_lr * gamma**cycle
    if position < warmup_steps:
        return min_lr + (peak - min_lr) * position / warmup_steps
    progress = (position - warmup_steps) / (length - warmup_steps)
    return min_lr + (peak - min_lr) * (1 + math.cos(math.pi * progress)) / 2


class CosineAnnealingWarmupRestarts:
    """scBERT's schedule, stepped once per epoch: construction sets the first epoch's rate (min_lr), each `step()`
    moves to the next epoch. Values for lr 1e-4 are in SPEC section 6 (1e-6, 2.08e-5, ..., 1e-4 at epoch 6).
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        first_cycle_steps: int = 15,
        cycle_mult: float = 2.0,
        max_lr: float = 1e-4,
        min_lr: float = 1e-6,
        warmup_steps: int = 5,
        gamma: float = 0.9,
    ):
        if warmup_steps >= first_cycle_steps:
            raise ValueError(f"warmup_steps ({warmup_steps}) must be below first_cycle_steps ({first_cycle_steps})")
        self.optimizer = optimizer
        self.params = dict(first_cycle_steps=first_cycle_steps, cycle_mult=cycle_mult, max_lr=max_lr,
                           min_lr=min_lr, warmup_steps=warmup_steps, gamma=gamma)
        self.last_epoch = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        return cosine_warmup_restarts_lr(step, **self.params)

    def _apply(self) -> None:
        lr = self.lr_at(self.last_epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self._last_lr = [lr for _ in self.optimizer.param_groups]

    def step(self) -> None:
        self.last_epoch += 1
        self._apply()

    def get_last_lr(self) -> list[float]:
        return list(self._last_lr)

    def state_dict(self) -> dict[str, Any]:
        return {"last_epoch": self.last_epoch, **self.params}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.params = {k: state.get(k, v) for k, v in self.params.items()}
        self.last_epoch = int(state["last_epoch"])
        self._apply()


# ---------------------------------------------------------------------------------------------------------------
# Mixed precision
# ---------------------------------------------------------------------------------------------------------------


class Amp:
    """`--amp`: none; bf16 autocast (CPU or CUDA); fp16 autocast with a GradScaler (CUDA only).

    Use `with amp.autocast(): loss = ...`, then `amp.backward(loss)` and, on an optimiser step,
    `amp.step(optimizer, parameters, clip_norm)`.
    """

    def __init__(self, mode: str, device: torch.device):
        if mode not in {"none", "bf16", "fp16"}:
            raise ScbertError(f"--amp {mode!r} is not one of none, bf16, fp16")
        if mode == "fp16" and device.type != "cuda":
            raise ScbertError("--amp fp16 needs a CUDA GPU (float16 with a gradient scaler): use --amp bf16 on CPU")
        self.mode, self.device = mode, device
        self.scaler = torch.amp.GradScaler("cuda") if mode == "fp16" else None

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.mode == "none":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.mode == "bf16" else torch.float16
        return torch.autocast(device_type=self.device.type, dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self, optimizer: torch.optim.Optimizer, parameters: Sequence[torch.Tensor], clip_norm: float | None):
        """Unscale, clip to `clip_norm`, step; returns the gradient norm before clipping.

        Without a scaler, a non-finite norm skips the step (the caller stops the run); with fp16's scaler, the
        scaler skips it and lowers its scale, as overflow is expected there now and then.
        """
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)
        norm = (torch.nn.utils.clip_grad_norm_(parameters, clip_norm) if clip_norm is not None
                else torch.tensor(0.0))
        if self.scaler is not None:
            self.scaler.step(optimizer)
            self.scaler.update()
        elif bool(torch.isfinite(norm)):
            optimizer.step()
        return norm

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict() if self.scaler is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.scaler is not None and state:
            self.scaler.load_state_dict(state)


# ---------------------------------------------------------------------------------------------------------------
# Loops
# ---------------------------------------------------------------------------------------------------------------


class NonFiniteLossError(ScbertError):
    """The loss (or the gradient norm) became NaN or infinite: training stops, earlier checkpoints are kept."""


def _accumulate(totals: dict[str, Any], stats: dict[str, Any]) -> None:
    for key, value in stats.items():
        value = value.detach().double() if isinstance(value, torch.Tensor) else float(value)
        totals[key] = totals.get(key, 0.0) + value


def train_one_epoch(
    model: torch.nn.Module,
    loader: DataLoader,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.nn.Module, Any], tuple[torch.Tensor, dict[str, Any]]],
    *,
    ctx: DistContext,
    epoch: int,
    grad_acc: int = 1,
    clip_norm: float | None = None,
    divide_by_grad_acc: bool = True,
    amp: Amp | None = None,
    last_good: str | None = None,
    desc: str = "train",
) -> dict[str, float]:
    """One pass over `loader` with gradient accumulation; returns metrics summed/averaged over all ranks.

    loss_fn(model, batch) -> (loss, stats): batch is already on ctx.device and the call runs under autocast; loss is
    a scalar mean over the batch; stats are additive numbers (floats or 0-dim tensors), summed over steps and ranks.
    Every `grad_acc` micro-steps (and at the end of the epoch, for a partial accumulation) the gradients are
    all-reduced (DDP `no_sync()` on the other micro-steps), clipped to `clip_norm`, stepped and zeroed. With
    `divide_by_grad_acc`, each micro-step's loss is divided by grad_acc before backward.
    A non-finite loss or gradient norm raises `NonFiniteLossError` (on every rank together), naming the epoch and step
    and `last_good`, the checkpoint that is kept.
    Returns {"loss": mean loss per step, "cells": cells seen (all ranks), "steps", "time", "cells_per_s",
    **summed stats}.
    """
    from tqdm import tqdm

    amp = amp or Amp("none", ctx.device)
    grad_acc = max(1, int(grad_acc))
    parameters = [p for p in model.parameters() if p.requires_grad]
    model.train()
    optimizer.zero_grad(set_to_none=True)
    n_steps = len(loader)
    totals: dict[str, Any] = {}
    loss_sum = torch.zeros((), dtype=torch.float64, device=ctx.device)
    cells = 0
    bad_step: int | None = None
    start = time.perf_counter()
    bar = tqdm(total=n_steps, desc=f"epoch {epoch} {desc}", disable=not ctx.is_main, dynamic_ncols=True,
               mininterval=1.0, leave=False, file=sys.stderr)
    keep = f"; the last good checkpoint {last_good!r} is kept" if last_good else "; earlier checkpoints are kept"
    hint = "lower --learning_rate, or use --amp none if mixed precision is on"
    try:
        for step, batch in enumerate(loader):
            batch = _to_device(batch, ctx.device)
            sync_now = (step + 1) % grad_acc == 0 or step + 1 == n_steps
            no_sync = ctx.distributed and not sync_now and hasattr(model, "no_sync")
            with model.no_sync() if no_sync else contextlib.nullcontext():
                with amp.autocast():
                    loss, stats = loss_fn(model, batch)
                finite = bool(torch.isfinite(loss.detach()))
                if not finite and bad_step is None:
                    bad_step = step + 1
                if sync_now and ctx.distributed:
                    # Agree before the all-reducing backward, so every rank stops together instead of hanging.
                    flag = torch.tensor([0 if bad_step is None else 1], device=ctx.device)
                    dist.all_reduce(flag)
                    if int(flag) and bad_step is None:
                        bad_step = step + 1
                if bad_step is not None and (sync_now or not ctx.distributed):
                    raise NonFiniteLossError(
                        f"the training loss became non-finite at epoch {epoch}, step {bad_step}; the run stopped"
                        f"{keep}: {hint}"
                    )
                if finite:
                    amp.backward(loss / grad_acc if divide_by_grad_acc else loss)
            if sync_now:
                norm = amp.step(optimizer, parameters, clip_norm)
                optimizer.zero_grad(set_to_none=True)
                if amp.scaler is None and clip_norm is not None and not bool(torch.isfinite(norm)):
                    raise NonFiniteLossError(
                        f"the gradient norm became non-finite at epoch {epoch}, step {step + 1}; the run stopped"
                        f"{keep}: {hint}"
                    )
            n = _batch_cells(batch)
            cells += n
            loss_sum += loss.detach().double()
            _accumulate(totals, stats)
            if ctx.is_main:
                elapsed = time.perf_counter() - start
                bar.set_postfix(loss=f"{float(loss.detach()):.4f}", cells_s=f"{cells * ctx.world_size / elapsed:.1f}",
                                refresh=False)
                bar.update(1)
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    # The loop's own totals travel under names a loss_fn's stats cannot take.
    local = {"__loss": loss_sum, "__steps": n_steps, "__cells": cells, **totals}
    summed = reduce_sum({k: float(v) for k, v in local.items()}, ctx)
    steps = max(summed.pop("__steps"), 1)
    out = {"loss": summed.pop("__loss") / steps, "cells": summed.pop("__cells"), "steps": steps / ctx.world_size,
           "time": elapsed}
    out["cells_per_s"] = out["cells"] / elapsed if elapsed > 0 else float("nan")
    out.update(summed)
    return out


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    step_fn: Callable[[torch.nn.Module, Any], dict[str, Any]],
    *,
    ctx: DistContext,
    amp: Amp | None = None,
    desc: str = "valid",
) -> dict[str, Any]:
    """Run `step_fn(model, batch)` over `loader` in eval mode without gradients, on the unwrapped model (so ranks may
    hold different numbers of batches), and combine what it returns over batches and ranks.

    step_fn returns a dict: numbers and 0-dim tensors are summed (over batches and ranks; floats returned);
    tensors with a batch dimension are concatenated (over batches, then gathered over ranks; CPU tensors returned).
    When an "index" tensor is among them, every gathered tensor is put in index order (e.g. dataset order).
    Also returns "cells" (all ranks) and "time".
    """
    from tqdm import tqdm

    amp = amp or Amp("none", ctx.device)
    core = unwrap_model(model)
    was_training = core.training
    core.eval()
    sums: dict[str, Any] = {}
    parts: dict[str, list[torch.Tensor]] = {}
    cells = 0
    start = time.perf_counter()
    try:
        for batch in tqdm(loader, desc=desc, disable=not ctx.is_main, dynamic_ncols=True, mininterval=1.0,
                          leave=False, file=sys.stderr):
            batch = _to_device(batch, ctx.device)
            with amp.autocast():
                out = step_fn(core, batch)
            cells += _batch_cells(batch)
            for key, value in out.items():
                if isinstance(value, torch.Tensor) and value.dim() > 0:
                    parts.setdefault(key, []).append(value.detach())
                else:
                    _accumulate(sums, {key: value})
    finally:
        core.train(was_training)
    if ctx.distributed:
        # A rank may have seen no batch at all (fewer cells than ranks): agree on keys, shapes and dtypes first, so
        # every rank makes the same collective calls.
        mine = (sorted(sums), {k: (tuple(v[0].shape[1:]), str(v[0].dtype)) for k, v in parts.items()})
        everyone: list[Any] = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine)
        for keys, shapes in everyone:
            for key in keys:
                sums.setdefault(key, 0.0)
            for key, (shape, dtype) in shapes.items():
                if key not in parts:
                    parts[key] = [torch.empty((0, *shape), dtype=getattr(torch, dtype.removeprefix("torch.")),
                                              device=ctx.device)]
    summed = reduce_sum({"__cells": cells, **{k: float(v) for k, v in sums.items()}}, ctx)
    result: dict[str, Any] = dict(summed)
    result["cells"] = result.pop("__cells")
    for key in sorted(parts):
        result[key] = gather_tensors(torch.cat(parts[key]), ctx)
    if "index" in parts:
        order = torch.argsort(result["index"])
        for key in parts:
            result[key] = result[key][order]
    result["time"] = time.perf_counter() - start
    return result


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------


def epoch_checkpoint_path(ckpt_dir: str, model_name: str, epoch: int) -> str:
    """`<ckpt_dir>/<model_name>_<epoch>.pth`, the reference's naming."""
    return os.path.join(ckpt_dir, f"{model_name}_{epoch}.pth")


def named_checkpoint_path(ckpt_dir: str, model_name: str, name: str) -> str:
    """`<ckpt_dir>/<model_name>_<name>.pth`, e.g. name "best" for fine-tuning's best model."""
    return os.path.join(ckpt_dir, f"{model_name}_{name}.pth")


def _plain_args(args: argparse.Namespace | dict | None) -> dict[str, Any]:
    items = vars(args) if isinstance(args, argparse.Namespace) else dict(args or {})
    return {k: v for k, v in items.items() if v is None or isinstance(v, str | int | float | bool)}


def save_training_checkpoint(
    path: str,
    *,
    model: torch.nn.Module,
    ctx: DistContext,
    genes: Sequence[str] | None,
    epoch: int,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: CosineAnnealingWarmupRestarts | None = None,
    amp: Amp | None = None,
    classes: Sequence[str] | None = None,
    args: argparse.Namespace | dict | None = None,
    losses: float | None = None,
    **extra: Any,
) -> None:
    """Save a checkpoint; call it on EVERY rank (it gathers each rank's random state), rank 0 writes atomically, then
    all wait at a barrier.

    Writes `path` holding the reference's keys (`epoch`, `model_state_dict`, `optimizer_state_dict`,
    `scheduler_state_dict`, `losses`) and ours (`config`, `head`, `genes`, `classes`, `rng` (one entry per rank),
    `world_size`, `amp_state_dict`, `args`, and `extra`).
    """
    rng = _gather_rng_states(ctx)
    if ctx.is_main:
        payload = checkpoint_payload(
            model,
            genes=list(genes) if genes is not None else None,
            classes=list(classes) if classes is not None else None,
            epoch=int(epoch),
            optimizer_state_dict=optimizer.state_dict() if optimizer is not None else None,
            scheduler_state_dict=scheduler.state_dict() if scheduler is not None else None,
            losses=losses,
            amp_state_dict=amp.state_dict() if amp is not None else {},
            rng=rng,
            world_size=ctx.world_size,
            args=_plain_args(args),
            **extra,
        )
        save_checkpoint(payload, path)
    barrier(ctx)


_EPOCH_FILE = re.compile(r"^(?P<name>.+)_(?P<epoch>\d+)\.pth$")


def find_latest_checkpoint(ckpt_dir: str, model_name: str) -> tuple[str, int] | None:
    """(path, epoch) of the highest-epoch `<model_name>_<epoch>.pth` in ckpt_dir that reads as a checkpoint, or None.

    Files that do not read (e.g. truncated by a copy) are skipped with a warning; our own writes are atomic, so a
    killed run never leaves one.
    """
    if not os.path.isdir(ckpt_dir):
        return None
    found = []
    for name in os.listdir(ckpt_dir):
        match = _EPOCH_FILE.match(name)
        if match and match.group("name") == model_name:
            found.append((int(match.group("epoch")), os.path.join(ckpt_dir, name)))
    for epoch, path in sorted(found, reverse=True):
        try:
            read_checkpoint_file(path)
        except CheckpointError as err:
            print(f"warning: skipping unreadable checkpoint {path!r}: {err}", file=sys.stderr)
            continue
        return path, epoch
    return None


def resolve_resume(args: argparse.Namespace) -> str | None:
    """The checkpoint to resume from under `--resume` (None/True/False), or None to start fresh.

    None (default): the latest epoch checkpoint of `--model_name` when one exists. True: that checkpoint, an error
    if there is none. False: start fresh, an error if epoch checkpoints of this name exist (they would be overwritten).
    """
    latest = find_latest_checkpoint(args.ckpt_dir, args.model_name)
    if args.resume is None:
        return latest[0] if latest else None
    if args.resume:
        if latest is None:
            raise ScbertError(
                f"--resume True but {args.ckpt_dir!r} holds no checkpoint {args.model_name}_<epoch>.pth: check "
                "--ckpt_dir and --model_name, or drop --resume to start a new run"
            )
        return latest[0]
    if latest is not None:
        raise ScbertError(
            f"--resume False but {latest[0]!r} exists and a fresh run would overwrite it: pass another "
            "--model_name or --ckpt_dir, move the old checkpoints away, or drop --resume to continue that run"
        )
    return None


def restore_training_state(
    path: str,
    *,
    model: torch.nn.Module,
    ctx: DistContext,
    genes: Sequence[str] | None,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler: CosineAnnealingWarmupRestarts | None = None,
    amp: Amp | None = None,
) -> dict[str, Any]:
    """Load a `save_training_checkpoint` file into the model (strict), optimiser, scheduler, scaler and this rank's
    random state. Checks that the checkpoint's genes equal `genes` and its architecture the model's.

    Returns the checkpoint's payload (use `payload["epoch"] + 1` as the first epoch to run).
    """
    ckpt = load_checkpoint(path)
    if genes is not None:
        check_checkpoint_genes(ckpt.genes, genes, path, n_positions=ckpt.config["max_seq_len"] - 1)
    core = unwrap_model(model)
    own = getattr(core, "config", None)
    if own is not None:
        differing = sorted(k for k in own if k in ckpt.config and ckpt.config[k] != own[k])
        if differing:
            detail = ", ".join(f"{k}: checkpoint {ckpt.config[k]!r} vs now {own[k]!r}" for k in differing)
            raise ScbertError(
                f"cannot resume from {path!r}: the model flags differ from that run ({detail}); rerun with that "
                "run's flags, or pass another --model_name to start a separate run"
            )
    try:
        core.load_state_dict(ckpt.state_dict, strict=True)
    except RuntimeError as err:
        raise ScbertError(
            f"cannot resume from {path!r}: its weights do not fit the model ({' '.join(str(err).split())[:200]}): "
            "rerun with that run's flags"
        ) from err
    payload = ckpt.payload
    if hasattr(core, "load_redraw_state"):
        core.load_redraw_state(payload.get("redraw"))  # the next projection redraw is the one the run had next
    if optimizer is not None and payload.get("optimizer_state_dict") is not None:
        optimizer.load_state_dict(payload["optimizer_state_dict"])
    if scheduler is not None and payload.get("scheduler_state_dict") is not None:
        scheduler.load_state_dict(payload["scheduler_state_dict"])
    if amp is not None and payload.get("amp_state_dict"):
        amp.load_state_dict(payload["amp_state_dict"])
    states = payload.get("rng") or []
    if len(states) == ctx.world_size:
        set_rng_state(states[ctx.rank])
    else:
        # A different number of ranks: no state belongs to this rank; a fresh, still distinct, seed per rank.
        seed = int(payload.get("args", {}).get("seed", 0) or 0)
        seed_everything(seed + 7919 * int(payload.get("epoch", 0)), ctx.rank)
    return payload


# ---------------------------------------------------------------------------------------------------------------
# Logs
# ---------------------------------------------------------------------------------------------------------------


class JsonlLogger:
    """Appends one JSON object per line to `path` (rank 0 only; other ranks do nothing)."""

    def __init__(self, path: str, ctx: DistContext):
        self.path, self.enabled = path, ctx.is_main
        if self.enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        clean = {}
        for key, value in record.items():
            if isinstance(value, torch.Tensor | np.floating):
                value = float(value)
            clean[key] = None if isinstance(value, float) and not math.isfinite(value) else value  # strict JSON
        with open(self.path, "a") as fh:
            fh.write(json.dumps(clean) + "\n")
