"""Atlas-scale data path: shard write time, bytes per stored value, a 2-rank job's peak memory, loader vs model speed.

    python benchmarks/bench_shards.py                                   # 10^4, 10^5, 10^6 cells (~3 GB at 10^6)
    python benchmarks/bench_shards.py --sizes 10000,100000 --steps 100  # quicker

For each size, a synthetic corpus of N cells x 16,906 genes (the published gene count), about 1,000 stored values
per cell (gene columns drawn uniformly without repeats per cell, values log2(1 + CP10K)-like in [1, 9)), is written
with `shards.ShardWriter` (kind "scbert", 65,536 cells per shard) into `--out_dir`. Printed per size:

- write: seconds spent in the writer (the random generation is timed apart, as "generate");
- bytes per stored value: all shard files (row pointers, gene indices, values, obs tables) over the stored values;
- peak RSS per rank: VmHWM of each rank of `torchrun --nproc_per_node 2 pretrain.py --data_path <shards>` running
  `--max_steps` steps of a tiny Performer (dim 16, 1 block, batch 2 per rank) with `--valid_cells 64`, read from
  /proc while it runs (RssFile: mapped files, libraries included);
- prediction reader: what rank 0 of `predict.py --data_path <shards>` reads (`predict_stream.open_source`: every
  block of 16,384 cells and its cell names) in a fresh process, its cells/s and peak RSS (VmHWM: getrusage's
  maximum would include this parent's, which survives the exec), the model's forward passes left out (a full-size
  forward is about 307 GFLOP per cell: the model is the bottleneck by orders of magnitude);
- loader cells/s: one process on one thread iterating the training DataLoader (`CellDataset` over the corpus,
  `BlockShuffleSampler`, batch 8, no workers), against the model's cells/s: one full-size pretraining step (16,907
  tokens, dim 200, depth 6, batch 1, fp32) timed after a warm-up step, once per run.

The target of the issue: peak memory per rank at 10^6 cells within 1.3x of that at 10^4; the loader never the
bottleneck of a full-size step. Results: stdout and `--json` (default benchmarks/results/bench_shards.json).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shards import ShardCorpus, ShardWriter  # noqa: E402
from utils import ScbertError, run_cli, write_json  # noqa: E402

DEFAULT_JSON = ROOT / "benchmarks" / "results" / "bench_shards.json"
BLOCK = 16384
TINY = ["--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8", "--pos_embed", "False",
        "--batch_size", "2", "--grad_acc", "1", "--learning_rate", "1e-3"]


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Benchmark the shard corpus at atlas sizes", add_help=add_help)
    parser.add_argument("--sizes", default="10000,100000,1000000", help="comma-separated cell counts")
    parser.add_argument("--genes", type=int, default=16906, help="genes per cell (published: 16,906)")
    parser.add_argument("--nnz", type=int, default=1000, help="stored values per cell, about")
    parser.add_argument("--steps", type=int, default=200, help="optimiser steps of the 2-rank job (batch 2 per rank)")
    parser.add_argument("--loader_batches", type=int, default=300, help="batches timed in the loader measurement")
    parser.add_argument("--model_step", default="True", help="time a full-size pretraining step (True/False)")
    parser.add_argument("--out_dir", default="/tmp/bench_shards", help="where corpora are written (removed after)")
    parser.add_argument("--keep", default="False", help="keep the corpora (True/False)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="results file")
    return parser


def synthetic_block(rng: np.random.Generator, cells: int, genes: int, nnz: int) -> sp.csr_matrix:
    """(cells, genes) CSR float32: per cell ~nnz distinct sorted columns (1.05 nnz draws, repeats dropped) and
    values in [1, 9), like log2(1 + CP10K) of expressed genes."""
    draws = int(nnz * 1.05)
    cols = np.sort(rng.integers(0, genes, size=(cells, draws), dtype=np.int32), axis=1)
    keep = np.ones_like(cols, dtype=bool)
    keep[:, 1:] = cols[:, 1:] != cols[:, :-1]
    indptr = np.concatenate([[0], np.cumsum(keep.sum(axis=1))]).astype(np.int64)
    values = rng.uniform(1.0, 9.0, size=int(indptr[-1])).astype(np.float32)
    return sp.csr_matrix((values, cols[keep], indptr), shape=(cells, genes))


def write_corpus(folder: str, n_cells: int, genes: int, nnz: int, seed: int = 0) -> dict:
    """Write the synthetic corpus; returns generate/write seconds, stored values and bytes on disk."""
    rng = np.random.default_rng(seed)
    writer = ShardWriter(folder, [f"G{i}" for i in range(genes)], kind="scbert", params={"synthetic": True})
    generate = write = 0.0
    for start in range(0, n_cells, BLOCK):
        cells = min(BLOCK, n_cells - start)
        t0 = time.perf_counter()
        block = synthetic_block(rng, cells, genes, nnz)
        obs = pd.DataFrame({"celltype": np.where(np.arange(cells) % 2, "a", "b")},
                           index=[f"c{start + i}" for i in range(cells)])
        t1 = time.perf_counter()
        writer.add(block, obs)
        write += time.perf_counter() - t1
        generate += t1 - t0
    t1 = time.perf_counter()
    manifest = writer.close()
    write += time.perf_counter() - t1
    size = sum(f.stat().st_size for f in Path(folder).iterdir() if f.name != "manifest.json")
    return {"generate_s": generate, "write_s": write, "stored_values": manifest["nnz"], "bytes": size,
            "bytes_per_value": size / manifest["nnz"], "shards": len(manifest["shards"])}


def _descendants(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            children = (task / "children").read_text().split()
        except OSError:
            continue
        for child in map(int, children):
            found += [child, *_descendants(child)]
    return found


def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon, RssFile of a process in MB (empty when it is gone)."""
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "Name"):
            out[key] = value.strip() if key == "Name" else int(value.split()[0]) // 1024
    return out


def two_rank_job(folder: str, genes: int, steps: int, ckpt_dir: str) -> dict:
    """Peak memory of each rank of a 2-rank pretraining job on the corpus, polled from /proc twice a second."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
               "pretrain.py", "--data_path", folder, "--gene_num", str(genes), *TINY, "--max_steps", str(steps),
               "--valid_cells", "64", "--ckpt_dir", ckpt_dir, "--model_name", "bench"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    start = time.perf_counter()
    log_path = os.path.join(ckpt_dir, "job.log")  # a file, not a pipe: a full pipe would stop the job
    os.makedirs(ckpt_dir, exist_ok=True)
    log = open(log_path, "w")
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    peaks: dict[int, dict[str, int]] = {}
    while process.poll() is None:
        for pid in _descendants(process.pid):
            status = _status(pid)
            if str(status.get("Name", "")).startswith("python") and "VmHWM" in status:
                best = peaks.setdefault(pid, {})
                for key in ("VmHWM", "RssAnon", "RssFile"):
                    best[key] = max(best.get(key, 0), status.get(key, 0))
        time.sleep(0.5)
    log.close()
    with open(log_path) as fh:
        output = fh.read()
    if process.returncode != 0:
        raise ScbertError(f"the 2-rank job failed (exit {process.returncode}): {output[-2000:]}")
    ranks = sorted(peaks.values(), key=lambda p: -p["VmHWM"])[:2]  # the two workers (the launcher is smaller)
    return {"wall_s": time.perf_counter() - start, "peak_rss_mb": [r["VmHWM"] for r in ranks],
            "rss_anon_mb": [r["RssAnon"] for r in ranks], "rss_file_mb": [r["RssFile"] for r in ranks]}


def loader_rate(folder: str, batches: int) -> float:
    """Cells/s of the training DataLoader over the corpus in one process on one thread (tokens made, as training
    sees them)."""
    import torch

    from data import BlockShuffleSampler, CellDataset

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a DataLoader worker (torch gives each one thread), and the tiny models' policy
    corpus = ShardCorpus(folder)
    dataset = CellDataset(corpus, bin_num=5)
    sampler = BlockShuffleSampler(len(dataset), seed=1)
    sampler.set_epoch(1)
    loader = torch.utils.data.DataLoader(dataset, batch_size=8, sampler=sampler)
    start, cells = time.perf_counter(), 0
    for i, batch in enumerate(loader):
        cells += batch["tokens"].shape[0]
        if i + 1 >= batches:
            break
    rate = cells / (time.perf_counter() - start)
    torch.set_num_threads(threads)
    return rate


READER = """
import json, sys, time
sys.path.insert(0, {root!r})
import argparse
from annotate import load_annotator
from predict_stream import open_source
annotator = load_annotator({ckpt!r})
start = time.perf_counter()
source = open_source(argparse.Namespace(data_path={folder!r}, backed=False), annotator)
stored = 0
for first in range(0, source.n_obs, {block}):
    end = min(first + {block}, source.n_obs)
    stored += source.rows(first, end).nnz
    names = source.cell_ids(first, end)
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines() if ":" in line)
print(json.dumps({{"cells_per_s": source.n_obs / seconds, "stored": stored,
                   "peak_rss_mb": int(status["VmHWM"].split()[0]) // 1024}}))
"""


def tiny_classifier(path: str, genes: int) -> str:
    """A tiny fine-tuned checkpoint over the corpus's genes, for the prediction reader."""
    import torch

    from models import ScbertPerformer
    from performer_pytorch import ClassificationHead, checkpoint_payload, save_checkpoint

    torch.manual_seed(0)
    model = ScbertPerformer(num_tokens=7, max_seq_len=genes + 1, dim=16, depth=1, heads=2, dim_head=8,
                            g2v_position_emb=False)
    model.to_out = ClassificationHead(seq_len=genes + 1, dim=16, n_classes=2)
    save_checkpoint(checkpoint_payload(model, genes=[f"G{i}" for i in range(genes)], classes=["a", "b"], epoch=1),
                    path)
    return path


def prediction_reader(folder: str, ckpt: str, block: int) -> dict:
    """What predict.py on a shard folder reads (predict_stream.open_source, every block of `block` cells, the obs
    table), in a fresh process: its cells/s and peak RSS (the model's forward passes not included)."""
    code = READER.format(root=str(ROOT), ckpt=ckpt, folder=folder, block=block)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode != 0:
        raise ScbertError(f"the prediction reader failed: {done.stderr.strip()[-400:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def model_rate(genes: int) -> float:
    """Cells/s of one full-size pretraining step (batch 1, fp32, the scripts' CPU thread policy), after a warm-up
    step."""
    import torch

    import pretrain
    from models import build_model
    from performer_pytorch.cpu_threads import configure_threads

    torch.manual_seed(0)
    model = build_model("performer", dict(num_tokens=7, max_seq_len=genes + 1, dim=200, depth=6, heads=10,
                                          dim_head=64, g2v_position_emb=False))
    configure_threads(model, "cpu")  # the scripts' thread policy (training.wrap_model does the same)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    tokens = {"tokens": torch.randint(0, 6, (1, genes + 1))}
    times = []
    for _ in range(2):
        start = time.perf_counter()
        loss, _ = pretrain.masked_lm_loss(model, tokens, mask_prob=0.15, replace_prob=0.9, bin_num=5)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return 1.0 / times[-1]


def main(argv: Sequence[str] | None = None) -> dict:
    from utils import str2bool

    args = get_args_parser().parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",") if s.strip()]
    results: dict = {"machine": os.uname().nodename, "cpus": os.cpu_count(), "load_before": os.getloadavg(),
                     "genes": args.genes, "nnz_per_cell": args.nnz, "steps": args.steps, "sizes": {}}
    if str2bool(args.model_step):
        results["model_cells_per_s"] = model_rate(args.genes)
        print(f"full-size pretraining step (16,907 tokens, 6 x 200, batch 1, fp32): "
              f"{results['model_cells_per_s']:.3f} cells/s", flush=True)
    os.makedirs(args.out_dir, exist_ok=True)
    ckpt = tiny_classifier(os.path.join(args.out_dir, "tiny_classifier.pth"), args.genes)
    for n in sizes:
        folder = os.path.join(args.out_dir, f"corpus_{n}")
        shutil.rmtree(folder, ignore_errors=True)
        row = write_corpus(folder, n, args.genes, args.nnz)
        row["loader_cells_per_s"] = loader_rate(folder, args.loader_batches)
        row.update(two_rank_job(folder, args.genes, args.steps, os.path.join(args.out_dir, f"ckpt_{n}")))
        reader = prediction_reader(folder, ckpt, BLOCK)
        row.update(predict_reader_cells_per_s=reader["cells_per_s"], predict_reader_peak_rss_mb=reader["peak_rss_mb"])
        results["sizes"][str(n)] = row
        print(f"{n:>9,} cells: generate {row['generate_s']:.1f} s, write {row['write_s']:.1f} s, "
              f"{row['bytes_per_value']:.3f} bytes per stored value ({row['bytes'] / 1e9:.2f} GB, {row['shards']} "
              f"shards); loader {row['loader_cells_per_s']:.0f} cells/s; 2-rank job ({args.steps} steps, "
              f"{row['wall_s']:.0f} s) peak RSS per rank {row['peak_rss_mb']} MB (anon {row['rss_anon_mb']}, "
              f"file {row['rss_file_mb']}); prediction reader (blocks of {BLOCK:,}) "
              f"{row['predict_reader_cells_per_s']:.0f} cells/s, peak RSS {row['predict_reader_peak_rss_mb']} MB",
              flush=True)
        if not str2bool(args.keep):
            shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(os.path.join(args.out_dir, f"ckpt_{n}"), ignore_errors=True)
    first, last = results["sizes"][str(sizes[0])], results["sizes"][str(sizes[-1])]
    results["peak_ratio_last_vs_first"] = max(last["peak_rss_mb"]) / max(first["peak_rss_mb"])
    print(f"peak RSS per rank, {sizes[-1]:,} vs {sizes[0]:,} cells: {results['peak_ratio_last_vs_first']:.3f}x")
    results["predict_reader_ratio_last_vs_first"] = last["predict_reader_peak_rss_mb"] / first[
        "predict_reader_peak_rss_mb"]
    print(f"prediction reader's peak RSS, {sizes[-1]:,} vs {sizes[0]:,} cells: "
          f"{results['predict_reader_ratio_last_vs_first']:.3f}x")
    if "model_cells_per_s" in results:
        slowest = min(r["loader_cells_per_s"] for r in results["sizes"].values())
        print(f"slowest loader {slowest:.0f} cells/s = {slowest / results['model_cells_per_s']:.0f}x the model's")
    results["load_after"] = os.getloadavg()
    write_json(args.json, results)
    return results


if __name__ == "__main__":
    run_cli(main)
