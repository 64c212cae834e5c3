"""The scGPT recipe in row blocks against the in-memory recipe: peak memory and time at two corpus sizes.

    python benchmarks/bench_scgpt_stream.py                      # 20,000 and 200,000 cells
    python benchmarks/bench_scgpt_stream.py --sizes 20000,60000  # quicker

For each size, synthetic raw counts (N cells x 20,000 genes, about 800 stored counts per cell, whole numbers 1..9,
8 donors) are written as one CSR `.h5ad`; then, each in a fresh process, with its peak RSS (VmHWM, polled from
/proc) and wall time:

- in memory: `preprocess.py --recipe scgpt --data_path <h5ad> --n_hvg 1200 --out_path <out>.h5ad` (the baseline,
  the published recipe's shape: the whole matrix, scanpy's HVGs, then the bins);
- in row blocks: the same flags with `--out_format shards --block_cells 16384` (`scgpt_stream.py`: the input read
  backed, HVGs from per-batch sums in two passes, a third pass to bin).

Printed per size, and the ratio of peaks between the sizes: the streamed recipe's should stay nearly flat while the
in-memory one grows with the corpus. Results: stdout and `--json` (default benchmarks/results/bench_scgpt_stream.json).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from bench_shards import _status, synthetic_block  # noqa: E402

from utils import ScbertError, run_cli, write_json  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "bench_scgpt_stream.json"
GENES, NNZ, DONORS, BLOCK = 20000, 800, 8, 16384


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Benchmark the scGPT recipe in row blocks against in memory", add_help=add_help)
    parser.add_argument("--sizes", default="20000,200000", help="comma-separated cell counts")
    parser.add_argument("--out_dir", default="/tmp/bench_scgpt_stream", help="where inputs and outputs go (removed)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="results file")
    return parser


def write_counts(path: str, n_cells: int, seed: int = 0) -> float:
    """The synthetic counts as a CSR .h5ad; returns seconds."""
    import anndata as ad
    import scipy.sparse as sp

    start = time.perf_counter()
    rng = np.random.default_rng(seed)
    blocks = [synthetic_block(rng, min(BLOCK, n_cells - s), GENES, NNZ) for s in range(0, n_cells, BLOCK)]
    x = sp.vstack(blocks, format="csr")
    x.data = np.ceil(x.data)  # whole numbers 1..9
    obs = pd.DataFrame({"donor_id": [f"d{i % DONORS}" for i in range(n_cells)]},
                       index=[f"c{i}" for i in range(n_cells)])
    ad.AnnData(X=x, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(GENES)])).write_h5ad(path)
    return time.perf_counter() - start


def peak_of(command: list[str]) -> dict:
    """Run a command; its peak RSS (VmHWM, MB, polled from /proc five times a second) and wall seconds."""
    start = time.perf_counter()
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "PYTHONWARNINGS": "ignore"})
    peak = 0
    while process.poll() is None:
        peak = max(peak, _status(process.pid).get("VmHWM", 0))
        time.sleep(0.2)
    error = process.stderr.read()
    if process.returncode != 0:
        raise ScbertError(f"{' '.join(command[1:3])} failed (exit {process.returncode}): {error[-1000:]}")
    return {"peak_rss_mb": peak, "wall_s": time.perf_counter() - start}


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "load_before": os.getloadavg(),
                     "genes": GENES, "nnz_per_cell": NNZ, "sizes": {}}
    os.makedirs(args.out_dir, exist_ok=True)
    recipe = [sys.executable, "preprocess.py", "--recipe", "scgpt", "--n_hvg", "1200", "--overwrite", "True"]
    for n in sizes:
        data = os.path.join(args.out_dir, f"counts_{n}.h5ad")
        row = {"write_s": write_counts(data, n)}
        row["in_memory"] = peak_of([*recipe, "--data_path", data, "--out_path",
                                    os.path.join(args.out_dir, f"binned_{n}.h5ad")])
        row["row_blocks"] = peak_of([*recipe, "--data_path", data, "--out_format", "shards", "--block_cells",
                                     str(BLOCK), "--out_path", os.path.join(args.out_dir, f"shards_{n}")])
        results["sizes"][str(n)] = row
        print(f"{n:>9,} cells: in memory {row['in_memory']['peak_rss_mb']:,} MB peak, "
              f"{row['in_memory']['wall_s']:.0f} s; row blocks {row['row_blocks']['peak_rss_mb']:,} MB peak, "
              f"{row['row_blocks']['wall_s']:.0f} s", flush=True)
        for name in os.listdir(args.out_dir):
            path = os.path.join(args.out_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    first, last = results["sizes"][str(sizes[0])], results["sizes"][str(sizes[-1])]
    for kind in ("in_memory", "row_blocks"):
        ratio = last[kind]["peak_rss_mb"] / first[kind]["peak_rss_mb"]
        results[f"{kind}_peak_ratio"] = ratio
        print(f"{kind.replace('_', ' ')}: peak RSS at {sizes[-1]:,} vs {sizes[0]:,} cells {ratio:.2f}x")
    results["load_after"] = os.getloadavg()
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    run_cli(main)
