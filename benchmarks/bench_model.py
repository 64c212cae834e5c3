"""Model throughput against this machine's matmul rate: inference, fine-tuning and pretraining steps, peak memory.

    python benchmarks/bench_model.py                                  # the default run (about 13 minutes on 2 cores)
    python benchmarks/bench_model.py --sizes demo                     # seconds
    python benchmarks/bench_model.py --sizes full --modes infer --dtypes fp32 --batch_sizes 8

One run first measures the matmul rate (float32 and bfloat16, best of a few square sizes, `--threads` threads, into
a preallocated output so that only arithmetic is timed), then runs every configuration (size x mode x dtype x batch)
in a fresh subprocess, so that each reports its own peak resident memory (`ru_maxrss`). Each subprocess measures
the matmul rate of its dtype again just before its model runs; a row's "% rate" divides its achieved GFLOP/s by the
larger of that and the run's figure (never flattering when the machine gets busier during the run). The machine is
shared and its speed moves from minute to minute (the same matmul drops from about 400 to about 210 GFLOP/s for a
second at a time), so a second figure pairs each step with the machine's speed at that moment: "% beside" takes a
quick matmul rate before the first timed step and after each one, divides each step's GFLOP/s by the faster of the
rates on either side of it, and reports the median over steps. Allocator variables (MALLOC_*) are removed from the
subprocesses' environment: figures are "out of the box".

FLOPs are counted analytically (`model_flops`, matmul FLOPs, 2 per multiply-add; elementwise work is not counted)
and cross-checked in the same run with `torch.utils.flop_counter.FlopCounterMode` on the plain path at a tiny size.
Per layer forward, n tokens, width D, h heads of d, m random features, feed-forward width 4D:
    q, k, v projections 3 * 2nD(hd); output projection 2n(hd)D; feed-forward 2 * 2nD(4D);
    feature maps of q and k 2 * 2nhdm; context k'^T v 2nhmd; q'(k'^T v) 2nhmd; denominator q'.sum(k') 2nhm.
Heads: LM Linear(D, 7) on every token; classification: the per-gene D->1 read-out and the MLP. A backward pass
costs, per matmul, its forward FLOPs once for each operand that needs a gradient (weights of trainable layers,
activations down to the lowest block that needs a gradient; the random projection never): a trainable block 2x,
the frozen last block 1x for its linear layers and 1x (features) / 2x (the rest) for its attention core. The
fast path recomputes the features in backward; those extra FLOPs are NOT counted (model FLOPs, like MFU).

Modes: infer = forward of the fine-tuned classifier without autograd (what predict.py runs); finetune = forward,
loss, backward and an Adam step with everything frozen except the last LayerNorm, block depth-2 and the head (as
finetune.py); pretrain = masked-bin LM forward/backward/Adam step with all blocks trainable.
Sizes: full = published scBERT (16,906 genes + 1, dim 200, depth 6, 10 heads of 64, 266 features); demo = DEMO.
Threads: `--threads auto` (default) lets each configuration choose them as the scripts do
(`performer_pytorch/cpu_threads.py`: 1 for small models, the free cores for large ones); a number fixes them.
Under load (`--loaded`, default: at the first batch size of each size, mode and dtype): the same process alternates
a phase alone with a phase beside one busy core (a `python -c "while True: pass"` process it starts and stops),
`--loaded_pairs` times, and reports both throughputs and their ratio (target: at least 40%). The machine may be
busy with other work as well: each phase records the cores other processes kept busy during it.
Results: a table on stdout and a JSON file (default benchmarks/results/bench_model.json).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from performer_pytorch import ClassificationHead, PerformerLM, cpu_threads, plain_attention  # noqa: E402
from utils import ScbertError, run_cli, str2bool  # noqa: E402

# Model sizes. The demo size is the one demo.py trains (small enough for a laptop); change it here if that changes.
FULL = dict(genes=16906, dim=200, depth=6, heads=10, dim_head=64)
DEMO = dict(genes=800, dim=64, depth=2, heads=4, dim_head=16)
SIZES = {"full": FULL, "demo": DEMO}
NUM_TOKENS = 7  # bins 0..5 and the mask token
N_CLASSES = 11
HEAD_HIDDEN, HEAD_H_DIM = 512, 128
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MODES = ("infer", "finetune", "pretrain")
MATMUL_SIZES = (1024, 2048, 3072)  # the run's rate; each worker re-measures with WORKER_MATMUL_SIZES
WORKER_MATMUL_SIZES = (1024, 2048)
BESIDE_MATMUL_SIZES = (2048,)  # the quick rate taken beside the timed steps
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "bench_model.json"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Benchmark the scBERT model against the machine's matmul rate", add_help=add_help)
    parser.add_argument("--sizes", default="full,demo", help="comma-separated: full, demo")
    parser.add_argument("--modes", default="infer,finetune,pretrain", help="comma-separated: infer, finetune, pretrain")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (bf16 = autocast)")
    parser.add_argument("--batch_sizes", default="1,2,4,8", help="cells per step")
    parser.add_argument(
        "--full_pretrain_batch_sizes",
        default="1,2",
        help="cells per step for pretraining at full size (a full-size pretraining step of 8 cells takes over a "
        "minute and about 15 GB); 'same' uses --batch_sizes",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed steps per configuration at full size, the fastest reported (default: 3 for inference, which is "
        "quick, 1 for training steps); each follows a warm-up step",
    )
    parser.add_argument("--min_seconds", type=float, default=1.0, help="demo size: repeat steps for this long")
    parser.add_argument(
        "--threads",
        default="auto",
        help="torch threads: 'auto' (default) chooses them as the scripts do (performer_pytorch/cpu_threads.py: by "
        "the model's size and the cores other processes leave free); a number fixes them (2 was the earlier default)",
    )
    parser.add_argument(
        "--loaded",
        default="first",
        choices=("none", "first", "all"),
        help="also time steps beside one busy core (a `while True: pass` process the benchmark starts and stops), "
        "alternating with unloaded steps in the same process: at the first batch size of each size, mode and dtype "
        "(default), at all, or none",
    )
    parser.add_argument(
        "--loaded_pairs",
        type=int,
        default=None,
        help="alone/loaded pairs per loaded configuration (default: 3 at demo size, 2 at full size)",
    )
    parser.add_argument(
        "--compare_plain", type=str2bool, default=True, help="also time the plain path (inference, batch 1)"
    )
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: run one configuration
    return parser


# ---------------------------------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------------------------------


def nb_features(dim_head: int) -> int:
    return int(dim_head * math.log(dim_head))


def model_flops(size: dict, mode: str) -> dict[str, float]:
    """Matmul FLOPs per cell: {"forward", "backward", "total"} (the formula is in the module docstring)."""
    n, dim, depth, h, d = size["genes"] + 1, size["dim"], size["depth"], size["heads"], size["dim_head"]
    m = nb_features(d)
    linear = 2 * n * dim * 3 * h * d + 2 * n * h * d * dim + 2 * 2 * n * dim * 4 * dim
    features = 2 * 2 * n * h * d * m
    products = 2 * n * h * m * d + 2 * n * h * m * d + 2 * n * h * m  # context, q'C, denominator
    if mode == "pretrain":
        head = 2 * n * dim * NUM_TOKENS
    else:
        head = 2 * n * dim + 2 * n * HEAD_HIDDEN + 2 * HEAD_HIDDEN * HEAD_H_DIM + 2 * HEAD_H_DIM * N_CLASSES
    forward = depth * (linear + features + products) + head
    core_backward = features + 2 * products
    if mode == "infer":
        backward = 0
    elif mode == "finetune":  # block depth-2 trainable, block depth-1 frozen (gradient flows through it)
        backward = (2 * linear + core_backward) + (linear + core_backward) + 2 * head
    else:
        backward = depth * (2 * linear + core_backward) + 2 * head
    return {"forward": float(forward), "backward": float(backward), "total": float(forward + backward)}


def build(size: dict, mode: str) -> tuple[PerformerLM, torch.optim.Optimizer | None]:
    """A randomly initialised model for `mode`, frozen as the training scripts freeze it, and its optimiser."""
    n = size["genes"] + 1
    gene2vec = torch.randn(size["genes"], size["dim"]) * 0.3
    model = PerformerLM(
        num_tokens=NUM_TOKENS,
        max_seq_len=n,
        dim=size["dim"],
        depth=size["depth"],
        heads=size["heads"],
        dim_head=size["dim_head"],
        gene2vec=gene2vec,
        lm_head=mode == "pretrain",
    )
    if mode != "pretrain":
        model.to_out = ClassificationHead(
            seq_len=n, dim=size["dim"], n_classes=N_CLASSES, h_dim=HEAD_H_DIM, hidden=HEAD_HIDDEN
        )
    if mode == "infer":
        return model.eval(), None
    if mode == "finetune":
        model.requires_grad_(False)
        for module in (model.norm, model.performer.net.layers[-2], model.to_out):
            module.requires_grad_(True)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    return model, torch.optim.Adam(trainable, lr=1e-4)


def random_batch(size: dict, batch: int, mode: str, generator: torch.Generator):
    """Tokens like real cells (about 90% of genes unexpressed, bins 1..5 otherwise, the appended 0) and labels."""
    n = size["genes"] + 1
    tokens = torch.randint(1, 6, (batch, n), generator=generator)
    tokens[torch.rand(batch, n, generator=generator) < 0.9] = 0
    tokens[:, -1] = 0
    if mode == "pretrain":  # 15% of positions masked (token 6); the loss is taken on those
        masked = torch.rand(batch, n, generator=generator) < 0.15
        labels = torch.where(masked, tokens, torch.full_like(tokens, -100))
        tokens = torch.where(masked, torch.full_like(tokens, NUM_TOKENS - 1), tokens)
        return tokens, labels
    return tokens, torch.randint(0, N_CLASSES, (batch,), generator=generator)


def step(model: PerformerLM, optimizer, tokens, labels, mode: str, dtype: torch.dtype) -> None:
    """One inference call or one training step (forward, loss, backward, optimiser step)."""
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16)
    if mode == "infer":
        with torch.no_grad(), autocast:
            model(tokens)
        return
    with autocast:
        logits = model(tokens)
    if mode == "pretrain":
        loss = F.cross_entropy(logits.float().reshape(-1, NUM_TOKENS), labels.reshape(-1), ignore_index=-100)
    else:
        loss = F.cross_entropy(logits.float(), labels)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def flop_counter_check() -> list[dict]:
    """Analytic FLOPs vs torch's FlopCounterMode on the plain path (whose matmuls are exactly the model's)."""
    from torch.utils.flop_counter import FlopCounterMode

    tiny = dict(genes=63, dim=16, depth=3, heads=2, dim_head=8)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for mode in MODES:
        torch.manual_seed(0)
        model, optimizer = build(tiny, mode)
        tokens, labels = random_batch(tiny, 1, mode, generator)
        counter = FlopCounterMode(display=False)
        with counter, plain_attention():
            step(model, optimizer, tokens, labels, mode, torch.float32)
        rows.append(
            dict(mode=mode, size=tiny, analytic=model_flops(tiny, mode)["total"], counted=counter.get_total_flops())
        )
    return rows


# ---------------------------------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------------------------------


def matmul_rate(dtype: torch.dtype, sizes: Sequence[int] = MATMUL_SIZES, repeats: int = 3) -> dict:
    """Best GFLOP/s of square matmuls into a preallocated output (so allocation and page faults are not timed)."""
    best = {}
    for size in sizes:
        a, b = torch.randn(size, size).to(dtype), torch.randn(size, size).to(dtype)
        out = torch.empty(size, size, dtype=dtype)
        torch.mm(a, b, out=out)
        seconds = min(_timed(lambda a=a, b=b, out=out: torch.mm(a, b, out=out)) for _ in range(repeats))
        best[size] = 2 * size**3 / seconds / 1e9
    return {"gflops": max(best.values()), "by_size": best}


def rate_now(dtype: torch.dtype) -> float:
    """A quick matmul rate (best of 3 at 2,048), taken between timed steps: how fast the machine is at that moment."""
    return matmul_rate(dtype, BESIDE_MATMUL_SIZES)["gflops"]


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def current_rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def run_configuration(config: dict) -> dict:
    """One (size, mode, dtype, batch, path) configuration in this process: times `repeats` steps after one warm-up
    step of the same batch; returns seconds per step (and the warm-up's) and peak resident memory.

    Why warm up with the same batch: steps of a run repeat, and training steps reuse their whole-cell tensors from the
    step before (performer_pytorch/buffers.py), so the first step at a batch size also pays for mapping that memory.
    Its time is reported as `warmup_seconds`."""
    auto = config["threads"] == "auto"
    torch.set_num_threads(cpu_threads.ceiling() if auto else int(config["threads"]))
    dtype = DTYPES[config["dtype"]]
    size, mode, batch = SIZES[config["size"]], config["mode"], config["batch"]
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    rate = matmul_rate(dtype, WORKER_MATMUL_SIZES)["gflops"]
    model, optimizer = build(size, mode)
    if auto:
        cpu_threads.configure_threads(model)
    threads_used = torch.get_num_threads()
    tokens, labels = random_batch(size, batch, mode, generator)
    gc.collect()
    rss_model = current_rss_mb()
    plain = config["path"] == "plain"
    # The rate beside each step: measured between timed steps (full size, where steps take seconds), or before and
    # after the whole loop (demo size, many short steps).
    between_steps = config["min_seconds"] <= 0
    with plain_attention() if plain else _nothing():
        warmup = _timed(lambda: step(model, optimizer, tokens, labels, mode, dtype))
        times, beside = [], [rate_now(dtype)]
        deadline = time.perf_counter() + config["min_seconds"]
        while len(times) < config["repeats"] or (config["min_seconds"] > 0 and time.perf_counter() < deadline):
            times.append(_timed(lambda: step(model, optimizer, tokens, labels, mode, dtype)))
            if between_steps:
                beside.append(rate_now(dtype))
        if not between_steps:
            beside.append(rate_now(dtype))
        under_load = loaded_pairs(model, optimizer, tokens, labels, config) if config.get("loaded_pairs") else None
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return dict(
        config,
        threads_used=threads_used,
        under_load=under_load,
        seconds=min(times),
        seconds_mean=sum(times) / len(times),
        step_seconds=times,
        matmul_gflops_beside=beside,
        warmup_seconds=warmup,
        steps=len(times),
        worker_matmul_gflops=rate,
        rss_after_build_mb=rss_model,
        peak_rss_mb=peak,
    )


class busy_core:
    """One other process keeping a core busy (`python -c "while True: pass"`) for the length of a `with` block."""

    def __enter__(self):
        self.process = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.3)  # running before the timing starts
        return self

    def __exit__(self, *exc):
        self.process.kill()
        self.process.wait()
        return False


def loaded_pairs(model, optimizer, tokens, labels, config: dict) -> dict:
    """Alternate a phase alone and a phase beside one busy core, `config["loaded_pairs"]` times: one step per phase
    at full size, steps for `min_seconds` at the demo size. With --threads auto, each phase starts by choosing the
    threads as a running script would after a few seconds of that load (`cpu_threads.configure_threads`).

    Returns per phase its seconds per step, its threads and the cores other processes kept busy during it (the
    benchmark's busy process included, and whatever else the machine ran); `ratio` is the median over pairs of
    loaded throughput over unloaded throughput."""
    dtype = DTYPES[config["dtype"]]
    auto = config["threads"] == "auto"
    phases: dict[str, list] = {"alone": [], "loaded": []}

    def phase(name: str) -> None:
        with busy_core() if name == "loaded" else _nothing():
            if auto:
                cpu_threads.configure_threads(model)
            meter = cpu_threads.LoadMeter()
            times = []
            deadline = time.perf_counter() + config["min_seconds"]
            while not times or (config["min_seconds"] > 0 and time.perf_counter() < deadline):
                times.append(_timed(lambda: step(model, optimizer, tokens, labels, config["mode"], dtype)))
            phases[name].append(
                dict(
                    seconds=statistics.median(times),
                    steps=len(times),
                    threads=torch.get_num_threads(),
                    others_busy=meter.others_busy(),
                )
            )

    for _ in range(config["loaded_pairs"]):
        phase("alone")
        phase("loaded")
    ratios = [a["seconds"] / b["seconds"] for a, b in zip(phases["alone"], phases["loaded"], strict=True)]
    return dict(phases, ratio=statistics.median(ratios), ratios=ratios)


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def spawn(config: dict) -> dict:
    """Run one configuration in a fresh interpreter without allocator tuning in its environment."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    if config["threads"] != "auto":
        env["OMP_NUM_THREADS"] = str(config["threads"])
    load_before = os.getloadavg()[0]
    result = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
        return dict(config, error=" | ".join(tail))
    row = json.loads(result.stdout.strip().splitlines()[-1])
    row["load_before"], row["load_after"] = load_before, os.getloadavg()[0]
    return row


# ---------------------------------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------------------------------


def finish_row(row: dict, run_rates: dict[str, float]) -> dict:
    """Add cells/s, FLOPs, achieved GFLOP/s and its fraction of the matmul rate."""
    if "error" in row:
        return row
    flops = model_flops(SIZES[row["size"]], row["mode"])
    rate = max(run_rates[row["dtype"]], row["worker_matmul_gflops"])
    achieved = flops["total"] * row["batch"] / row["seconds"] / 1e9
    beside = row["matmul_gflops_beside"]
    if len(beside) == len(row["step_seconds"]) + 1:  # step i lies between rates i and i + 1
        pairs = [
            flops["total"] * row["batch"] / seconds / 1e9 / max(before, after)
            for seconds, before, after in zip(row["step_seconds"], beside[:-1], beside[1:], strict=True)
        ]
    else:  # demo size: the fastest step against the faster of the rates before and after the loop
        pairs = [achieved / max(beside)]
    row.update(
        cells_per_s=row["batch"] / row["seconds"],
        seconds_per_cell=row["seconds"] / row["batch"],
        gflop_per_cell=flops["total"] / 1e9,
        gflop_forward_per_cell=flops["forward"] / 1e9,
        achieved_gflops=achieved,
        matmul_gflops_used=rate,
        fraction_of_matmul_rate=achieved / rate,
        fraction_of_rate_beside=statistics.median(pairs),
        peak_rss_mb_per_cell=row["peak_rss_mb"] / row["batch"],
    )
    return row


HEADER = (
    f"{'size':5} {'mode':8} {'dtype':5} {'path':5} {'batch':>5} {'s/step':>8} {'s/cell':>7} {'cells/s':>8} "
    f"{'GF/cell':>8} {'GF/s':>6} {'% rate':>6} {'% beside':>8} {'peak MB':>8} {'MB/cell':>8} {'load':>9}"
)


def format_row(row: dict) -> str:
    head = f"{row['size']:5} {row['mode']:8} {row['dtype']:5} {row['path']:5} {row['batch']:5d}"
    if "error" in row:
        return f"{head} failed: {row['error']}"
    return (
        f"{head} {row['seconds']:8.3f} {row['seconds_per_cell']:7.3f} {row['cells_per_s']:8.3f} "
        f"{row['gflop_per_cell']:8.1f} {row['achieved_gflops']:6.0f} {100 * row['fraction_of_matmul_rate']:5.1f}% "
        f"{100 * row['fraction_of_rate_beside']:7.1f}% "
        f"{row['peak_rss_mb']:8.0f} {row['peak_rss_mb_per_cell']:8.0f} "
        f"{row['load_before']:4.1f}/{row['load_after']:<4.1f}"
    )


# Issue 9's targets at full size, fast path: (mode, dtype, what, threshold).
TARGETS = [
    ("infer", "fp32", "fraction", 0.60),
    ("infer", "bf16", "fraction", 0.55),
    ("finetune", "fp32", "fraction", 0.55),
    ("infer", "fp32", "mb_per_cell_at_8", 300.0),
    ("infer", "bf16", "mb_per_cell_at_8", 300.0),
]


def target_lines(rows: list[dict]) -> list[str]:
    """One line per target that this run measured: the worst batch size for rates, batch 8 for memory."""
    lines = []
    for mode, dtype, what, threshold in TARGETS:
        mine = [
            r
            for r in rows
            if "error" not in r
            and r["size"] == "full"
            and r["path"] == "fast"
            and r["mode"] == mode
            and r["dtype"] == dtype
        ]
        if what == "fraction" and mine:
            for key, against in (
                ("fraction_of_matmul_rate", "the run's rate"),
                ("fraction_of_rate_beside", "the rate beside each step"),
            ):
                worst = min(mine, key=lambda r: r[key])
                value = worst[key]
                verdict = "met" if value >= threshold else "NOT met"
                lines.append(
                    f"full {mode} {dtype}: >= {threshold:.0%} of the {dtype} matmul rate, against {against}; worst "
                    f"over batch sizes {value:.1%} (batch {worst['batch']}, {worst['seconds_per_cell']:.2f} s/cell): "
                    f"{verdict}"
                )
        at_8 = [r for r in mine if r["batch"] == 8]
        if what == "mb_per_cell_at_8" and at_8:
            value = at_8[0]["peak_rss_mb_per_cell"]
            verdict = "met" if value < threshold else "NOT met"
            lines.append(
                f"full {mode} {dtype}: peak < {threshold:.0f} MB per cell at batch 8; {value:.0f} MB: {verdict}"
            )
    return lines


LOADED_HEADER = (
    f"{'size':5} {'mode':8} {'dtype':5} {'batch':>5} {'cells/s alone':>13} {'cells/s loaded':>14} {'ratio':>6} "
    f"{'thr':>5} {'busy':>9}"
)


def format_loaded_row(row: dict) -> str:
    load = row["under_load"]
    alone = statistics.median(row["batch"] / p["seconds"] for p in load["alone"])
    loaded = statistics.median(row["batch"] / p["seconds"] for p in load["loaded"])

    def most(phases, key):
        values = [p[key] for p in phases if p[key] is not None]
        return statistics.median(values) if values else float("nan")

    threads = f"{most(load['alone'], 'threads'):.0f}/{most(load['loaded'], 'threads'):.0f}"
    busy = f"{most(load['alone'], 'others_busy'):.1f}/{most(load['loaded'], 'others_busy'):.1f}"
    return (
        f"{row['size']:5} {row['mode']:8} {row['dtype']:5} {row['batch']:5d} {alone:13.2f} {loaded:14.2f} "
        f"{100 * load['ratio']:5.0f}% {threads:>5} {busy:>9}"
    )


LOADED_TARGET = 0.40  # issue 21: at least 40% of the unloaded throughput beside one busy core


def loaded_target_lines(rows: list[dict]) -> list[str]:
    lines = []
    for size in ("demo", "full"):
        mine = [r for r in rows if r.get("under_load") and r["size"] == size]
        if mine:
            worst = min(mine, key=lambda r: r["under_load"]["ratio"])
            ratio = worst["under_load"]["ratio"]
            verdict = "met" if ratio >= LOADED_TARGET else "NOT met"
            lines.append(
                f"{size} beside one busy core: >= {LOADED_TARGET:.0%} of the unloaded throughput; worst "
                f"{ratio:.0%} ({worst['mode']} {worst['dtype']} batch {worst['batch']}): {verdict}"
            )
    return lines


def other_cores_busy(seconds: float = 0.5) -> float:
    meter = cpu_threads.LoadMeter()
    time.sleep(seconds)
    return meter.others_busy() or 0.0


def configurations(args) -> list[dict]:
    def split(text: str, allowed) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if allowed is not None and s not in allowed]
        if bad or not items:
            raise ScbertError(f"unknown value(s) {bad or text!r}: choose from {', '.join(allowed)}")
        return items

    def batches(text: str) -> list[int]:
        try:
            values = [int(s) for s in text.split(",") if s.strip()]
        except ValueError as err:
            raise ScbertError(f"batch sizes must be integers like 1,2,4,8, got {text!r}") from err
        if not values or min(values) < 1:
            raise ScbertError(f"batch sizes must be positive integers like 1,2,4,8, got {text!r}")
        return values

    threads = str(args.threads).strip()
    if threads != "auto" and not (threads.isdigit() and int(threads) >= 1):
        raise ScbertError(f"--threads must be 'auto' or a positive number, got {args.threads!r}")
    base = dict(threads=threads)
    rows = []
    for size in split(args.sizes, SIZES):
        for mode in split(args.modes, MODES):
            for dtype in split(args.dtypes, DTYPES):
                sizes = batches(args.batch_sizes)
                if size == "full" and mode == "pretrain" and args.full_pretrain_batch_sizes != "same":
                    sizes = batches(args.full_pretrain_batch_sizes)
                paths = ["fast"]
                for batch in sizes:
                    for path in paths + (["plain"] if args.compare_plain and mode == "infer" and batch == 1 else []):
                        full = size == "full"
                        loaded = path == "fast" and (
                            args.loaded == "all" or (args.loaded == "first" and batch == sizes[0])
                        )
                        pairs = args.loaded_pairs if args.loaded_pairs is not None else (2 if full else 3)
                        rows.append(
                            dict(
                                base,
                                size=size,
                                mode=mode,
                                dtype=dtype,
                                batch=batch,
                                path=path,
                                repeats=3 if not full else args.repeats or (3 if mode == "infer" else 1),
                                min_seconds=0.0 if full else args.min_seconds,
                                loaded_pairs=pairs if loaded else 0,
                            )
                        )
    return rows


def print_flop_checks(configs: list[dict]) -> list[dict]:
    """Print the FLOP formula's check against torch's counter and the FLOPs per cell of each size asked for."""
    check = flop_counter_check()
    for c in check:
        print(
            f"FLOP check ({c['mode']} step, tiny model): analytic formula {c['analytic']:.6g}, "
            f"torch FlopCounterMode on the plain path {c['counted']:.6g} (ratio {c['counted'] / c['analytic']:.4f})",
            flush=True,
        )
    for size in sorted({c["size"] for c in configs}):
        for mode in MODES:
            f = model_flops(SIZES[size], mode)
            print(
                f"FLOPs per cell, {size} {mode}: forward {f['forward'] / 1e9:.1f} G + backward "
                f"{f['backward'] / 1e9:.1f} G = {f['total'] / 1e9:.1f} G",
                flush=True,
            )
    return check


def print_legend(loaded: bool) -> None:
    """What the table's columns mean."""
    print(
        "% rate: achieved GFLOP/s (fastest step) over max(run's matmul rate, the worker's own) of the same dtype; "
        "% beside: the median over steps of each step's GFLOP/s over the faster of the quick rates taken just before "
        "and just after it (demo size: the fastest step over the faster of the rates taken before and after its "
        "loop); peak MB: "
        "the process's peak resident memory (torch itself is about 250 MB); load: 1-minute load average "
        "before/after the configuration",
        flush=True,
    )
    if loaded:
        print(
            "under load: alone and beside one busy core (a process the benchmark starts and stops), alternating in "
            "one process; cells/s of each phase's median step, median over pairs; ratio: the median over pairs of "
            "loaded over alone throughput; thr: threads alone/loaded; busy: cores other processes kept busy during "
            "the phases (the benchmark's busy process included), alone/loaded",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = get_args_parser().parse_args(argv)
    if args.worker is not None:
        print(json.dumps(run_configuration(json.loads(args.worker))))
        return []
    configs = configurations(args)
    rate_threads = cpu_threads.ceiling() if configs[0]["threads"] == "auto" else int(configs[0]["threads"])
    torch.set_num_threads(rate_threads)
    started = time.time()
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"threads {args.threads} (matmul rates with {rate_threads}); load average {os.getloadavg()[0]:.2f}, "
        f"cores busy with other processes {other_cores_busy():.2f}",
        flush=True,
    )
    # Only the dtypes asked for: on a CPU without AVX-512 a bf16 matmul takes a slow path (about 1 GFLOP/s on an
    # AVX2-only AMD EPYC), so measuring it costs minutes.
    run_rates = {name: matmul_rate(DTYPES[name]) for name in DTYPES if name in {c["dtype"] for c in configs}}
    for name, rate in run_rates.items():
        by_size = ", ".join(f"{s}: {g:.0f}" for s, g in rate["by_size"].items())
        print(f"matmul rate {name}: {rate['gflops']:.0f} GFLOP/s (square sizes {by_size})", flush=True)
    check = print_flop_checks(configs)
    rates = {name: r["gflops"] for name, r in run_rates.items()}
    print(HEADER, flush=True)
    rows = []
    for config in configs:
        row = finish_row(spawn(config), rates)
        rows.append(row)
        print(format_row(row), flush=True)
    loaded = [r for r in rows if r.get("under_load")]
    if loaded:
        print(LOADED_HEADER, flush=True)
        for row in loaded:
            print(format_loaded_row(row), flush=True)
    for line in target_lines(rows) + loaded_target_lines(rows):
        print("target:", line, flush=True)
    print_legend(bool(loaded))
    report = dict(
        torch=torch.__version__,
        threads=args.threads,
        matmul_threads=rate_threads,
        cpu_count=os.cpu_count(),
        command=" ".join([Path(sys.argv[0]).name] + list(argv if argv is not None else sys.argv[1:])),
        seconds=time.time() - started,
        matmul=run_rates,
        flop_check=check,
        flop_formula=__doc__,
        sizes=SIZES,
        targets=target_lines(rows),
        results=rows,
    )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1, default=str))
    print(f"wrote {path} ({time.time() - started:.0f} s)")
    return rows


if __name__ == "__main__":
    run_cli(main)
