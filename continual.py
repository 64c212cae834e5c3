"""Continual annotation with CANAL: labelled datasets arrive in stages; the model keeps the cell types it knew and
learns the new ones (Wan et al., Brief Bioinform 2024; the method's parts are in canal.py).

    python continual.py --data_path stage1.h5ad stage2.h5ad stage3.h5ad --model_path pretrained.pth --model_name stream
    python continual.py --data_path stage4.h5ad --model_path ckpts/stream_stage3_best.pth   # later, as data arrive
    python continual.py ... --test_path test_a.h5ad test_b.h5ad --baselines sequential,joint

Each stage fine-tunes as finetune.py does (the final norm, the second-to-last block and the head train), from the
pretrained checkpoint at stage 1 and from the previous stage's best model after that, with CANAL's loss
(label-smoothed cross-entropy + distillation of the head's penultimate layer z towards the previous stage's frozen
model), its example bank replayed, and the head grown by the stage's new classes (appended in sorted order; old
classes keep their index). The new stage's cells are split 80/20 (stratified) for validation; the whole bank is
replayed in training. The best epoch by validation accuracy is kept whether or not early stopping fired.

Writes, in `--ckpt_dir` (rank 0, each file atomically; never over another run's files):
    <model_name>_stage<t>_best.pth   the stage's best model: config, genes, the ordered class list, the stage number
                                     and the example bank (CSR arrays and head-index labels as tensors; reads with
                                     torch.load(weights_only=True)): the next call needs nothing else
    <model_name>_stage<t>_<epoch>.pth, _log.jsonl, _metrics.json   as finetune.py's (rerunning resumes a stage)
    with --test_path: <model_name>_stream.json/.csv/_summary.csv/.png, every test set scored after every stage
    (see stream_metrics.py); a later call extends them
    with --baselines: the same for `<model_name>_sequential_stage<t>` (no bank, no distillation) and
    `<model_name>_joint` (all stages at once), in the same table
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import anndata as ad
import numpy as np
import scipy.sparse as sp
import torch

import canal
import finetune
from classification import grow_head, last_linear, make_splits, set_trainable, train_classifier
from data import CellDataset, build_loader, check_gene_num
from distributed import DistContext, cleanup_distributed, print0, setup_distributed, unwrap_model
from metrics import UNASSIGNED
from model_card import CARD_KEY
from models import ScbertPerformer, load_model
from optim import Amp
from performer_pytorch import load_checkpoint
from performer_pytorch.checkpoint import read_checkpoint_file
from run_state import named_checkpoint_path, save_training_checkpoint
from stream_metrics import StreamTable, stage_scores
from training import build_model_from_args, check_positive, evaluate
from utils import ScbertError, read_preprocessed, run_cli

METHODS = ("canal", "sequential", "joint")
STATE_KEY = "continual"  # the checkpoint entry holding the stream's state


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="CANAL continual annotation: fine-tune scBERT stage by stage on newly labelled .h5ad files.",
        parents=[finetune.get_args_parser(add_help=False)], add_help=add_help, conflict_handler="resolve",
    )
    parser.add_argument("--data_path", type=str, nargs="+", default=None,
                        help="one preprocessed, labelled .h5ad per stage, in arrival order")
    parser.add_argument("--model_path", type=str, default=None,
                        help="stage 1: a pretrained checkpoint; later calls: a <model_name>_stage<t>_best.pth, "
                             "whose class list, example bank and stage number the next stages continue from")
    group = parser.add_argument_group("continual (CANAL)")
    group.add_argument("--bank_size", type=int, default=canal.BANK_SIZE,
                       help="cells in the example bank replayed at later stages, an equal share per class seen "
                            "(CANAL: 1000); at least the number of classes")
    group.add_argument("--lambda_kd", type=float, default=canal.LAMBDA_KD,
                       help="distillation weight lambda; stage t uses lambda * old classes / all classes (CANAL: 0.1)")
    group.add_argument("--head_hidden", type=int, default=ScbertPerformer.HEAD_HIDDEN,
                       help="width of the head's first hidden layer (scBERT: 512; CANAL: 128)")
    group.add_argument("--head_h_dim", type=int, default=ScbertPerformer.HEAD_H_DIM,
                       help="width of the head's penultimate layer z, which is distilled and scores the bank "
                            "(scBERT: 128; CANAL: 64)")
    group.add_argument("--test_path", type=str, nargs="+", default=None,
                       help="labelled .h5ad test sets scored after every stage (accuracy and macro-F1 over the "
                            "classes seen so far, forgetting, and novel-cell scores for types not seen yet)")
    group.add_argument("--baselines", type=str, default="",
                       help="comma list of reference runs on the same stages and seeds: sequential (plain "
                            "fine-tuning stage after stage: no bank, no distillation), joint (all stages at once)")
    group.add_argument("--temperature", type=float, default=canal.TEMPERATURE,
                       help="energy temperature of the novel-cell score on test sets (CANAL: 0.8)")
    parser.set_defaults(model_name="stream", batch_size=14, grad_acc=1, learning_rate=2e-4,
                        label_smoothing=canal.LABEL_SMOOTHING, epoch=100, patience=10)
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# Stages, the stream's state, the bank as plain arrays
# ---------------------------------------------------------------------------------------------------------------------


@dataclass
class LabelledSet:
    """One labelled .h5ad: its path, a short name (file stem), X (cells, genes) CSR float32 and the label names."""

    path: str
    name: str
    x: sp.csr_matrix
    labels: np.ndarray


def read_labelled(path: str, *, genes: Sequence[str] | None, label_key: str, what: str) -> LabelledSet:
    """A preprocessed .h5ad with its label column, checked (genes, labels present, at least one cell)."""
    fix = "preprocess it with the model's gene list (preprocess.py --ref <checkpoint>)"
    adata = read_preprocessed(path, genes=genes, fix_genes=fix)
    if label_key not in adata.obs.columns:
        available = ", ".join(repr(str(c)) for c in adata.obs.columns[:30]) or "none"
        raise ScbertError(f"{what} {path!r} has no obs column {label_key!r} (its columns: {available}): pass the "
                          "column holding the cell types with --label_key")
    column = adata.obs[label_key]
    if bool(np.asarray(column.isna()).any()):
        raise ScbertError(f"{what} {path!r} has cells without a label in obs[{label_key!r}]: remove them or label them")
    labels = np.asarray(column.astype(str))
    if what != "test set" and UNASSIGNED in set(labels):
        raise ScbertError(f"{what} {path!r} has cells labelled {UNASSIGNED!r}, the name novel cells are given: rename "
                          "or remove them")
    names, counts = np.unique(labels, return_counts=True)
    if what != "test set" and (counts == 1).any():
        single = ", ".join(repr(str(n)) for n in names[counts == 1][:5])
        raise ScbertError(f"cell type {single} in {what} {path!r} has a single cell, which the stratified 80/20 split "
                          "cannot put in both training and validation: remove that cell or merge the type")
    name = os.path.splitext(os.path.basename(path))[0]
    return LabelledSet(path, name, adata.X, labels)


@dataclass
class StreamState:
    """What a stage's best checkpoint carries besides the model: stage number, ordered classes, the example bank.

    bank_x: (bank cells, genes) CSR float32 values or None; bank_labels: (bank cells,) int64 head indices.
    """

    stage: int
    classes: list[str]
    method: str
    bank_x: sp.csr_matrix | None = None
    bank_labels: np.ndarray | None = None
    complete: bool = True

    def payload(self) -> dict[str, Any]:
        """Plain tensors, lists and numbers only, so torch.load(weights_only=True) reads it."""
        out: dict[str, Any] = {"stage": int(self.stage), "classes": list(self.classes), "method": self.method,
                               "complete": bool(self.complete), "bank": None}
        if self.bank_x is not None:
            x = sp.csr_matrix(self.bank_x, dtype=np.float32)
            out["bank"] = {"data": torch.from_numpy(x.data.copy()),
                           "indices": torch.from_numpy(x.indices.astype(np.int64)),
                           "indptr": torch.from_numpy(x.indptr.astype(np.int64)), "shape": [int(s) for s in x.shape],
                           "labels": torch.from_numpy(np.asarray(self.bank_labels, dtype=np.int64))}
        return out

    @classmethod
    def from_payload(cls, state: dict[str, Any]) -> StreamState:
        bank = state.get("bank")
        x = labels = None
        if bank is not None:
            x = sp.csr_matrix((bank["data"].numpy(), bank["indices"].numpy(), bank["indptr"].numpy()),
                              shape=tuple(bank["shape"]))
            labels = bank["labels"].numpy().astype(np.int64)
        return cls(stage=int(state["stage"]), classes=list(state["classes"]), method=str(state["method"]),
                   bank_x=x, bank_labels=labels, complete=bool(state.get("complete", True)))


def read_stream_state(path: str) -> StreamState | None:
    """The stream state of a continual checkpoint, None for any other checkpoint (e.g. a pretrained one)."""
    state = read_checkpoint_file(path).get(STATE_KEY)
    return StreamState.from_payload(state) if isinstance(state, dict) else None


def stage_name(model_name: str, method: str, stage: int) -> str:
    return f"{model_name}_stage{stage}" if method == "canal" else f"{model_name}_{method}_stage{stage}"


def _completed(path: str) -> StreamState | None:
    if not os.path.exists(path):
        return None
    state = read_stream_state(path)
    return state if state is not None and state.complete else None


# ---------------------------------------------------------------------------------------------------------------------
# The model: z and logits; growth
# ---------------------------------------------------------------------------------------------------------------------


def stage_model(args, genes, n_classes: int, *, prev_path: str | None, n_old: int, resume_path: str | None):
    """Stage 1: the pretrained trunk of --model_path and a fresh head; later: the previous stage's model, its head
    grown by the new classes (old rows copied bit for bit); a resumed stage: its own epoch checkpoint's model."""
    if resume_path is not None:
        model = load_model(load_checkpoint(resume_path), head="checkpoint")
    elif prev_path is None:
        if not args.model_path:
            print("warning: no --model_path: stage 1 starts from random weights (the 'no pretraining' ablation)",
                  file=sys.stderr)
        model = build_model_from_args(args, genes, checkpoint_path=args.model_path, head="none")
        model.attach_head(n_classes, h_dim=args.head_h_dim, hidden=args.head_hidden)
    else:
        model = load_model(load_checkpoint(prev_path), head="checkpoint")
        grow_head(model, n_classes - n_old)
    set_trainable(model, args.unfreeze_layers)
    return model


# ---------------------------------------------------------------------------------------------------------------------
# One stage
# ---------------------------------------------------------------------------------------------------------------------


def _loss_step(teacher: canal.FrozenTeacher | None, n_old: int, lambda_kd: float, label_smoothing: float):
    """CANAL's loss as the run loop's loss_fn: through model(...), so DDP syncs every trainable parameter."""

    def step(model, batch):
        logits, z = model(batch, return_hidden=True)
        z_teacher = teacher.run(lambda m, b: m.classify(b, return_hidden=True)[1], batch) if teacher else None
        loss, parts = canal.canal_loss(logits, batch["label"], z, z_teacher, n_old=n_old if teacher else 0,
                                       lambda_kd=lambda_kd, label_smoothing=label_smoothing)
        return loss, {"correct": (logits.detach().argmax(dim=-1) == batch["label"]).sum(),
                      "kd_sum": parts["kd"] * batch["label"].shape[0]}

    return step


def _embed_step(first_hidden: bool):
    def step(model, batch):
        if first_hidden:  # the head's first hidden layer, which the novel-cell call mixes (scBERT's head)
            h, z, logits = canal.head_forward(model.head, model.encode(batch))
            return {"index": batch["index"], "h": h.float(), "z": z.float(), "logits": logits.float()}
        logits, z = model.classify(batch, return_hidden=True)
        return {"index": batch["index"], "z": z.float(), "logits": logits.float()}

    return step


def embed_cells(model, x: sp.csr_matrix, args, ctx: DistContext, amp: Amp, *, first_hidden: bool = False):
    """z and logits (and h with first_hidden) of every row of x as tensors in row order (eval mode, no gradients,
    sharded over ranks): z (cells, h_dim), logits (cells, classes), h (cells, hidden)."""
    dataset = CellDataset(x, vocab=unwrap_model(model).vocab)
    loader = build_loader(dataset, batch_size=args.batch_size, ctx=ctx, train=False, num_workers=args.num_workers)
    return evaluate(model, loader, _embed_step(first_hidden), ctx=ctx, amp=amp, desc="embed")


@dataclass
class StageData:
    """A stage's training matrix (new training cells, then the bank) with labels, and its validation cells."""

    x: sp.csr_matrix
    labels: np.ndarray
    train_idx: np.ndarray
    valid_idx: np.ndarray
    n_bank: int


def stage_data(new_x, new_labels, bank_x, bank_labels, seed: int) -> StageData:
    """80/20 stratified split of the new stage's cells; the whole bank goes to training."""
    train_idx, valid_idx = make_splits(new_labels, n_splits=1, seed=seed)[0]
    n_bank = 0 if bank_x is None else bank_x.shape[0]
    x = sp.vstack([new_x, bank_x]).tocsr() if n_bank else new_x
    labels = np.concatenate([new_labels, bank_labels]) if n_bank else new_labels
    train_idx = np.concatenate([train_idx, len(new_labels) + np.arange(n_bank)])
    return StageData(x, labels.astype(np.int64), train_idx, valid_idx, n_bank)


def train_stage(args, ctx: DistContext, *, method: str, stage_no: int, data: LabelledSet, genes: list[str],
                prev: StreamState | None, prev_path: str | None, name: str) -> StreamState:
    """Train one stage as `name`, build its bank, and write `<name>_best.pth` with the stream state; returns it."""
    classes = list(prev.classes) if prev else []
    new = sorted(set(data.labels) - set(classes))
    classes += new
    index = {c: i for i, c in enumerate(classes)}
    new_labels = np.array([index[c] for c in data.labels], dtype=np.int64)
    n_old = len(prev.classes) if prev else 0
    use_bank = method == "canal"
    bank_x = prev.bank_x if (prev and use_bank) else None
    bank_labels = prev.bank_labels if (prev and use_bank) else None
    split = stage_data(data.x, new_labels, bank_x, bank_labels, args.seed)
    print0(f"--- {method} stage {stage_no} ({data.name}): {len(data.labels)} cells, {len(new)} new classes "
           f"{new[:6]}{' ...' if len(new) > 6 else ''}; {len(classes)} classes; {len(split.train_idx)} train cells "
           f"({split.n_bank} from the bank), {len(split.valid_idx)} valid ---", ctx=ctx)

    run_args = copy.copy(args)
    run_args.model_name = name
    run_args.amsgrad = True  # CANAL: Adam with amsgrad
    teacher = None
    if prev_path is not None and method == "canal" and n_old:
        teacher = canal.FrozenTeacher(load_model(load_checkpoint(prev_path), head="checkpoint")).to(ctx.device)
    step = _loss_step(teacher, n_old, args.lambda_kd if method == "canal" else 0.0, args.label_smoothing)

    def make_model(resume_path):
        return stage_model(args, genes, len(classes), prev_path=prev_path, n_old=n_old, resume_path=resume_path)

    best_metrics = train_classifier(
        run_args, ctx, adata=ad.AnnData(split.x), genes=genes, classes=classes, labels=split.labels,
        train_idx=split.train_idx, valid_idx=split.valid_idx, make_model=make_model, loss_fn=step,
        clip_norm=finetune.GRAD_CLIP, settings={"stage": stage_no, "method": method, "classes": list(classes)})
    best_path = named_checkpoint_path(args.ckpt_dir, name, "best")
    best_ckpt = load_checkpoint(best_path)
    model = load_model(best_ckpt, head="checkpoint").to(ctx.device)

    amp = Amp(args.amp, ctx.device)
    core = model
    state = StreamState(stage=stage_no, classes=classes, method=method)
    if use_bank:
        pool_x = sp.vstack([bank_x, data.x]).tocsr() if bank_x is not None else data.x
        pool_labels = np.concatenate([bank_labels, new_labels]) if bank_x is not None else new_labels
        z = embed_cells(core, pool_x, args, ctx, amp)["z"]
        keep = canal.select_bank(z, pool_labels, last_linear(core.head)[2].weight, args.bank_size)
        state.bank_x, state.bank_labels = pool_x[keep], pool_labels[keep]
        counts = np.bincount(state.bank_labels, minlength=len(classes))
        shares = ", ".join(f"{c} {n}" for c, n in zip(classes, counts, strict=True))
        print0(f"example bank: {len(keep)} cells ({shares})", ctx=ctx)
    card = best_ckpt.payload.get(CARD_KEY)  # train_classifier's model card, kept in the re-save
    save_training_checkpoint(best_path, model=core, ctx=ctx, genes=genes, epoch=best_metrics["epoch"],
                             classes=classes, args=run_args, metrics=best_metrics, **{STATE_KEY: state.payload()},
                             **({CARD_KEY: card} if card is not None else {}))
    print0(f"stage {stage_no} done: {os.path.abspath(best_path)}", ctx=ctx)
    return state


# ---------------------------------------------------------------------------------------------------------------------
# Test sets
# ---------------------------------------------------------------------------------------------------------------------


def score_tests(model, tests: list[LabelledSet], classes: list[str], args, ctx, amp) -> dict[str, dict[str, Any]]:
    """Closed-set and open-set (CANAL's novel-cell call) scores of every test set over the classes seen so far."""
    core = unwrap_model(model)
    out = {}
    for test in tests:
        emb = embed_cells(core, test.x, args, ctx, amp, first_hidden=True)
        names = np.asarray(classes, dtype=object)
        closed = names[emb["logits"].argmax(dim=-1).numpy()]
        novelty = canal.canal_novelty(emb["h"].to(ctx.device),
                                      lambda h, head=core.head: canal.head_from_first_hidden(head, h)[1],
                                      temperature=args.temperature, seed=args.seed)
        opened = np.where(novelty.novel.cpu().numpy(), UNASSIGNED, closed)
        out[test.name] = stage_scores(test.labels, closed, classes, open_predicted=opened)
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The stream
# ---------------------------------------------------------------------------------------------------------------------


def _check_flags(args) -> None:
    if not args.data_path:
        raise ScbertError("no stage given: pass --data_path with one labelled .h5ad per stage")
    check_positive(args, "epoch", "batch_size", "grad_acc", "valid_every")
    if args.patience < 0:
        raise ScbertError(f"--patience must be 0 (never stop early) or more, got {args.patience}")
    if not 0.0 <= args.label_smoothing < 1.0:
        raise ScbertError(f"--label_smoothing must be in [0, 1), got {args.label_smoothing}")
    if args.n_splits != 1:
        raise ScbertError("--n_splits is not available in continual.py: each stage uses one 80/20 split")
    if args.lambda_kd < 0:
        raise ScbertError(f"--lambda_kd must be 0 or more, got {args.lambda_kd}")
    unknown = sorted(set(_baselines(args)) - {"sequential", "joint"})
    if unknown:
        raise ScbertError(f"--baselines {args.baselines!r} names {unknown}: use sequential, joint or both")


def _baselines(args) -> list[str]:
    return [b.strip() for b in str(args.baselines or "").split(",") if b.strip()]


def run_continual(args: argparse.Namespace) -> StreamTable | None:
    """Run every stage of --data_path (for CANAL and the asked baselines); returns the stream table (with tests)."""
    _check_flags(args)
    start_state = read_stream_state(args.model_path) if args.model_path else None
    first = start_state.stage + 1 if start_state else 1
    genes = load_checkpoint(args.model_path).genes if args.model_path else None
    stages = [read_labelled(p, genes=genes, label_key=args.label_key, what=f"stage {first + i}")
              for i, p in enumerate(args.data_path)]
    genes = genes or [str(g) for g in read_preprocessed(args.data_path[0]).var_names]
    check_gene_num(args.gene_num, len(genes), args.data_path[0])
    tests = [read_labelled(p, genes=genes, label_key=args.label_key, what="test set") for p in args.test_path or []]
    all_classes = set(start_state.classes if start_state else []).union(*(set(s.labels) for s in stages))
    if args.bank_size < len(all_classes):
        raise ScbertError(f"--bank_size {args.bank_size} is smaller than the {len(all_classes)} classes of the "
                          f"stream, so some class would keep no example: pass --bank_size {len(all_classes)} or more")
    ctx = setup_distributed(args)
    try:
        table = StreamTable.load(StreamTable(args.model_name).paths(args.ckpt_dir)["json"], args.model_name)
        methods = ["canal"] + [m for m in _baselines(args) if m == "sequential"]
        for method in methods:
            run_method(args, ctx, method, first, stages, genes, tests, table, start_state)
        if "joint" in _baselines(args):
            run_joint(args, ctx, first, stages, genes, tests, table, start_state)
        if tests:
            summary = {m: table.final(m) for m in table.methods()}
            for method, row in summary.items():
                forgetting = "n/a" if row["forgetting"] is None else f"{row['forgetting']:.4f}"
                print0(f"{method}: after stage {row['stage']}: average accuracy {row['average_accuracy']:.4f}, "
                       f"forgetting {forgetting}", ctx=ctx)
        return table
    finally:
        cleanup_distributed(ctx)


def _previous(args, method: str, first: int, start_state: StreamState | None) -> tuple[StreamState | None, str | None]:
    """The state and checkpoint the method's first stage continues from."""
    if first == 1:
        return None, None
    if method == "canal":
        return start_state, args.model_path
    path = named_checkpoint_path(args.ckpt_dir, stage_name(args.model_name, method, first - 1), "best")
    state = _completed(path)
    if state is None:
        raise ScbertError(f"the {method} baseline cannot continue at stage {first}: {path!r} is missing; run the "
                          "earlier stages with --baselines in the same --ckpt_dir, or drop --baselines")
    return state, path


def run_method(args, ctx, method, first, stages, genes, tests, table, start_state) -> None:
    prev, prev_path = _previous(args, method, first, start_state)
    for i, data in enumerate(stages):
        stage_no = first + i
        name = stage_name(args.model_name, method, stage_no)
        best_path = named_checkpoint_path(args.ckpt_dir, name, "best")
        done = _completed(best_path)
        if done is not None:
            print0(f"{method} stage {stage_no} is complete ({best_path}); going on", ctx=ctx)
            state = done
        else:
            state = train_stage(args, ctx, method=method, stage_no=stage_no, data=data, genes=genes, prev=prev,
                                prev_path=prev_path, name=name)
        if tests:
            _score(args, ctx, method, stage_no, best_path, state, tests, table)
        prev, prev_path = state, best_path


def run_joint(args, ctx, first, stages, genes, tests, table, start_state) -> None:
    """All stages' cells at once (one run from the pretrained model): the upper reference, scored at the last stage."""
    if start_state is not None:
        print0("joint baseline skipped: it needs every stage's data in one call (this call continues a stream)",
               ctx=ctx)
        return
    pooled = LabelledSet(path="", name="joint", x=sp.vstack([s.x for s in stages]).tocsr(),
                         labels=np.concatenate([s.labels for s in stages]))
    last = first + len(stages) - 1
    name = f"{args.model_name}_joint"
    best_path = named_checkpoint_path(args.ckpt_dir, name, "best")
    state = _completed(best_path) or train_stage(args, ctx, method="joint", stage_no=last, data=pooled, genes=genes,
                                                 prev=None, prev_path=None, name=name)
    if tests:
        _score(args, ctx, "joint", last, best_path, state, tests, table)


def _score(args, ctx, method, stage_no, best_path, state, tests, table) -> None:
    model = load_model(load_checkpoint(best_path), head="checkpoint").to(ctx.device)
    for test_name, scores in score_tests(model, tests, state.classes, args, ctx, Amp(args.amp, ctx.device)).items():
        table.add(method, stage_no, test_name, scores)
    if ctx.is_main:
        table.write(args.ckpt_dir)


def main(argv: Sequence[str] | None = None) -> StreamTable | None:
    args = get_args_parser().parse_args(argv)
    return run_continual(args)


if __name__ == "__main__":
    run_cli(main)
