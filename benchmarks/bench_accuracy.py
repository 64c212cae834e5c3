"""Annotation accuracy of the demo-sized scBERT against L1 logistic regression, by 5-fold cross-validation.

Data: scanpy's bundled `pbmc68k_reduced` (700 PBMCs of Zheng68K, 10 sorted-population labels, raw counts recovered
as in the demo), preprocessed by `preprocess.py` exactly as `demo.py` does (log2(1 + CP10K) over its own 751 genes).
Folds: `StratifiedKFold(5, shuffle=True, random_state=2021)` over all 700 cells; every method sees the same folds.

Per gene2vec variant (how `gene2vec.py` builds the gene identities; `--variants`):
  1. `gene2vec.py` on all 700 cells and `pretrain.py` on all 700 cells, without their labels (both unsupervised,
     so done once per variant; the test folds' expression is seen, never their labels), with the demo's settings;
  2. per fold, `finetune.py` on the fold's training cells (its own stratified 80/20 split of them for early
     stopping, as published) and `predict.py --novel_type False` on the fold's test cells, with the demo's settings.
`none` is `--pos_embed False`: no gene2vec at all, so a token says nothing about its gene (the floor).
Baseline: L1 logistic regression (liblinear, one-vs-rest, C = 0.1 fixed, as in the issue's anchor) on the same
log2(1 + CP10K) values of the same folds; and, as a check, on the anchor's input (all 765 genes, unrevised,
normalised over those 765), which gives the anchor's figures.

Scores: accuracy and macro-F1 (over the 10 classes) of each fold's test cells, mean and standard deviation
(numpy's, ddof 0) over folds. Every script is called through its own `main([...])`, in `--workers` processes of one
thread each (2 by default, one per core).

    .venv/bin/python benchmarks/bench_accuracy.py                     # zero, partners, none (about 17 min estimated)
    .venv/bin/python benchmarks/bench_accuracy.py --variants zero none --folds 2 --finetune_epochs 3   # a look
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

LABEL_KEY = "bulk_labels"
SEED = 2021
# The demo's model and schedule (demo.py): a 2-block, 64-wide Performer.
SIZE = ["--dim", "64", "--depth", "2", "--heads", "4", "--dim_head", "16"]
TRAIN = ["--batch_size", "8", "--grad_acc", "1", "--learning_rate", "1e-3"]
# gene2vec.py flags of each variant; None: --pos_embed False (no gene2vec at all).
VARIANTS: dict[str, list[str] | None] = {
    "zero": ["--partners", "0", "--fallback", "zero"],  # the earlier default: genes without a strong partner get 0
    "partners": ["--partners", "5", "--fallback", "random"],  # the default: every expressed gene trains with its 5
    # strongest partners, the rest get a distinct seeded random row
    "none": None,
    "random": ["--partners", "0", "--fallback", "random"],  # threshold pairs only, a random row for the rest
}
ANCHOR = "issue 15's anchor for L1 logistic regression, C = 0.1, on these folds: accuracy 0.791 +- 0.026, " \
         "macro-F1 0.617 +- 0.032"


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", nargs="+", default=["zero", "partners", "none"], choices=list(VARIANTS),
                        help="gene2vec variants to compare (none: --pos_embed False, the floor; random, threshold "
                        "pairs plus random rows, is not in the default)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds (5)")
    parser.add_argument("--pretrain_epochs", type=int, default=4, help="pretraining epochs (the demo's 4)")
    parser.add_argument("--finetune_epochs", type=int, default=10,
                        help="fine-tuning epochs (10, half the demo's 20, so that 3 variants x 5 folds fit in about 20 "
                        "minutes on 2 cores; the warm-up ends at epoch 5)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each (2: one per core)")
    parser.add_argument("--out_dir", default=None,
                        help="keep every file here (default: a temporary folder); rerunning with the same folder "
                        "and settings reuses the pretrainings and folds already finished there")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--finished_only", action="store_true",
                        help="with --out_dir: run nothing new, summarise the pretrainings and folds finished there "
                        "(the table then says how many folds each row holds)")
    return parser


# ---------------------------------------------------------------------------------------------------------------
# Jobs, each run in a worker process through a script's main([...]), its output kept in a log file


def _quiet_call(log_path: str, module: str, argv: list[str]):
    import importlib

    import torch

    torch.set_num_threads(1)
    with open(log_path, "w") as log, contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
        return importlib.import_module(module).main(argv)


def _pretrain_job(job: dict) -> dict:
    start = time.perf_counter()
    out = Path(job["dir"])
    if (out / f"pretrain_{job['epochs']}.pth").exists():  # a finished pretraining in --out_dir is reused
        return {"variant": job["variant"], "seconds": 0.0}
    for stale in out.glob("pretrain_*"):  # an interrupted one starts over
        stale.unlink()
    argv = ["--data_path", job["data"], "--gene_num", str(job["genes"]), *SIZE, "--epoch", str(job["epochs"]),
            *TRAIN, "--seed", str(SEED), "--ckpt_dir", str(out), "--model_name", "pretrain", "--resume", "False"]
    if job["gene2vec"] is None:
        argv += ["--pos_embed", "False"]
    else:
        g2v = str(out / "gene2vec.npy")
        _quiet_call(str(out / "gene2vec.log"), "gene2vec", [
            "--data_path", job["data"], "--ref", job["ref"], "--out_path", g2v, "--dim", "64", "--seed", str(SEED),
            "--overwrite", "True", *job["gene2vec"]])
        argv += ["--gene2vec_path", g2v]
    _quiet_call(str(out / "pretrain.log"), "pretrain", argv)
    return {"variant": job["variant"], "seconds": time.perf_counter() - start}


def _fold_job(job: dict) -> dict:
    start = time.perf_counter()
    out = Path(job["dir"])
    pretrained = str(Path(job["pretrain_dir"]) / f"pretrain_{job['pretrain_epochs']}.pth")
    pred = str(out / "test_predictions.h5ad")
    if not os.path.exists(pred):  # else a finished fold in --out_dir is reused
        for stale in out.glob("finetune*"):
            stale.unlink()
        _finetune_and_predict(job, out, pretrained, pred)
    import anndata as ad

    predicted = np.asarray(ad.read_h5ad(pred).obs["scbert_celltype"]).astype(str)
    return {"variant": job["variant"], "fold": job["fold"], "pred": predicted.tolist(),
            "seconds": time.perf_counter() - start}


def _finetune_and_predict(job: dict, out: Path, pretrained: str, pred: str) -> None:
    argv = ["--data_path", job["train"], "--label_key", LABEL_KEY, "--model_path", pretrained,
            "--gene_num", str(job["genes"]), *SIZE, "--epoch", str(job["epochs"]), *TRAIN, "--seed", str(SEED),
            "--ckpt_dir", str(out), "--model_name", "finetune", "--resume", "False"]
    if job["variant"] == "none":
        argv += ["--pos_embed", "False"]
    _quiet_call(str(out / "finetune.log"), "finetune", argv)
    _quiet_call(str(out / "predict.log"), "predict", [
        "--data_path", job["test"], "--model_path", str(out / "finetune_best.pth"), "--novel_type", "False",
        "--out_path", pred, "--overwrite", "True"])


# ---------------------------------------------------------------------------------------------------------------


def scores(truth: np.ndarray, pred: np.ndarray, classes: list[str]) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(truth, pred)),
            "macro_f1": float(f1_score(truth, pred, labels=classes, average="macro", zero_division=0))}


def logistic_regression(x_train, y_train, x_test) -> np.ndarray:
    """L1 logistic regression, liblinear, one-vs-rest, C = 0.1 (the independent re-evaluation's baseline)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier

    model = OneVsRestClassifier(LogisticRegression(l1_ratio=1.0, C=0.1, solver="liblinear", max_iter=1000))
    return model.fit(x_train, y_train).predict(x_test)


def summarise(per_fold: list[dict[str, float] | None]) -> dict:
    """Mean and standard deviation over the folds that ran (None: a fold not run, with --finished_only)."""
    done = [fold for fold in per_fold if fold is not None]
    out: dict = {"n_folds": len(done), "folds_run": [k for k, fold in enumerate(per_fold) if fold is not None]}
    for key in ("accuracy", "macro_f1"):
        values = np.array([fold[key] for fold in done]) if done else np.full(1, np.nan)
        out[key] = {"mean": float(values.mean()), "std": float(values.std()), "folds": values.round(4).tolist()}
    return out


def prepare(work: Path) -> tuple[str, str, object]:
    """Counts -> reference list -> preprocess.py, as demo.py does; returns (preprocessed path, ref path, AnnData)."""
    import anndata as ad

    import preprocess
    from demo import write_reference_genes

    counts = preprocess.load_pbmc68k_counts()
    counts_path, ref_path, prep_path = work / "counts.h5ad", work / "reference_genes.txt", work / "cells.h5ad"
    counts.write_h5ad(counts_path)
    write_reference_genes(counts.var_names, str(ref_path))
    _quiet_call(str(work / "preprocess.log"), "preprocess", [
        "--data_path", str(counts_path), "--ref", str(ref_path), "--out_path", str(prep_path), "--min_genes", "100",
        "--overwrite", "True"])
    return str(prep_path), str(ref_path), ad.read_h5ad(prep_path)


def run(args: argparse.Namespace, work: Path) -> dict:
    from sklearn.model_selection import StratifiedKFold

    t0 = time.perf_counter()
    data_path, ref_path, data = prepare(work)
    labels = np.asarray(data.obs[LABEL_KEY]).astype(str)
    classes = sorted(set(labels))
    folds = list(StratifiedKFold(args.folds, shuffle=True, random_state=SEED).split(np.zeros(len(labels)), labels))
    print(f"{data.n_obs} cells x {data.n_vars} genes, {len(classes)} types; {args.folds} stratified folds (seed "
          f"{SEED}); variants {', '.join(args.variants)}; {args.workers} workers", flush=True)

    fold_files = []
    for k, (train, test) in enumerate(folds):
        paths = (str(work / f"fold{k}_train.h5ad"), str(work / f"fold{k}_test.h5ad"))
        data[np.sort(train)].copy().write_h5ad(paths[0])
        data[np.sort(test)].copy().write_h5ad(paths[1])
        fold_files.append(paths)

    start = time.perf_counter()
    baseline = []
    x = data.X.tocsr()
    for train, test in folds:
        pred = logistic_regression(x[np.sort(train)], labels[np.sort(train)], x[np.sort(test)])
        baseline.append(scores(labels[np.sort(test)], pred, classes))
    # The anchor's input: all 765 genes of pbmc68k_reduced, unrevised, log2(1 + CP10K) over them.
    import scanpy as sc

    import preprocess

    full = preprocess.load_pbmc68k_counts()
    sc.pp.normalize_total(full, target_sum=1e4)
    sc.pp.log1p(full, base=2)
    full_x, full_labels = full.X.tocsr(), np.asarray(full.obs[LABEL_KEY]).astype(str)
    assert np.array_equal(full_labels, labels), "preprocess.py kept every cell in order"
    baseline_765 = [scores(labels[np.sort(test)], logistic_regression(full_x[np.sort(train)], labels[np.sort(train)],
                                                                         full_x[np.sort(test)]), classes)
                    for train, test in folds]
    baseline_s = time.perf_counter() - start

    context = multiprocessing.get_context("spawn")
    timings: dict[str, float] = {}
    with context.Pool(args.workers) as pool:
        jobs = []
        for variant in args.variants:
            folder = work / f"{variant}_pretrain{args.pretrain_epochs}"  # settings in the name: reuse is safe
            folder.mkdir(exist_ok=True)
            jobs.append({"variant": variant, "dir": str(folder), "data": data_path, "ref": ref_path,
                         "genes": data.n_vars, "epochs": args.pretrain_epochs, "gene2vec": VARIANTS[variant]})
        if args.finished_only:
            jobs = [j for j in jobs if (Path(j["dir"]) / f"pretrain_{j['epochs']}.pth").exists()]
        for done in pool.imap_unordered(_pretrain_job, jobs):
            timings[f"pretrain {done['variant']}"] = done["seconds"]
            print(f"  pretrained {done['variant']} ({done['seconds']:.0f} s)", flush=True)
        jobs = []
        # Fold by fold, so that an interrupted run has compared every variant on the same folds.
        for k, (train_path, test_path) in enumerate(fold_files):
            for variant in args.variants:
                pretrain_dir = work / f"{variant}_pretrain{args.pretrain_epochs}"
                folder = pretrain_dir / f"fold{k}_of{args.folds}_finetune{args.finetune_epochs}"
                folder.mkdir(exist_ok=True)
                jobs.append({"variant": variant, "fold": k, "dir": str(folder), "train": train_path,
                             "test": test_path, "pretrain_dir": str(pretrain_dir), "genes": data.n_vars,
                             "pretrain_epochs": args.pretrain_epochs, "epochs": args.finetune_epochs})
        if args.finished_only:
            jobs = [j for j in jobs if (Path(j["dir"]) / "test_predictions.h5ad").exists()]
        results: dict[str, list] = {v: [None] * len(folds) for v in args.variants}
        for done in pool.imap_unordered(_fold_job, jobs):
            test = np.sort(folds[done["fold"]][1])
            results[done["variant"]][done["fold"]] = scores(labels[test], np.asarray(done["pred"]), classes)
            timings[f"finetune {done['variant']} fold {done['fold']}"] = done["seconds"]
            print(f"  {done['variant']} fold {done['fold']}: accuracy "
                  f"{results[done['variant']][done['fold']]['accuracy']:.3f} ({done['seconds']:.0f} s)", flush=True)

    table = {f"scBERT, gene2vec {v}" if v != "none" else "scBERT, --pos_embed False (floor)": summarise(results[v])
             for v in args.variants}
    table["L1 logistic regression (C = 0.1)"] = summarise(baseline)
    table["L1 LR, all 765 genes unrevised (anchor)"] = summarise(baseline_765)
    return {"table": table, "folds": args.folds, "seed": SEED, "cells": int(data.n_obs), "genes": int(data.n_vars),
            "pretrain_epochs": args.pretrain_epochs, "finetune_epochs": args.finetune_epochs,
            "baseline_seconds": baseline_s, "timings_s": timings, "total_s": time.perf_counter() - t0}


def print_table(result: dict) -> None:
    print("\n" + "=" * 100)
    print(f"pbmc68k_reduced, {result['cells']} cells x {result['genes']} genes, {result['folds']}-fold stratified CV "
          f"(seed {result['seed']}); demo-sized scBERT, pretrain {result['pretrain_epochs']} / fine-tune "
          f"{result['finetune_epochs']} epochs")
    print(f"{'method':<44}{'accuracy':>20}{'macro-F1':>20}   per-fold accuracy (folds)")
    for method, row in result["table"].items():
        acc, f1 = row["accuracy"], row["macro_f1"]
        print(f"{method:<44}{acc['mean']:>12.3f} +- {acc['std']:.3f}{f1['mean']:>12.3f} +- {f1['std']:.3f}   "
              f"{' '.join(f'{v:.3f}' for v in acc['folds'])} ({','.join(map(str, row['folds_run']))})")
    print(ANCHOR)
    print(f"total {result['total_s'] / 60:.1f} min")
    print("=" * 100)


def main(argv: list[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    if args.out_dir:
        work = Path(args.out_dir)
        work.mkdir(parents=True, exist_ok=True)
        result = run(args, work)
    else:
        with tempfile.TemporaryDirectory(prefix="bench_accuracy_") as tmp:
            result = run(args, Path(tmp))
    print_table(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return result


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
