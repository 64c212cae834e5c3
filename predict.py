"""Annotate cells with a fine-tuned scBERT model, call novel types `Unassigned`, and write results people keep.

    python predict.py --data_path query.h5ad --model_path finetuned_best.pth --novel_type True --unassign_thres 0.5

The query is preprocess.py's output for the model's gene list (`preprocess.py --ref <checkpoint>`). Cells are
tokenised batch by batch (the matrix is never densified as a whole), classified, and labelled with the argmax class;
with `--novel_type True` a cell whose top probability is below `--unassign_thres` is `Unassigned` (SPEC section 5).

Files written (never over the input; an existing output only with `--overwrite True`):
- `<out>.h5ad` (default `<data stem>_scbert.h5ad` beside the input): the input, plus
    obs['scbert_celltype']        categorical: every class of the model (in class order, so colours stay stable
                                  across queries), then `Unassigned` when --novel_type True (whether used or not)
    obs['scbert_confidence']      float32, the top class probability
    obsm['scbert_probabilities']  float32 (cells, classes): softmax of the class logits
    obsm['X_scbert']              with --embeddings True: float32 (cells, dim) cell embeddings (see EMBEDDING_HELP)
    uns['scbert_predict']         {'params': {...the run's settings}, 'classes': [...class names, obsm column order],
                                   'metrics': {...} with --label_key}
- `<out>.csv`: cell_id, scbert_celltype, scbert_confidence, then prob_<class> for every class.
- with --label_key: `<out stem>_metrics.json` (accuracy, macro-F1, novel-type recall, per-class report) and
  `<out stem>_confusion.csv` (true labels x predicted labels, Unassigned included).
- with --attention type|cell: `<out stem>_attention.csv` (genes x predicted types: mean attention each gene receives
  in the chosen layer, plus all_cells), and with `cell` also `<out stem>_attention_cells.npy` (float32 cells x genes,
  rows in obs order, columns in var order). See performer_pytorch/interpret.py.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
from tqdm import tqdm

from label_io import read_label_dict
from metrics import UNASSIGNED, annotation_metrics, format_metrics
from models import load_model
from performer_pytorch import load_checkpoint
from performer_pytorch.interpret import AttentionRecorder, GroupMeans
from utils import ScbertError, atomic_write_bytes, read_preprocessed, run_cli, str2bool

UNS_KEY = "scbert_predict"

EMBEDDING_HELP = (
    "also write cell embeddings to obsm['X_scbert']: the mean of the final-norm gene encodings (dim values) over the "
    "genes the cell expresses (non-zero tokens; all genes for a cell expressing none). Why this pooling: it is the "
    "transformer's own representation of the cell, not squeezed through a head trained only to separate the training "
    "classes, so novel types keep their own place; and most of a cell's ~17k tokens are zeros whose encodings are "
    "nearly the same in every cell, which would drown a plain mean"
)


# ---------------------------------------------------------------------------------------------------------------------
# Library: prediction, labelling and evaluation, independent of files
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class Predictions:
    """probs: float32 (cells, classes). embeddings: float32 (cells, dim) or None. attention: float32 (cells, genes + 1)
    when asked for without an `on_attention` callback, else None. seconds: wall time of the loop."""

    probs: np.ndarray
    embeddings: np.ndarray | None = None
    attention: np.ndarray | None = None
    seconds: float = 0.0


def resolve_device(name: str) -> torch.device:
    """`auto`: CUDA when visible, else CPU; `cuda` without a visible GPU is refused."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ScbertError(f"--device {name} was asked for but no CUDA device is visible: pass --device cpu or auto")
    return torch.device(name)


def _autocast(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    if amp == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ScbertError(f"--amp {amp!r} is not supported: pass none or bf16")


@torch.inference_mode()
def predict_cells(
    model: torch.nn.Module,
    X: sp.spmatrix | np.ndarray,
    *,
    batch_size: int = 8,
    device: torch.device | str = "cpu",
    amp: str = "none",
    embeddings: bool = False,
    attention_layer: int | None = None,
    on_attention: Callable[[int, np.ndarray, np.ndarray], None] | None = None,
    progress: bool = False,
) -> Predictions:
    """Class probabilities (and optionally embeddings) of every cell, `batch_size` cells at a time.

    model: a model family with a cell-type head (e.g. `models.load_model(path)`); its vocab makes the batches.
    X: (cells, genes) log2(1 + CP10K) values over the model's genes, sparse or dense; only one batch is densified.
    attention_layer / on_attention: when given, per-gene attention received at that layer is computed for each batch
    and passed as `on_attention(first_row, probs (b, classes), scores (b, genes + 1))`, so callers can reduce it
    without keeping (cells x genes) in memory; without a callback the scores are returned in `attention`.
    The model is put in eval mode and moved to `device`; logits are computed under `amp` ("none" or "bf16"), the
    softmax in float32.
    """
    device = torch.device(device)
    n_cells, n_genes = X.shape
    vocab = model.vocab
    if n_genes != vocab.gene_num:
        raise ScbertError(
            f"the data have {n_genes} genes but the model reads {vocab.gene_num}: run preprocess.py --ref "
            "<checkpoint> on the data"
        )
    if batch_size < 1:
        raise ScbertError(f"--batch_size must be at least 1, got {batch_size}")
    if n_cells == 0:
        raise ScbertError("there are no cells to predict: check the input")
    model.eval().to(device)
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    probs: np.ndarray | None = None  # (cells, classes), allocated once the first batch gives the sizes
    pooled: np.ndarray | None = None  # (cells, dim)
    kept: list[np.ndarray] = []  # attention scores (b, genes + 1) per batch, when no callback takes them
    recorder = AttentionRecorder(model, attention_layer) if attention_layer is not None else None
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if recorder is not None:
            stack.enter_context(recorder)
        bar = stack.enter_context(tqdm(total=n_cells, unit="cell", disable=not progress, file=sys.stderr))
        for first in range(0, n_cells, batch_size):
            last = min(first + batch_size, n_cells)
            batch = {k: v.to(device) for k, v in vocab.make_batch(X[first:last]).items()}
            with _autocast(device, amp):
                encodings = model.encode(batch)  # (b, tokens, dim)
                logits = model.head(encodings)  # (b, classes)
            if probs is None:
                probs = np.empty((n_cells, logits.shape[-1]), dtype=np.float32)
                pooled = np.empty((n_cells, encodings.shape[-1]), dtype=np.float32) if embeddings else None
            probs[first:last] = torch.softmax(logits.float(), dim=-1).cpu().numpy()
            if pooled is not None:
                pooled[first:last] = model.pool(encodings, batch).cpu().numpy()
            if recorder is not None:
                scores = recorder.pop().cpu().numpy()
                if on_attention is not None:
                    on_attention(first, probs[first:last], scores)
                else:
                    kept.append(scores)
            bar.update(last - first)
    attention = np.concatenate(kept) if kept else None
    return Predictions(probs=probs, embeddings=pooled, attention=attention, seconds=time.perf_counter() - start)


def assign_labels(
    probs: np.ndarray, classes: Sequence[str], *, novel_type: bool, unassign_thres: float
) -> tuple[np.ndarray, np.ndarray]:
    """Argmax class of each row of probs (cells, classes); with novel_type, `Unassigned` below the threshold.

    Returns (labels: object array of str, confidence: float32 top probability).
    """
    classes = np.asarray(list(classes), dtype=object)
    best = probs.argmax(axis=1)
    confidence = probs.max(axis=1).astype(np.float32)
    labels = classes[best]
    if novel_type:
        labels = np.where(confidence < unassign_thres, UNASSIGNED, labels).astype(object)
    return labels, confidence


def label_categories(classes: Sequence[str], novel_type: bool) -> list[str]:
    """Categories of obs['scbert_celltype']: the model's classes in order, then `Unassigned` when novel_type is on."""
    return list(classes) + ([UNASSIGNED] if novel_type else [])


# ---------------------------------------------------------------------------------------------------------------------
# Script
# ---------------------------------------------------------------------------------------------------------------------


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Annotate the cells of a preprocessed .h5ad with a fine-tuned scBERT checkpoint; write an .h5ad "
        "and a CSV with labels, confidences and class probabilities.",
        add_help=add_help,
    )
    parser.add_argument("--data_path", required=True,
                        help="query .h5ad from preprocess.py --ref <checkpoint> (log2(1 + CP10K) over the model's "
                        "genes, in its order)")
    parser.add_argument("--model_path", required=True,
                        help="fine-tuned checkpoint (finetune.py's <model_name>_best.pth, or the reference's with "
                        "--label_dict); GPU checkpoints load on CPU")
    parser.add_argument("--novel_type", type=str2bool, default=False,
                        help="True: call cells whose top probability is below --unassign_thres 'Unassigned' "
                        "(novel types); False (default): always the argmax class")
    parser.add_argument("--unassign_thres", type=float, default=0.5,
                        help="top-probability threshold for --novel_type True, in [0, 1] (default: %(default)s, "
                        "as published)")
    parser.add_argument("--bin_num", type=int, default=None,
                        help="expression bins (published: 5); default: from the checkpoint, which it must match")
    parser.add_argument("--gene_num", type=int, default=None,
                        help="genes per cell (published: 16906); default: from the checkpoint, which it must match")
    parser.add_argument("--pos_embed", type=str2bool, default=None,
                        help="gene2vec positional embedding (published: True); default: from the checkpoint, "
                        "which it must match")
    parser.add_argument("--seed", type=int, default=2021, help="random seed (prediction is deterministic in eval "
                        "mode; kept for published commands) (default: %(default)s)")
    parser.add_argument("--batch_size", type=int, default=8,
                        help="cells per forward pass; results do not depend on it (default: %(default)s)")
    parser.add_argument("--out_path", default=None,
                        help="output .h5ad (default: <data stem>_scbert.h5ad beside the input); the CSV goes "
                        "beside it with the same name")
    parser.add_argument("--overwrite", type=str2bool, default=False,
                        help="replace existing output files (never the input) (default: %(default)s)")
    parser.add_argument("--label_dict", default=None,
                        help="class names for a reference checkpoint (its label_dict pickle, read safely), or a "
                        "text/JSON list; our checkpoints carry their classes")
    parser.add_argument("--label_key", default=None,
                        help="obs column with known cell types: also report accuracy, macro-F1, novel-type recall "
                        "and a confusion matrix")
    parser.add_argument("--embeddings", type=str2bool, default=False, help=EMBEDDING_HELP)
    parser.add_argument("--attention", choices=["none", "type", "cell"], default="none",
                        help="per-gene attention received (the paper's gene importance): 'type' writes the mean per "
                        "predicted type to <out stem>_attention.csv; 'cell' also writes every cell's to "
                        "<out stem>_attention_cells.npy (cells x genes float32) (default: %(default)s)")
    parser.add_argument("--attention_layer", type=int, default=-1,
                        help="Performer block whose attention is read; -1 is the last, as in the paper")
    parser.add_argument("--amp", choices=["none", "bf16"], default="none",
                        help="bf16 autocast: about twice as fast on recent CPUs and GPUs; probabilities change in "
                        "the third decimal (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto (CUDA if visible), cpu or cuda (default: %(default)s)")
    parser.add_argument("--heads", type=int, default=None,
                        help="attention heads (published: 10); default: from the checkpoint (stored, or inferred from "
                        "the weights), which it must match")
    return parser


@dataclass
class PredictResult:
    """What main() produced: the output AnnData, the written paths by kind, the metrics (with --label_key)."""

    adata: Any
    paths: dict[str, str]
    predictions: Predictions
    metrics: dict[str, Any] | None = None
    params: dict[str, Any] = field(default_factory=dict)


def output_paths(args: argparse.Namespace) -> dict[str, str]:
    """Every file this run will write, by kind; refuses the input as output and existing files without --overwrite."""
    data = os.path.abspath(args.data_path)
    stem_in = os.path.splitext(data)[0]
    out = os.path.abspath(args.out_path) if args.out_path else f"{stem_in}_scbert.h5ad"
    if not out.endswith(".h5ad"):
        raise ScbertError(f"--out_path {args.out_path!r} must end in .h5ad (the CSV is written beside it)")
    if out == data or (os.path.exists(out) and os.path.exists(data) and os.path.samefile(out, data)):
        raise ScbertError(f"--out_path {args.out_path!r} is the input file: choose another path, the input is kept")
    stem = out[: -len(".h5ad")]
    paths = {"h5ad": out, "csv": f"{stem}.csv"}
    if args.label_key:
        paths["metrics"] = f"{stem}_metrics.json"
        paths["confusion"] = f"{stem}_confusion.csv"
    if args.attention in ("type", "cell"):
        paths["attention"] = f"{stem}_attention.csv"
    if args.attention == "cell":
        paths["attention_cells"] = f"{stem}_attention_cells.npy"
    existing = [p for p in paths.values() if os.path.exists(p)]
    if existing and not args.overwrite:
        raise ScbertError(
            f"{existing[0]!r} already exists: pass --overwrite True to replace it, or choose another --out_path"
        )
    return paths


def resolve_classes(ckpt, label_dict: str | None) -> list[str]:
    """Class names from --label_dict or the checkpoint, checked against the head's number of outputs."""
    n_classes = int(ckpt.head["n_classes"])
    if label_dict is not None:
        classes = read_label_dict(label_dict)
        if ckpt.classes is not None and list(ckpt.classes) != classes:
            raise ScbertError(
                f"--label_dict {label_dict!r} names other classes than the checkpoint stores: drop --label_dict, "
                "the checkpoint carries its own"
            )
    elif ckpt.classes is not None:
        classes = list(ckpt.classes)
    else:
        raise ScbertError(
            f"{ckpt.path!r} stores no class names (a reference checkpoint): pass --label_dict <the label_dict file "
            "written when it was fine-tuned>"
        )
    if len(classes) != n_classes:
        src = f"--label_dict {label_dict!r}" if label_dict is not None else "the checkpoint's class list"
        raise ScbertError(
            f"{src} names {len(classes)} classes but the model's head has {n_classes} outputs: pass the label_dict "
            "written with this checkpoint"
        )
    return classes


def check_model_flags(args: argparse.Namespace, config: dict[str, Any]) -> int:
    """Published size flags given explicitly must match the checkpoint; returns bin_num."""
    gene_num = config["max_seq_len"] - 1
    if args.gene_num is not None and args.gene_num != gene_num:
        raise ScbertError(f"--gene_num {args.gene_num} does not match the checkpoint's {gene_num} genes: drop the flag")
    bin_num = config["num_tokens"] - 2
    if args.bin_num is not None and args.bin_num != bin_num:
        raise ScbertError(
            f"--bin_num {args.bin_num} does not match the checkpoint, trained with {bin_num} bins: drop the flag"
        )
    pos = bool(config.get("g2v_position_emb", True))
    if args.pos_embed is not None and args.pos_embed != pos:
        raise ScbertError(f"--pos_embed {args.pos_embed} does not match the checkpoint (trained with {pos}): drop it")
    return bin_num


def _write_h5ad(adata, path: str) -> None:
    """Write beside the target, then rename: a crash never leaves half an output."""
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp{os.getpid()}.h5ad")
    try:
        adata.write_h5ad(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_csv(frame: pd.DataFrame, path: str, **kwargs) -> None:
    atomic_write_bytes(path, frame.to_csv(**kwargs).encode("utf-8"))


def _uns_safe(params: dict[str, Any]) -> dict[str, Any]:
    """h5ad cannot store None: leave such entries out."""
    return {k: v for k, v in params.items() if v is not None}


class _AttentionSink:
    """Reduces per-batch attention scores: means per predicted type and overall; optionally every cell to a .npy."""

    def __init__(self, classes, n_cells, n_genes, *, novel_type, unassign_thres, cells_path=None):
        self.classes, self.novel_type, self.thres = list(classes), novel_type, unassign_thres
        self.means = GroupMeans(label_categories(classes, novel_type) + ["all_cells"], n_genes)
        self.cells = None
        self.cells_tmp = None
        if cells_path is not None:
            self.cells_tmp = os.path.join(os.path.dirname(cells_path), f".{os.path.basename(cells_path)}.tmp.npy")
            self.cells = np.lib.format.open_memmap(
                self.cells_tmp, mode="w+", dtype=np.float32, shape=(n_cells, n_genes)
            )

    def __call__(self, first: int, probs: np.ndarray, scores: np.ndarray) -> None:
        genes = scores[:, :-1]  # (b, genes): the appended token is no gene
        labels, _ = assign_labels(probs, self.classes, novel_type=self.novel_type, unassign_thres=self.thres)
        self.means.add(genes, list(labels))
        self.means.add(genes, ["all_cells"] * len(labels))
        if self.cells is not None:
            self.cells[first : first + len(genes)] = genes

    def discard(self) -> None:
        """Remove the partial per-cell file after a failure."""
        self.cells = None
        if self.cells_tmp is not None and os.path.exists(self.cells_tmp):
            os.remove(self.cells_tmp)

    def finish(self, gene_names: Sequence[str], csv_path: str, cells_path: str | None) -> None:
        table = pd.DataFrame(self.means.means().T, index=pd.Index(list(gene_names), name="gene"),
                             columns=self.means.groups)
        table = table.loc[:, self.means.counts > 0]  # only types some cell was called
        _write_csv(table, csv_path, float_format="%.6g")
        if self.cells is not None:
            self.cells.flush()
            del self.cells
            os.replace(self.cells_tmp, cells_path)


def main(argv: Sequence[str] | None = None) -> PredictResult:
    args = get_args_parser().parse_args(argv)
    if not 0.0 <= args.unassign_thres <= 1.0:
        raise ScbertError(f"--unassign_thres must be a probability in [0, 1], got {args.unassign_thres}")
    if args.batch_size < 1:
        raise ScbertError(f"--batch_size must be at least 1, got {args.batch_size}")
    paths = output_paths(args)
    device = resolve_device(args.device)
    torch.manual_seed(args.seed)

    ckpt = load_checkpoint(args.model_path, heads=args.heads)
    if ckpt.head is None or ckpt.head.get("type") != "classifier":
        kind = "a pretraining (language-model) head" if ckpt.head else "no output head"
        raise ScbertError(
            f"{args.model_path!r} has {kind}, not a cell-type classifier: fine-tune it with finetune.py first and "
            "pass the fine-tuned checkpoint"
        )
    classes = resolve_classes(ckpt, args.label_dict)
    if args.novel_type and UNASSIGNED in classes:
        raise ScbertError(f"the model has a class called {UNASSIGNED!r}, which --novel_type True would confuse with "
                          "novel cells: rename that class when fine-tuning, or pass --novel_type False")
    bin_num = check_model_flags(args, ckpt.config)
    depth = int(ckpt.config["depth"])
    if args.attention != "none" and not -depth <= args.attention_layer < depth:
        raise ScbertError(f"--attention_layer {args.attention_layer} does not exist in a model of depth {depth}: pass "
                          f"a layer from {-depth} to {depth - 1} (-1 is the last, as in the paper)")

    fix = f"run preprocess.py --ref {args.model_path} on the raw data so it uses the model's genes in order"
    adata = read_preprocessed(args.data_path, genes=ckpt.genes, fix_genes=fix)
    gene_num = ckpt.config["max_seq_len"] - 1
    if ckpt.genes is None:
        if adata.n_vars != gene_num:
            raise ScbertError(
                f"{args.data_path!r} has {adata.n_vars} genes but the model reads {gene_num}: preprocess the data "
                "with the gene list the model was trained on"
            )
        print(f"warning: {args.model_path!r} stores no gene list, so only the number of genes ({gene_num}) was "
              "checked: make sure the data use the model's reference genes in its order", file=sys.stderr)
    if args.label_key is not None and args.label_key not in adata.obs:
        columns = ", ".join(map(str, list(adata.obs.columns)[:10])) or "none"
        raise ScbertError(f"--label_key {args.label_key!r} is not a column of obs in {args.data_path!r} "
                          f"(columns: {columns}): pass one of them or drop the flag")

    model = load_model(ckpt)
    sink = None
    if args.attention != "none":
        sink = _AttentionSink(classes, adata.n_obs, adata.n_vars, novel_type=args.novel_type,
                              unassign_thres=args.unassign_thres, cells_path=paths.get("attention_cells"))
    print(f"predicting {adata.n_obs} cells x {adata.n_vars} genes with {len(classes)} classes on {device}",
          file=sys.stderr)
    try:
        predictions = predict_cells(
            model, adata.X, batch_size=args.batch_size, device=device, amp=args.amp,
            embeddings=args.embeddings, attention_layer=args.attention_layer if sink else None, on_attention=sink,
            progress=True,
        )
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    rate = adata.n_obs / max(predictions.seconds, 1e-9)
    print(f"predicted {adata.n_obs} cells in {predictions.seconds:.1f} s ({rate:.1f} cells/s)", file=sys.stderr)

    labels, confidence = assign_labels(
        predictions.probs, classes, novel_type=args.novel_type, unassign_thres=args.unassign_thres
    )
    adata.obs["scbert_celltype"] = pd.Categorical(labels, categories=label_categories(classes, args.novel_type))
    adata.obs["scbert_confidence"] = confidence
    adata.obsm["scbert_probabilities"] = predictions.probs
    if predictions.embeddings is not None:
        adata.obsm["X_scbert"] = predictions.embeddings
    params = _uns_safe({
        "model_path": os.path.abspath(args.model_path),
        "checkpoint_format": ckpt.source,
        "data_path": os.path.abspath(args.data_path),
        "novel_type": bool(args.novel_type),
        "unassign_thres": float(args.unassign_thres),
        "bin_num": int(bin_num),
        "gene_num": int(gene_num),
        "pos_embed": bool(ckpt.config.get("g2v_position_emb", True)),
        "seed": int(args.seed),
        "batch_size": int(args.batch_size),
        "amp": args.amp,
        "device": str(device),
        "label_dict": os.path.abspath(args.label_dict) if args.label_dict else None,
        "label_key": args.label_key,
        "embeddings": "mean of final-norm encodings over expressed genes" if args.embeddings else None,
        "attention": args.attention,
        "attention_layer": int(args.attention_layer) if args.attention != "none" else None,
    })
    adata.uns[UNS_KEY] = {"params": params, "classes": list(classes)}

    metrics = None
    if args.label_key is not None:
        metrics, confusion = annotation_metrics(adata.obs[args.label_key], labels, classes, novel_type=args.novel_type)
        adata.uns[UNS_KEY]["metrics"] = {
            k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
        }
        atomic_write_bytes(paths["metrics"], (json.dumps(metrics, indent=2) + "\n").encode("utf-8"))
        _write_csv(confusion, paths["confusion"])
        print(format_metrics(metrics), file=sys.stderr)
        if confusion.shape[1] <= 12:
            print(confusion.to_string(), file=sys.stderr)

    table = pd.DataFrame({
        "cell_id": adata.obs_names.astype(str),
        "scbert_celltype": labels,
        "scbert_confidence": confidence,
    })
    for i, name in enumerate(classes):
        table[f"prob_{name}"] = predictions.probs[:, i]
    _write_csv(table, paths["csv"], index=False, float_format="%.6g")
    if sink is not None:
        sink.finish(adata.var_names, paths["attention"], paths.get("attention_cells"))
    _write_h5ad(adata, paths["h5ad"])

    counts = pd.Series(labels).value_counts()
    summary = ", ".join(f"{name} {n}" for name, n in counts.head(8).items())
    print(f"labels: {summary}{', ...' if len(counts) > 8 else ''}", file=sys.stderr)
    print("wrote " + ", ".join(paths.values()), file=sys.stderr)
    return PredictResult(adata=adata, paths=paths, predictions=predictions, metrics=metrics, params=params)


if __name__ == "__main__":
    run_cli(main)
