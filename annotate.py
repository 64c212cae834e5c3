"""The annotation API: label the cells of an AnnData with a fine-tuned model, in a notebook or behind predict.py.

    from annotate import annotate
    adata = annotate(adata, "ckpts/finetune_best.pth", novel_type=True, unassign_thres=0.5)
    adata = annotate(counts, "ckpts/finetune_best.pth", preprocess=True, majority_voting=True)  # CellTypist-style

`adata` holds log2(1 + CP10K) values over the model's genes in its order (preprocess.py's output for
`--ref <checkpoint>`), or with `preprocess=True` counts, preprocessed here onto the model's genes with every cell
kept (user_data.py). Cells are made into batches by the model family's vocab a batch at a time (the matrix is never
densified as a whole), classified, and labelled with the argmax class; with `novel_type=True` a cell whose top
probability is below `unassign_thres` is `Unassigned` (SPEC section 5), or, with `novel_method="canal"`, a cell
more uncertain than CANAL's virtual outliers (canal.canal_novelty). `mode="prob_match"` and majority voting refine
the labels as CellTypist does (voting.py). Under torchrun each rank predicts a contiguous shard of the cells and
every rank receives all of them; the caller writes on rank 0.

Fields written (as scanpy does: labels categorical in obs, arrays in obsm, parameters in uns); "scbert_" is the
default `prefix` (`Keys`):
    obs['scbert_celltype']        categorical: every class of the model (in class order, so colours stay stable
                                  across queries), then `Unassigned` when novel_type (whether used or not); with
                                  mode "prob_match" also the "A|B" combinations that occur; `Unscored` for cells
                                  too sparse to score (preprocess=True)
    obs['scbert_confidence']      float32, the top class probability (NaN for unscored cells)
    obs['scbert_novelty']         with novel_method "canal": float32 uncertainty score u in [0, 1] (the threshold
                                  is params['novel_threshold'])
    obs['scbert_majority_voting'] with majority_voting: categorical, the majority label of the cell's over-cluster
    obs['scbert_over_clustering'] with over_clustering "auto": the Leiden over-cluster of each scored cell
    obs['scbert_unscored_reason'] with preprocess=True: why a cell was not scored, "" for scored cells
    obsm['scbert_probabilities']  float32 (cells, classes): softmax of the class logits (NaN rows: unscored)
    obsm['scbert_logits']         float32 (cells, classes): the head's outputs (the decision matrix)
    obsm['X_scbert']              with embeddings=True: float32 (cells, dim) cell embeddings (the family's `pool`)
    uns['scbert_predict']         {'params': {...settings}, 'classes': [...obsm column order], 'metrics': {...}
                                   with label_key, 'majority_voting': {...} with majority voting}
    uns['scbert_celltype_colors'] a colour per category (and for the majority vote), as scanpy's plots read them
"""

from __future__ import annotations

import contextlib
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.distributed as dist
from tqdm import tqdm

import canal
import voting
from distributed import DistContext, barrier, gather_tensors
from label_io import read_label_dict
from metrics import UNASSIGNED, annotation_metrics
from models import load_model
from optim import Amp
from performer_pytorch import load_checkpoint
from performer_pytorch.checkpoint import Checkpoint
from performer_pytorch.cpu_threads import configure_threads
from performer_pytorch.interpret import AttentionRecorder, GroupMeans
from plots import label_colors
from user_data import UNSCORED, Query, prepare_query, preprocessed_query, transfer
from utils import ScbertError, atomic_write_bytes, check_expression, check_gene_order

__all__ = [
    "EMBEDDING_HELP",
    "UNASSIGNED",
    "UNS_KEY",
    "Annotator",
    "AttentionSink",
    "Predictions",
    "annotate",
    "assign_labels",
    "canal_novel_cells",
    "check_novel_method",
    "check_model_flags",
    "check_query",
    "label_categories",
    "load_annotator",
    "predict_cells",
    "predict_query",
    "Keys",
    "Refinement",
    "finish_annotations",
    "make_query",
    "score_annotations",
    "write_annotations",
]

UNS_KEY = "scbert_predict"

EMBEDDING_HELP = (
    "also write cell embeddings to obsm['X_scbert']: the mean of the final-norm gene encodings (dim values) over the "
    "genes the cell expresses (non-zero tokens; all genes for a cell expressing none). Why this pooling: it is the "
    "transformer's own representation of the cell, not squeezed through a head trained only to separate the training "
    "classes, so novel types keep their own place; and most of a cell's ~17k tokens are zeros whose encodings are "
    "nearly the same in every cell, which would drown a plain mean"
)


@dataclass
class Predictions:
    """probs: float32 (cells, classes). embeddings: float32 (cells, dim) or None. attention: float32 (cells, genes + 1)
    when asked for without an `on_attention` callback, else None. seconds: wall time of the loop."""

    probs: np.ndarray
    embeddings: np.ndarray | None = None
    attention: np.ndarray | None = None
    seconds: float = 0.0
    first_hidden: np.ndarray | None = None  # (cells, hidden) the head's first hidden layer, for novel_method "canal"
    logits: np.ndarray | None = None  # float32 (cells, classes): the head's outputs before the softmax


@dataclass
class Annotator:
    """A fine-tuned model ready to label cells: the checkpoint read, the model (any family), its class names."""

    ckpt: Checkpoint
    model: torch.nn.Module
    classes: list[str]


def resolve_classes(ckpt: Checkpoint, label_dict: str | None) -> list[str]:
    """Class names from `label_dict` or the checkpoint, checked against the head's number of outputs."""
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


def load_annotator(model_path: str, *, label_dict: str | None = None, heads: int | None = None,
                   novel_type: bool = False) -> Annotator:
    """Read a fine-tuned checkpoint (ours, or the reference's with its label_dict) and build its model."""
    ckpt = load_checkpoint(model_path, heads=heads)
    if ckpt.head is None or ckpt.head.get("type") != "classifier":
        kind = "a pretraining (language-model) head" if ckpt.head else "no output head"
        raise ScbertError(
            f"{model_path!r} has {kind}, not a cell-type classifier: fine-tune it with finetune.py first and "
            "pass the fine-tuned checkpoint"
        )
    classes = resolve_classes(ckpt, label_dict)
    if novel_type and UNASSIGNED in classes:
        raise ScbertError(f"the model has a class called {UNASSIGNED!r}, which --novel_type True would confuse with "
                          "novel cells: rename that class when fine-tuning, or pass --novel_type False")
    return Annotator(ckpt=ckpt, model=load_model(ckpt), classes=classes)


# ---------------------------------------------------------------------------------------------------------------------
# Prediction
# ---------------------------------------------------------------------------------------------------------------------


def _shard(n_cells: int, ctx: DistContext | None) -> range:
    """This rank's contiguous rows (all rows for one process)."""
    if ctx is None or not ctx.distributed:
        return range(n_cells)
    return range(ctx.rank * n_cells // ctx.world_size, (ctx.rank + 1) * n_cells // ctx.world_size)


def _gather_rows(parts: list[np.ndarray], width: int | None, ctx: DistContext | None) -> np.ndarray | None:
    """This rank's row blocks -> all ranks' rows in rank order (shards are contiguous, so that is cell order).
    width: columns, or None to agree on it over ranks (a rank may hold no rows)."""
    local = np.concatenate(parts) if parts else None
    if ctx is None or not ctx.distributed:
        return local
    if width is None:
        mine = torch.tensor([0 if local is None else local.shape[1]], device=ctx.device)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX)
        width = int(mine)
        if width == 0:
            return None
    tensor = torch.from_numpy(local) if local is not None else torch.zeros((0, width), dtype=torch.float32)
    return gather_tensors(tensor, ctx).numpy()


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
    ctx: DistContext | None = None,
    first_hidden: bool = False,
) -> Predictions:
    """Class probabilities (and optionally embeddings) of every cell, `batch_size` cells at a time.

    model: a model family with a cell-type head (e.g. `models.load_model(path)`); its vocab makes the batches.
    X: (cells, genes) log2(1 + CP10K) values over the model's genes, sparse or dense; only one batch is densified.
    attention_layer / on_attention: when given, per-gene attention received at that layer is computed for each batch
    and passed as `on_attention(first_row, probs (b, classes), scores (b, genes + 1))`, so callers can reduce it
    without keeping (cells x genes) in memory; without a callback the scores are returned in `attention`.
    ctx: under torchrun, each rank predicts its shard and the results of all ranks are returned on every rank.
    first_hidden: also return the head's first hidden layer (scBERT's head), which CANAL's novel-cell call mixes.
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
    configure_threads(model, device)  # 1 thread for small models, the free cores for large ones
    X = sp.csr_matrix(X) if not sp.issparse(X) else X.tocsr()
    autocast = Amp(amp, device).autocast
    probs, logit_rows, pooled, kept, hidden = [], [], [], [], []  # per batch: (b, classes) x 2, (b, dim),
    # (b, genes + 1), (b, hidden)
    recorder = AttentionRecorder(model, attention_layer) if attention_layer is not None else None
    rows = _shard(n_cells, ctx)
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if recorder is not None:
            stack.enter_context(recorder)
        bar = stack.enter_context(tqdm(total=len(rows), unit="cell", disable=not progress, file=sys.stderr))
        for first in range(rows.start, rows.stop, batch_size):
            last = min(first + batch_size, rows.stop)
            batch = {k: v.to(device) for k, v in vocab.make_batch(X[first:last]).items()}
            with autocast():
                encodings = model.encode(batch)  # (b, tokens, dim)
                logits = model.head(encodings)  # (b, classes)
                if first_hidden:
                    hidden.append(canal.head_first_hidden(model.head, encodings).float().cpu().numpy())
            probs.append(torch.softmax(logits.float(), dim=-1).cpu().numpy())
            logit_rows.append(logits.float().cpu().numpy())
            if embeddings:
                pooled.append(model.pool(encodings, batch).cpu().numpy())
            if recorder is not None:
                scores = recorder.pop().cpu().numpy()
                if on_attention is not None:
                    on_attention(first, probs[-1], scores)
                else:
                    kept.append(scores)
            bar.update(last - first)
    seconds = time.perf_counter() - start
    n_classes = int(model.head_config["n_classes"])
    attention = _gather_rows(kept, n_genes + 1, ctx) if recorder is not None and on_attention is None else None
    return Predictions(probs=_gather_rows(probs, n_classes, ctx), seconds=seconds, attention=attention,
                       embeddings=_gather_rows(pooled, None, ctx) if embeddings else None,
                       first_hidden=_gather_rows(hidden, None, ctx) if first_hidden else None,
                       logits=_gather_rows(logit_rows, n_classes, ctx))


def predict_query(annotator: Annotator, query: Query, *, ctx: DistContext, batch_size: int = 8, amp: str = "none",
                  embeddings: bool = False, attention: str = "none", attention_layer: int = -1,
                  novel_type: bool = False, unassign_thres: float = 0.5, cells_path: str | None = None,
                  first_hidden: bool = False, say: Callable[..., None] = print) -> tuple[Predictions, Any]:
    """`predict_cells` on the scored cells of `query`, with the attention reduced while predicting for attention
    "type"/"cell" (an `AttentionSink`, whose `finish` writes its files; None otherwise); a progress bar on rank 0
    unless say is silent. Returns (predictions, sink)."""
    x = query.x
    sink = None
    if attention != "none":
        sink = AttentionSink(annotator.classes, x.shape[0], x.shape[1], novel_type=novel_type,
                             unassign_thres=unassign_thres, cells_path=cells_path, ctx=ctx)
    say(f"predicting {x.shape[0]} cells x {x.shape[1]} genes with {len(annotator.classes)} classes on {ctx.device} "
        f"x {ctx.world_size}")
    try:
        predictions = predict_cells(
            annotator.model, x, batch_size=batch_size, device=ctx.device, amp=amp, embeddings=embeddings,
            attention_layer=attention_layer if sink else None, on_attention=sink,
            progress=ctx.is_main and getattr(say, "progress", True), ctx=ctx, first_hidden=first_hidden,
        )
    except BaseException:
        if sink is not None:
            sink.discard()
        raise
    rate = x.shape[0] / max(predictions.seconds, 1e-9)
    say(f"predicted {x.shape[0]} cells in {predictions.seconds:.1f} s ({rate:.1f} cells/s)")
    return predictions, sink


NOVEL_METHODS = ("threshold", "canal")


def canal_novel_cells(model: torch.nn.Module, predictions: Predictions, *, temperature: float = canal.TEMPERATURE,
                      seed: int = 0) -> canal.Novelty:
    """CANAL's novel-cell call over all the query's cells (`canal.canal_novelty`): the threshold comes from virtual
    outliers mixed from the query's own cells, so it needs every cell's first hidden layer (predict_cells with
    first_hidden=True). Deterministic for a given seed; the same on every rank."""
    if predictions.first_hidden is None:
        raise ValueError("canal_novel_cells needs predict_cells(..., first_hidden=True)")
    head = model.head
    device = next(head.parameters()).device
    h = torch.from_numpy(predictions.first_hidden).to(device)
    return canal.canal_novelty(h, lambda hidden: canal.head_from_first_hidden(head, hidden)[1],
                               temperature=temperature, seed=seed)


def assign_labels(
    probs: np.ndarray, classes: Sequence[str], *, novel_type: bool, unassign_thres: float,
    novel: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Argmax class of each row of probs (cells, classes); with novel_type, `Unassigned` below the threshold, or,
    when `novel` (cells,) bool is given (another novel-cell call, e.g. CANAL's), where it is True.

    Returns (labels: object array of str, confidence: float32 top probability).
    """
    classes = np.asarray(list(classes), dtype=object)
    best = probs.argmax(axis=1)
    confidence = probs.max(axis=1).astype(np.float32)
    labels = classes[best]
    if novel_type:
        called = np.asarray(novel, dtype=bool) if novel is not None else confidence < unassign_thres
        labels = np.where(called, UNASSIGNED, labels).astype(object)
    return labels, confidence


def label_categories(classes: Sequence[str], novel_type: bool) -> list[str]:
    """Categories of obs['scbert_celltype']: the model's classes in order, then `Unassigned` when novel_type is on."""
    return list(classes) + ([UNASSIGNED] if novel_type else [])


# ---------------------------------------------------------------------------------------------------------------------
# AnnData in, AnnData out
# ---------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Keys:
    """The field names written for a `prefix` (default "scbert_", the published names)."""

    prefix: str = "scbert_"

    @property
    def label(self) -> str:
        return f"{self.prefix}celltype"

    @property
    def confidence(self) -> str:
        return f"{self.prefix}confidence"

    @property
    def probabilities(self) -> str:
        return f"{self.prefix}probabilities"

    @property
    def logits(self) -> str:
        return f"{self.prefix}logits"

    @property
    def novelty(self) -> str:
        return f"{self.prefix}novelty"

    @property
    def uns(self) -> str:
        return f"{self.prefix}predict"

    @property
    def embedding(self) -> str:
        return f"X_{self.prefix.rstrip('_')}"

    @property
    def umap(self) -> str:
        return f"X_{self.prefix}umap"

    @property
    def majority(self) -> str:
        return f"{self.prefix}majority_voting"

    @property
    def over_clustering(self) -> str:
        return f"{self.prefix}over_clustering"

    @property
    def reason(self) -> str:
        return f"{self.prefix}unscored_reason"


MODES = ("best_match", "prob_match")


@dataclass
class Refinement:
    """How labels are made from the probabilities and refined (CellTypist's options; see voting.py).

    novel_type / unassign_thres: `Unassigned` below the top-probability threshold (best_match); mode "prob_match":
    every class reaching p_thres, "A|B" for two; majority_voting: each over-cluster (an obs column, or "auto":
    Leiden) takes its majority label, `Unassigned` when that label holds less than min_prop of it; prefix: the
    field names (`Keys`); label_key: an obs column of known types to score against."""

    novel_type: bool = False
    unassign_thres: float = 0.5
    mode: str = "best_match"
    p_thres: float = 0.5
    majority_voting: bool = False
    over_clustering: str = "auto"
    min_prop: float = 0.0
    prefix: str = "scbert_"
    seed: int = 0
    label_key: str | None = None

    def check(self) -> None:
        if not 0.0 <= self.unassign_thres <= 1.0:
            raise ScbertError(f"--unassign_thres must be a probability in [0, 1], got {self.unassign_thres}")
        if self.mode not in MODES:
            raise ScbertError(f"--mode {self.mode!r} is not known: pass one of {', '.join(MODES)}")
        if not 0.0 < self.p_thres <= 1.0:
            raise ScbertError(f"--p_thres must be a probability in (0, 1], got {self.p_thres}")
        if not 0.0 <= self.min_prop <= 1.0:
            raise ScbertError(f"--min_prop must be a proportion in [0, 1], got {self.min_prop}")
        if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", self.prefix):
            raise ScbertError(f"--prefix {self.prefix!r} must start with a letter and hold only letters, digits and "
                              "underscores (e.g. scbert_)")

    @property
    def keys(self) -> Keys:
        return Keys(self.prefix)

    def params(self) -> dict[str, Any]:
        """The settings recorded in uns['<prefix>predict']['params'] besides the published ones."""
        out: dict[str, Any] = {"mode": self.mode, "prefix": self.prefix}
        if self.mode == "prob_match":
            out["p_thres"] = float(self.p_thres)
        if self.majority_voting:
            out.update(majority_voting=True, over_clustering=self.over_clustering, min_prop=float(self.min_prop))
        return out


def write_annotations(adata, predictions: Predictions, classes: Sequence[str], *, novel_type: bool,
                      unassign_thres: float, params: dict[str, Any], novelty: canal.Novelty | None = None,
                      keys: Keys = Keys(), mode: str = "best_match", p_thres: float = 0.5) -> None:
    """Write obs/obsm/uns as listed in the module docstring (params: None values are left out; h5ad has no None).
    novelty: CANAL's novel-cell call (`canal_novel_cells`), used instead of the fixed threshold; adds
    obs['scbert_novelty'] (its uncertainty score) and the threshold to the params. mode "prob_match": labels from
    `voting.prob_match_labels` (novel_type and unassign_thres then unused)."""
    novel = novelty.novel.cpu().numpy() if novelty is not None else None
    labels, confidence = assign_labels(predictions.probs, classes, novel_type=novel_type,
                                       unassign_thres=unassign_thres, novel=novel)
    categories = label_categories(classes, novel_type)
    if mode == "prob_match":
        labels = voting.prob_match_labels(predictions.probs, classes, p_thres)
        categories = voting.match_categories(labels, classes)
    adata.obs[keys.label] = pd.Categorical(labels, categories=categories)
    adata.obs[keys.confidence] = confidence
    adata.obsm[keys.probabilities] = predictions.probs
    if predictions.logits is not None:
        adata.obsm[keys.logits] = predictions.logits
    if predictions.embeddings is not None:
        adata.obsm[keys.embedding] = predictions.embeddings
    if novelty is not None:
        adata.obs[keys.novelty] = novelty.score.cpu().numpy().astype(np.float32)
        params = {**params, "novel_threshold": float(novelty.threshold)}
    adata.uns[keys.uns] = {"params": {k: v for k, v in params.items() if v is not None}, "classes": list(classes)}


def score_annotations(adata, label_key: str, classes: Sequence[str], *, novel_type: bool, keys: Keys = Keys()):
    """(metrics, confusion) of obs['scbert_celltype'] against obs[label_key] (metrics.annotation_metrics); the
    numeric metrics also go to uns['scbert_predict']['metrics']."""
    if label_key not in adata.obs:
        columns = ", ".join(map(str, list(adata.obs.columns)[:10])) or "none"
        raise ScbertError(f"--label_key {label_key!r} is not a column of obs (columns: {columns}): pass one of them "
                          "or drop the flag")
    predicted = adata.obs[keys.label].astype(str).to_numpy()
    metrics, confusion = annotation_metrics(adata.obs[label_key], predicted, classes, novel_type=novel_type)
    adata.uns[keys.uns]["metrics"] = {
        k: v for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)
    }
    return metrics, confusion


def add_majority_voting(query: Query, refine: Refinement, embeddings: np.ndarray | None) -> dict[str, Any]:
    """obs['<prefix>majority_voting'] on every cell of query.user (and obs['<prefix>over_clustering'] for "auto":
    Leiden on the cell embeddings when computed, else on principal components of the model's input); unscored
    cells neither vote nor change. Returns what uns['<prefix>predict']['majority_voting'] records."""
    user, keys = query.user, refine.keys
    scored = np.zeros(user.n_obs, dtype=bool)
    scored[query.rows] = True
    record: dict[str, Any] = {"over_clustering": refine.over_clustering, "min_prop": float(refine.min_prop)}
    if refine.over_clustering == "auto":
        rep, pca = (embeddings, False) if embeddings is not None else (query.x, True)
        graph = voting.neighbour_graph(rep, seed=refine.seed, pca=pca)
        found = voting.over_cluster(graph, seed=refine.seed)
        clusters = np.full(user.n_obs, None, dtype=object)
        clusters[query.rows] = found
        user.obs[keys.over_clustering] = pd.Categorical(clusters, categories=sorted(set(found), key=_natural))
        record.update(representation="cell embeddings" if embeddings is not None else "PCA of the model's input",
                      resolution=voting.auto_resolution(len(query.rows)))
    elif refine.over_clustering in user.obs:
        clusters = user.obs[refine.over_clustering].to_numpy(dtype=object)
    else:
        columns = ", ".join(map(str, list(user.obs.columns)[:10])) or "none"
        raise ScbertError(f"--over_clustering {refine.over_clustering!r} is not a column of obs (columns: "
                          f"{columns}): pass one of them, or auto to over-cluster with Leiden")
    labels = user.obs[keys.label].astype(str).to_numpy()
    voted, table = voting.majority_vote(labels, clusters, min_prop=refine.min_prop, voters=scored)
    voted[~scored] = labels[~scored]
    categories = list(user.obs[keys.label].cat.categories)
    if UNASSIGNED not in categories:
        categories.insert(len(categories) - (categories[-1] == UNSCORED), UNASSIGNED)
    user.obs[keys.majority] = pd.Categorical(voted, categories=categories)
    record.update(n_clusters=int(len(table)), clusters_unassigned=int((table["label"] == UNASSIGNED).sum()))
    user.uns[keys.uns]["majority_voting"] = record
    return record


def _natural(name: str) -> tuple[int, str]:
    return (int(name), "") if str(name).isdigit() else (1 << 30, str(name))


def finish_annotations(query: Query, annotator: Annotator, predictions: Predictions, refine: Refinement,
                       params: dict[str, Any], novelty: canal.Novelty | None = None):
    """Labels, scores and refinements of predicted cells, written onto every cell of query.user: the fields of
    `write_annotations` on the scored cells (`user_data.transfer` for the others), the metrics with a label_key,
    majority voting, and a colour per label in uns['<key>_colors']. Returns (metrics, confusion) or (None, None)."""
    keys = refine.keys
    write_annotations(query.model_input, predictions, annotator.classes, novel_type=refine.novel_type,
                      unassign_thres=refine.unassign_thres, params={**params, **refine.params()}, novelty=novelty,
                      keys=keys, mode=refine.mode, p_thres=refine.p_thres)
    metrics = confusion = None
    if refine.label_key is not None:
        metrics, confusion = score_annotations(query.model_input, refine.label_key, annotator.classes,
                                               novel_type=refine.novel_type, keys=keys)
    transfer(query, keys.prefix, keys.reason)
    if refine.majority_voting:
        add_majority_voting(query, refine, predictions.embeddings)
    for key in (keys.label, keys.majority):
        if key in query.user.obs:
            query.user.uns[f"{key}_colors"] = label_colors(list(query.user.obs[key].cat.categories))
    return metrics, confusion


def check_model_flags(annotator: Annotator, *, gene_num: int | None = None, bin_num: int | None = None,
                      pos_embed: bool | None = None) -> None:
    """Published size flags (--gene_num, --bin_num, --pos_embed) given explicitly must match the checkpoint."""
    vocab = annotator.model.vocab
    if gene_num is not None and gene_num != vocab.gene_num:
        raise ScbertError(f"--gene_num {gene_num} does not match the checkpoint's {vocab.gene_num} genes: drop the "
                          "flag")
    own_bins = getattr(vocab, "bin_num", None)
    if bin_num is not None and own_bins is not None and bin_num != own_bins:
        raise ScbertError(f"--bin_num {bin_num} does not match the checkpoint, trained with {own_bins} bins: drop the "
                          "flag")
    pos = bool(annotator.ckpt.config.get("g2v_position_emb", True))
    if pos_embed is not None and pos_embed != pos:
        raise ScbertError(f"--pos_embed {pos_embed} does not match the checkpoint (trained with {pos}): drop it")


def check_query(adata, annotator: Annotator, *, data_name: str = "the AnnData") -> None:
    """The query's genes must be the model's in order (only their number for a checkpoint without a gene list)."""
    genes, gene_num = annotator.ckpt.genes, annotator.model.vocab.gene_num
    if genes is not None:
        check_gene_order(adata.var_names, genes, data_name=data_name,
                         fix=f"run preprocess.py --ref {annotator.ckpt.path} on the raw data so it uses the model's "
                             "genes in order, or pass counts with --preprocess True")
        return
    if adata.n_vars != gene_num:
        raise ScbertError(f"{data_name} has {adata.n_vars} genes but the model reads {gene_num}: preprocess the data "
                          "with the gene list the model was trained on")
    print(f"warning: {annotator.ckpt.path!r} stores no gene list, so only the number of genes ({gene_num}) was "
          "checked: make sure the data use the model's reference genes in its order", file=sys.stderr)


def model_genes(annotator: Annotator) -> list[str]:
    """The gene list counts are aligned to: the checkpoint's, or for a reference checkpoint without one the
    published panglao order (preprocess.py's --ref <checkpoint> rule)."""
    if annotator.ckpt.genes is not None:
        return list(annotator.ckpt.genes)
    from genes import read_reference_genes

    genes = read_reference_genes(annotator.ckpt.path)
    if len(genes) != annotator.model.vocab.gene_num:
        raise ScbertError(f"{annotator.ckpt.path!r} stores no gene list and reads {annotator.model.vocab.gene_num} "
                          "genes: preprocess the counts with preprocess.py --ref <its gene list> instead")
    return genes


def make_query(adata, annotator: Annotator, *, preprocess: bool = False, min_genes: int = 200,
               counts_from: str = "auto", data_name: str = "the AnnData") -> Query:
    """The query for `adata`: preprocessed here from counts (preprocess=True: user_data.prepare_query), or checked
    as the model's input (log2(1 + CP10K) over its genes in order; the transformer's bins are not checked)."""
    if preprocess:
        if annotator.ckpt.model_type == "transformer":
            raise ScbertError("--preprocess True runs the scBERT recipe; the transformer reads bins: run preprocess.py "
                              f"--recipe scgpt --ref {annotator.ckpt.path} on the counts and pass its output")
        return prepare_query(adata, model_genes(annotator), min_genes=min_genes, counts_from=counts_from,
                             reference_name=f"the genes of {annotator.ckpt.path}")
    check_query(adata, annotator, data_name=data_name)
    # The transformer reads bins (whole numbers), which the log2(1 + CP10K) check would call counts.
    x = adata.X if annotator.ckpt.model_type == "transformer" else check_expression(adata.X, name=data_name)
    return preprocessed_query(adata, x)


def annotate(
    adata,
    model_path: str | Annotator,
    *,
    novel_type: bool = False,
    unassign_thres: float = 0.5,
    novel_method: str = "threshold",
    novel_temperature: float = canal.TEMPERATURE,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
    amp: str = "none",
    embeddings: bool = False,
    label_dict: str | None = None,
    label_key: str | None = None,
    copy: bool = False,
    ctx: DistContext | None = None,
    progress: bool = False,
    preprocess: bool = False,
    min_genes: int = 200,
    counts_from: str = "auto",
    **refine: Any,
):
    """Label the cells of `adata` with the fine-tuned model at `model_path` (or an `Annotator`); returns the AnnData
    with the fields of the module docstring written (`adata` itself, or a copy with copy=True).

    label_key: an obs column of known types; adds uns['scbert_predict']['metrics'] (see `score_annotations`).
    preprocess=True: `adata` holds counts (user_data.py): preprocessed onto the model's genes here, every cell kept
    (cells under min_genes expressed model genes `Unscored`). refine: the other fields of `Refinement` (mode,
    p_thres, majority_voting, over_clustering, min_prop, prefix).
    Raises ScbertError for a threshold outside [0, 1], other genes than the model's, or values that are not
    log2(1 + CP10K) (raw counts, negative or NaN values) without preprocess=True.
    """
    settings = Refinement(novel_type=novel_type, unassign_thres=unassign_thres, seed=seed, label_key=label_key,
                          **refine)
    settings.check()
    check_novel_method(novel_method)
    use_canal = novel_type and novel_method == "canal"
    annotator = (model_path if isinstance(model_path, Annotator)
                 else load_annotator(model_path, label_dict=label_dict, novel_type=novel_type))
    adata = adata.copy() if copy else adata
    query = make_query(adata, annotator, preprocess=preprocess, min_genes=min_genes, counts_from=counts_from)
    predictions = predict_cells(annotator.model, query.x, batch_size=batch_size, device=device, amp=amp,
                                embeddings=embeddings, ctx=ctx, progress=progress, first_hidden=use_canal)
    novelty = (canal_novel_cells(annotator.model, predictions, temperature=novel_temperature, seed=seed)
               if use_canal else None)
    params = annotation_params(annotator, novel_type=novel_type, unassign_thres=unassign_thres,
                               novel_method=novel_method if novel_type else None, batch_size=batch_size, amp=amp,
                               device=device, embeddings=embeddings, label_dict=label_dict, label_key=label_key,
                               preprocess=bool(preprocess), min_genes=int(min_genes) if preprocess else None)
    finish_annotations(query, annotator, predictions, settings, params, novelty=novelty)
    return adata


def check_novel_method(novel_method: str, *, attention: str = "none") -> None:
    """A known --novel_method; "canal" calls novel cells only once every cell is predicted, so it cannot feed the
    per-label attention means that are reduced while predicting."""
    if novel_method not in NOVEL_METHODS:
        raise ScbertError(f"--novel_method {novel_method!r} is not known: pass one of {', '.join(NOVEL_METHODS)}")
    if novel_method == "canal" and attention != "none":
        raise ScbertError("--attention groups cells by label while predicting, before --novel_method canal can call "
                          "novel cells (its threshold needs every cell): use --novel_method threshold with "
                          "--attention, or --attention none")


EMBEDDING_TEXT = "mean of final-norm encodings over expressed genes"


def annotation_params(annotator: Annotator, **settings: Any) -> dict[str, Any]:
    """uns['scbert_predict']['params']: the model's identity and the run's settings, as plain values."""
    ckpt, vocab = annotator.ckpt, annotator.model.vocab
    params = {
        "model_path": os.path.abspath(ckpt.path), "checkpoint_format": ckpt.source, "model_type": ckpt.model_type,
        "bin_num": int(vocab.bin_num) if hasattr(vocab, "bin_num") else None, "gene_num": int(vocab.gene_num),
        "pos_embed": bool(ckpt.config["g2v_position_emb"]) if "g2v_position_emb" in ckpt.config else None,
    }
    for key, value in settings.items():
        if key == "device":
            value = str(value)
        elif key == "embeddings":
            value = EMBEDDING_TEXT if value else None
        elif key == "label_dict" and value:
            value = os.path.abspath(value)
        params[key] = value
    return params


# ---------------------------------------------------------------------------------------------------------------------
# Attention received, reduced while predicting
# ---------------------------------------------------------------------------------------------------------------------


class AttentionSink:
    """Reduces per-batch attention scores: means per predicted type and overall; optionally every cell to a .npy.

    Under torchrun every rank reduces its own shard; `finish` sums the means' parts on rank 0, and each rank writes
    its rows of the per-cell file (made by rank 0 before prediction), which rank 0 renames once all are done."""

    def __init__(self, classes, n_cells, n_genes, *, novel_type, unassign_thres, cells_path=None,
                 ctx: DistContext | None = None):
        self.classes, self.novel_type, self.thres, self.ctx = list(classes), novel_type, unassign_thres, ctx
        self.means = GroupMeans(label_categories(classes, novel_type) + ["all_cells"], n_genes)
        self.cells = self.cells_tmp = None
        if cells_path is not None:
            self.cells_tmp = os.path.join(os.path.dirname(cells_path), f".{os.path.basename(cells_path)}.tmp.npy")
            if ctx is None or ctx.is_main:
                np.lib.format.open_memmap(self.cells_tmp, mode="w+", dtype=np.float32, shape=(n_cells, n_genes))
            if ctx is not None:
                barrier(ctx)
            self.cells = np.lib.format.open_memmap(self.cells_tmp, mode="r+")

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

    def _reduce(self) -> None:
        ctx = self.ctx
        if ctx is None or not ctx.distributed:
            return
        sums = torch.from_numpy(self.means.sums).to(ctx.device)
        counts = torch.from_numpy(self.means.counts).to(ctx.device)
        dist.all_reduce(sums)
        dist.all_reduce(counts)
        self.means.sums, self.means.counts = sums.cpu().numpy(), counts.cpu().numpy()

    def finish(self, gene_names: Sequence[str], csv_path: str | None, cells_path: str | None) -> pd.DataFrame | None:
        """Rank 0: the means table (genes x types called, then all_cells), written to csv_path unless None, and
        returned; other ranks return None."""
        self._reduce()
        if self.cells is not None:
            self.cells.flush()
            self.cells = None
        if self.ctx is not None:
            barrier(self.ctx)
        if self.ctx is not None and not self.ctx.is_main:
            return None
        table = pd.DataFrame(self.means.means().T, index=pd.Index(list(gene_names), name="gene"),
                             columns=self.means.groups)
        table = table.loc[:, self.means.counts > 0]  # only types some cell was called
        if csv_path is not None:
            atomic_write_bytes(csv_path, table.to_csv(float_format="%.6g").encode("utf-8"))
        if cells_path is not None:
            os.replace(self.cells_tmp, cells_path)
        return table
