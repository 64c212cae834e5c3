"""CANAL against naive sequential fine-tuning and joint training on a real PBMC stream: final average accuracy and
forgetting, in one run.

    python benchmarks/bench_continual.py                  # about 10-20 minutes on 2 CPU cores
    python benchmarks/bench_continual.py --epoch 3        # a quick look

Data: scanpy's bundled `pbmc68k_reduced` (700 PBMCs of Zheng68K, 10 sorted-population labels, offline), preprocessed
in-process (NCBI symbol revision, log2(1 + CP10K) over its own genes), its 10 types arriving over three stages
(`PBMC_STAGES`). A quarter of each type is held out as that stage's test set (`test_stage<t>`); every test set is
scored after every stage over the classes seen so far. A multi-study stream (CANAL's pancreas one) does not install
offline; continual.py takes one as it is (one .h5ad per study).

Model: a small Performer (the demo's size) pretrained for `--pretrain_epochs` on stage 1's cells only (later stages
are not seen before they arrive), without gene2vec. CANAL, sequential and joint start from the same checkpoint with
the same seed and flags. Printed, nothing asserted.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import run_cli  # noqa: E402

LABEL_KEY = "bulk_labels"
# 10 types over 3 stages: each stage brings common and rare types (counts in pbmc68k_reduced in brackets)
PBMC_STAGES = (
    ("CD14+ Monocyte", "CD34+", "CD56+ NK", "Dendritic"),  # 129, 13, 31, 240
    ("CD19+ B", "CD4+/CD45RO+ Memory", "CD8+ Cytotoxic T"),  # 95, 19, 54
    ("CD4+/CD25 T Reg", "CD4+/CD45RA+/CD25- Naive T", "CD8+/CD45RA+ Naive Cytotoxic"),  # 68, 8, 43
)
MODEL = {"dim": 64, "depth": 2, "heads": 4, "dim_head": 16}  # the demo's model


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("CANAL vs sequential vs joint on a PBMC stream", add_help=add_help)
    parser.add_argument("--out_dir", default="bench_continual_output", help="folder for the stream and the runs")
    parser.add_argument("--seed", type=int, default=2021)
    parser.add_argument("--epoch", type=int, default=20, help="epochs per stage (early stopping may end sooner)")
    parser.add_argument("--patience", type=int, default=5, help="early-stopping patience per stage")
    parser.add_argument("--pretrain_epochs", type=int, default=4, help="pretraining epochs on stage 1's cells")
    parser.add_argument("--bank_size", type=int, default=200, help="example bank (CANAL's 1000 exceeds these stages)")
    parser.add_argument("--learning_rate", type=float, default=1e-3,
                        help="peak learning rate (the demo's for this small model; CANAL's 2e-4 is for full size)")
    parser.add_argument("--batch_size", type=int, default=14, help="cells per step (CANAL: 14)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared or busy machine more threads mostly spin against others)")
    parser.add_argument("--test_fraction", type=float, default=0.25, help="share of each type held out as test")
    return parser


def write_pbmc_stream(out_dir: str, *, seed: int, test_fraction: float = 0.25, stages=PBMC_STAGES,
                      n_cells: int | None = None) -> tuple[list[str], list[str]]:
    """Preprocess pbmc68k_reduced and write stage<t>.h5ad (training cells) and test_stage<t>.h5ad per stage.

    n_cells: a stratified subsample first (for quick tests). Returns (stage paths, test paths).
    """
    from sklearn.model_selection import train_test_split

    from genes import revise_symbols
    from preprocess import load_pbmc68k_counts, preprocess_adata

    counts = load_pbmc68k_counts()
    if n_cells and n_cells < counts.n_obs:
        keep, _ = train_test_split(np.arange(counts.n_obs), train_size=n_cells, random_state=seed,
                                   stratify=np.asarray(counts.obs[LABEL_KEY]))
        counts = counts[np.sort(keep)].copy()
    revised, _ = revise_symbols(list(counts.var_names))
    reference = list(dict.fromkeys(s for s in revised if s is not None))
    data, _ = preprocess_adata(counts, reference, min_genes=100, reference_name="pbmc68k_reduced genes")
    labels = np.asarray(data.obs[LABEL_KEY]).astype(str)
    os.makedirs(out_dir, exist_ok=True)
    stage_paths, test_paths = [], []
    for t, types in enumerate(stages, start=1):
        members = np.flatnonzero(np.isin(labels, types))
        train, test = train_test_split(members, test_size=test_fraction, random_state=seed, stratify=labels[members])
        for kind, idx, paths in (("stage", train, stage_paths), ("test_stage", test, test_paths)):
            path = os.path.join(out_dir, f"{kind}{t}.h5ad")
            part = data[np.sort(idx)].copy()
            part.obs[LABEL_KEY] = part.obs[LABEL_KEY].astype(str)
            part.write_h5ad(path)
            paths.append(path)
    return stage_paths, test_paths


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    import anndata as ad
    import torch

    import continual
    import pretrain

    torch.set_num_threads(args.threads)
    out = os.path.abspath(args.out_dir)
    ckpts = os.path.join(out, "ckpts")
    start = time.perf_counter()
    stage_paths, test_paths = write_pbmc_stream(out, seed=args.seed, test_fraction=args.test_fraction)
    n_genes = ad.read_h5ad(stage_paths[0], backed="r").n_vars
    size = ["--gene_num", str(n_genes), *[f"--{k}={v}" for k, v in MODEL.items()], "--pos_embed", "False"]
    pre_name = f"pretrain_seed{args.seed}"
    pretrained = os.path.join(ckpts, f"{pre_name}_{args.pretrain_epochs}.pth")
    if not os.path.exists(pretrained):
        pretrain.main(["--data_path", stage_paths[0], *size, "--epoch", str(args.pretrain_epochs), "--batch_size",
                       "8", "--grad_acc", "1", "--learning_rate", "1e-3", "--seed", str(args.seed), "--ckpt_dir",
                       ckpts, "--model_name", pre_name])
    t_pre = time.perf_counter() - start
    name = f"pbmc_seed{args.seed}_e{args.epoch}"
    cmd = ["--data_path", *stage_paths, "--test_path", *test_paths, "--model_path", pretrained,
           "--label_key", LABEL_KEY, *size, "--epoch", str(args.epoch), "--patience", str(args.patience),
           "--learning_rate", str(args.learning_rate), "--batch_size", str(args.batch_size),
           "--bank_size", str(args.bank_size), "--seed", str(args.seed), "--ckpt_dir", ckpts, "--model_name", name,
           "--baselines", "sequential,joint"]
    print("continual.py " + " ".join(cmd), flush=True)
    table = continual.main(cmd)
    elapsed = time.perf_counter() - start
    print("\n" + "=" * 78)
    print(f"pbmc68k_reduced, 10 types over 3 stages {[len(s) for s in PBMC_STAGES]}; test = {args.test_fraction:.0%} "
          f"of each type; seed {args.seed}, {args.epoch} epochs per stage, bank {args.bank_size}")
    print(f"{'method':<12}{'final average accuracy':>24}{'final forgetting':>18}{'final macro-F1':>16}")
    results = {}
    for method in ("canal", "sequential", "joint"):
        row = table.final(method)
        results[method] = row
        forgetting = "n/a" if row["forgetting"] is None else f"{row['forgetting']:.3f}"
        print(f"{method:<12}{row['average_accuracy']:>24.3f}{forgetting:>18}{row['average_macro_f1']:>16.3f}")
    stages, tests, acc = table.matrix("canal")
    print("accuracy per stage (rows) x test set (columns), canal / sequential:")
    for method in ("canal", "sequential"):
        stages, tests, acc = table.matrix(method)
        for i, stage in enumerate(stages):
            cells = " ".join("   -  " if np.isnan(v) else f"{v:6.3f}" for v in acc[i])
            print(f"  {method:<11} stage {stage}: {cells}   ({', '.join(tests)})")
    print(f"wall time: pretraining {t_pre:.0f}s, total {elapsed:.0f}s; files in {ckpts}")
    print("=" * 78)
    return results


if __name__ == "__main__":
    run_cli(main)
