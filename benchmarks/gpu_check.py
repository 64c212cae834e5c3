"""One check of the CUDA path (about 5 minutes on one GPU): parity, timings, host syncs, fp16 overflow, NCCL.

    python benchmarks/gpu_check.py                                   # on a machine with a CUDA GPU
    python benchmarks/gpu_check.py --device cpu --size tiny --parts parity   # the part a CPU can run (seconds)

Parts (`--parts`, comma-separated, in this order):
- parity: fast path against plain path (`plain_attention()`) on the same weights and cells, pretraining mode (every
  block trainable), in float32 and under bf16 autocast: the largest relative difference of the LM logits and of
  every parameter's gradient. At `--size full` the cells are 16,907 tokens long.
- timing: inference, fine-tuning and pretraining steps (as `bench_model.py` runs them) at batch 1, 8 and 32 with
  the peak GPU memory of each (`torch.cuda.max_memory_allocated`); a batch that runs out of memory is reported as
  such.
- profile: one fine-tuning step at batch 1 under `torch.profiler`: kernel launches and host-device syncs
  (cudaStreamSynchronize / cudaDeviceSynchronize / cudaEventSynchronize and blocking copies to the host) per cell.
  Many launches per cell mean the per-cell Python loops leave the GPU waiting for the host.
- fp16: pretraining steps under float16 autocast with a GradScaler on full-length random cells: whether logits and
  the loss stay finite (fp16 ends at 65,504, and the attention's chunk sums over 16,907 tokens can pass it), the
  largest |logit| difference from float32, and how many steps the scaler skipped.
- nccl: the two-process pretraining test (`pretrain.py` under torchrun on tiny data, NCCL backend); it needs two
  GPUs, since NCCL refuses two ranks on one device, and says so when there is one.
Results: printed, and a JSON file (`--json`, default benchmarks/results/gpu_check.json).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_model  # noqa: E402

from performer_pytorch import plain_attention  # noqa: E402
from utils import ScbertError, run_cli  # noqa: E402

TINY = dict(genes=63, dim=16, depth=2, heads=2, dim_head=8)
SIZES = {"full": bench_model.FULL, "demo": bench_model.DEMO, "tiny": TINY}
PARTS = ("parity", "timing", "profile", "fp16", "nccl")
AMP = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "gpu_check.json"


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Check the CUDA path: parity, timings, syncs, fp16, NCCL", add_help=add_help)
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (the parity part on a small size)")
    parser.add_argument("--size", default="full", choices=sorted(SIZES), help="model size of every part but nccl")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated: {', '.join(PARTS)}")
    parser.add_argument("--batch_sizes", default="1,8,32", help="cells per step in the timing part")
    parser.add_argument("--fp16_steps", type=int, default=8, help="pretraining steps in the fp16 part")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    return parser


def autocast(device: torch.device, name: str):
    dtype = AMP[name]
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def train_step(model, optimizer, tokens, labels, mode: str, device: torch.device, amp: str, scaler=None):
    """One step as bench_model.step, on any device: forward under `amp`, loss, backward, optimiser step."""
    if mode == "infer":
        with torch.no_grad(), autocast(device, amp):
            return model(tokens)
    with autocast(device, amp):
        logits = model(tokens)
    if mode == "pretrain":
        loss = F.cross_entropy(logits.float().reshape(-1, bench_model.NUM_TOKENS), labels.reshape(-1))
    else:
        loss = F.cross_entropy(logits.float(), labels)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return logits.detach(), loss.detach()


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def parity(size: dict, device: torch.device, amp: str, *, batch: int = 1, seed: int = 0) -> dict:
    """Fast path vs plain path, pretraining mode, same weights and cells: the largest relative difference (max
    |difference| over max |plain value|) of the logits and of the worst parameter's gradient. Under an autocast
    dtype the same figures for the plain path under it against the plain path in float32 (`*_noise`) tell how far
    that dtype's rounding alone moves them."""
    torch.manual_seed(seed)
    model, _ = bench_model.build(size, "pretrain")
    model.to(device)
    model.performer.feature_redraw_interval = None  # every call must see the same projection
    tokens, labels = bench_model.random_batch(size, batch, "pretrain", torch.Generator().manual_seed(seed))
    tokens, labels = tokens.to(device), labels.to(device)

    def run(route: str, dtype: str):
        model.zero_grad(set_to_none=True)
        with plain_attention() if route == "plain" else _nothing(), autocast(device, dtype):
            logits = model(tokens)
        loss = F.cross_entropy(logits.float().reshape(-1, bench_model.NUM_TOKENS), labels.reshape(-1))
        loss.backward()
        grads = {n: p.grad.detach().float().clone() for n, p in model.named_parameters() if p.grad is not None}
        return logits.detach().float(), grads

    def compare(one, other) -> tuple[float, float, str]:
        worst = max(other[1], key=lambda n: _relative(one[1][n], other[1][n]))
        return _relative(one[0], other[0]), _relative(one[1][worst], other[1][worst]), worst

    fast, plain = run("fast", amp), run("plain", amp)
    logits_rel, grad_rel, worst = compare(fast, plain)
    row = dict(
        amp=amp,
        tokens=int(tokens.shape[1]),
        batch=batch,
        logits_rel=logits_rel,
        grad_rel=grad_rel,
        worst_grad=worst,
        same_grad_names=sorted(fast[1]) == sorted(plain[1]),
        finite=bool(torch.isfinite(fast[0]).all() and all(torch.isfinite(g).all() for g in fast[1].values())),
    )
    if amp != "fp32":
        row["logits_noise"], row["grad_noise"], _ = compare(plain, run("plain", "fp32"))
    return row


# Parity limits. float32: the chunked sums' rounding. An autocast dtype: twice what its rounding alone does to the
# plain path (fast and plain round at different places, each by about that much), and never under the float32 limit.
FP32_LIMIT = 1e-3


def parity_limits(row: dict) -> tuple[float, float]:
    if row["amp"] == "fp32":
        return FP32_LIMIT, FP32_LIMIT
    return max(FP32_LIMIT, 2 * row["logits_noise"]), max(FP32_LIMIT, 2 * row["grad_noise"])


def parity_ok(row: dict) -> bool:
    logits_limit, grad_limit = parity_limits(row)
    return (
        row["same_grad_names"] and row["finite"] and row["logits_rel"] < logits_limit and row["grad_rel"] < grad_limit
    )


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def timing(size: dict, device: torch.device, batches: Sequence[int]) -> list[dict]:
    rows = []
    for mode in bench_model.MODES:
        for amp in ("fp32", "bf16"):
            for batch in batches:
                row = dict(mode=mode, amp=amp, batch=batch)
                try:
                    row.update(_time_one(size, device, mode, amp, batch))
                except torch.OutOfMemoryError:
                    row["error"] = "out of memory"
                rows.append(row)
                _free(device)
                print(_format_timing(row), flush=True)
    return rows


def _time_one(size, device, mode, amp, batch, repeats: int = 3) -> dict:
    torch.manual_seed(0)
    model, optimizer = bench_model.build(size, mode)
    model.to(device)
    if optimizer is not None:  # made again: the parameters moved
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, labels = bench_model.random_batch(size, batch, mode, torch.Generator().manual_seed(0))
    tokens, labels = tokens.to(device), labels.to(device)
    train_step(model, optimizer, tokens, labels, mode, device, amp)  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        train_step(model, optimizer, tokens, labels, mode, device, amp)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    flops = bench_model.model_flops(size, mode)["total"] * batch
    return dict(seconds=min(times), s_per_cell=min(times) / batch, tflops=flops / min(times) / 1e12, peak_mb=peak)


def _format_timing(row: dict) -> str:
    head = f"{row['mode']:8} {row['amp']:4} batch {row['batch']:3d}"
    if "error" in row:
        return f"{head}: {row['error']}"
    return (
        f"{head}: {row['seconds']:.3f} s/step, {row['s_per_cell'] * 1e3:.1f} ms/cell, {row['tflops']:.1f} TFLOP/s, "
        f"peak {row['peak_mb']:.0f} MB"
    )


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


LAUNCH_EVENTS = ("cudaLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernel")
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")


def profile(size: dict, device: torch.device, mode: str = "finetune", batch: int = 1) -> dict:
    """Kernel launches and host-device syncs in one step (after a warm-up step), per cell."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    torch.manual_seed(0)
    model, optimizer = bench_model.build(size, mode)
    model.to(device)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    tokens, labels = bench_model.random_batch(size, batch, mode, torch.Generator().manual_seed(0))
    tokens, labels = tokens.to(device), labels.to(device)
    train_step(model, optimizer, tokens, labels, mode, device, "fp32")
    sync(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch_profile(activities=activities) as prof:
        train_step(model, optimizer, tokens, labels, mode, device, "fp32")
        sync(device)
    counts: dict[str, int] = {}
    for event in prof.events():
        counts[event.name] = counts.get(event.name, 0) + 1
    launches = sum(n for name, n in counts.items() if name in LAUNCH_EVENTS)
    syncs = sum(n for name, n in counts.items() if name in SYNC_EVENTS)
    copies = sum(n for name, n in counts.items() if name in ("cudaMemcpy", "cudaMemcpyAsync"))
    top = sorted(counts.items(), key=lambda item: -item[1])[:12]
    return dict(
        mode=mode,
        batch=batch,
        launches_per_cell=launches / batch,
        syncs_per_cell=syncs / batch,
        memcpy_calls_per_cell=copies / batch,
        most_frequent=top,
    )


def fp16_pretraining(size: dict, device: torch.device, steps: int) -> dict:
    """Pretraining steps under fp16 autocast with a GradScaler: finite logits and loss, skipped steps, and the
    largest |logit| difference from a float32 forward of the same weights and cells (before the first step)."""
    torch.manual_seed(0)
    model, _ = bench_model.build(size, "pretrain")
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type)
    tokens, labels = bench_model.random_batch(size, 1, "pretrain", torch.Generator().manual_seed(0))
    tokens, labels = tokens.to(device), labels.to(device)
    with torch.no_grad():
        reference = model(tokens).float()
        with autocast(device, "fp16"):
            half = model(tokens).float()
    rows = []
    for _ in range(steps):
        scale = scaler.get_scale()
        logits, loss = train_step(model, optimizer, tokens, labels, "pretrain", device, "fp16", scaler)
        rows.append(
            dict(loss=float(loss), finite_logits=bool(torch.isfinite(logits).all()), skipped=scaler.get_scale() < scale)
        )
    return dict(
        tokens=int(tokens.shape[1]),
        forward_finite=bool(torch.isfinite(half).all()),
        forward_max_abs_diff=float((half - reference).abs().max()) if torch.isfinite(half).all() else float("inf"),
        reference_max_abs=float(reference.abs().max()),
        steps=rows,
        skipped_steps=sum(r["skipped"] for r in rows),
    )


def nccl_two_processes(device: torch.device) -> dict:
    """pretrain.py under torchrun with 2 processes on NCCL, on tiny synthetic data (the test suite's setup)."""
    if device.type != "cuda" or torch.cuda.device_count() < 2:
        found = torch.cuda.device_count() if torch.cuda.is_available() else 0
        return dict(skipped=f"needs 2 CUDA GPUs (NCCL runs one rank per GPU); this machine has {found}")
    from tests.test_training import write_preprocessed

    with tempfile.TemporaryDirectory() as folder:
        write_preprocessed(Path(folder) / "cells.h5ad", n_cells=640, gene2vec_path=Path(folder) / "g2v.npy")
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = str(sock.getsockname()[1])
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            port,
            "pretrain.py",
            "--data_path",
            f"{folder}/cells.h5ad",
            "--gene2vec_path",
            f"{folder}/g2v.npy",
            "--gene_num",
            "48",
            "--dim",
            "16",
            "--depth",
            "1",
            "--heads",
            "2",
            "--dim_head",
            "8",
            "--batch_size",
            "8",
            "--grad_acc",
            "3",
            "--epoch",
            "1",
            "--device",
            "cuda",
            "--ckpt_dir",
            folder,
            "--model_name",
            "nccl",
        ]
        start = time.perf_counter()
        result = subprocess.run(
            command, cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "MASTER_PORT": port}
        )
        wrote = os.path.exists(os.path.join(folder, "nccl_1.pth"))
    return dict(
        returncode=result.returncode,
        checkpoint_written=wrote,
        seconds=time.perf_counter() - start,
        tail=(result.stderr or result.stdout).strip().splitlines()[-5:],
    )


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = [p for p in parts if p not in PARTS]
    if unknown or not parts:
        raise ScbertError(f"unknown part(s) {unknown or args.parts!r}: choose from {', '.join(PARTS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise ScbertError(
            "no CUDA GPU is visible to PyTorch: run this on a GPU machine, or pass --device cpu "
            "--size tiny --parts parity for the part a CPU can run"
        )
    try:
        batches = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    except ValueError as err:
        raise ScbertError(f"--batch_sizes must be integers like 1,8,32, got {args.batch_sizes!r}") from err
    device = torch.device(args.device)
    size = SIZES[args.size]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"torch {torch.__version__}, {name}, size {args.size} ({size['genes'] + 1} tokens)", flush=True)
    report: dict = dict(torch=torch.__version__, device=name, size=args.size, parts=parts)
    started = time.time()
    if "parity" in parts:
        report["parity"] = []
        for amp in ("fp32", "bf16"):
            row = parity(size, device, amp)
            row["ok"] = parity_ok(row)
            report["parity"].append(row)
            print(
                f"parity {amp}: logits rel {row['logits_rel']:.2e}, worst gradient rel {row['grad_rel']:.2e} "
                f"({row['worst_grad']}), finite {row['finite']}: {'ok' if row['ok'] else 'FAILED'} "
                f"(limits {parity_limits(row)[0]:.1e} / {parity_limits(row)[1]:.1e})",
                flush=True,
            )
            _free(device)
    if "timing" in parts:
        report["timing"] = timing(size, device, batches)
    if "profile" in parts:
        report["profile"] = profile(size, device)
        p = report["profile"]
        print(
            f"profile {p['mode']} batch {p['batch']}: {p['launches_per_cell']:.0f} kernel launches, "
            f"{p['syncs_per_cell']:.0f} syncs, {p['memcpy_calls_per_cell']:.0f} memcpy calls per cell; most "
            f"frequent: {p['most_frequent'][:6]}",
            flush=True,
        )
        _free(device)
    if "fp16" in parts:
        report["fp16"] = f = fp16_pretraining(size, device, args.fp16_steps)
        print(
            f"fp16 pretraining at {f['tokens']} tokens: forward finite {f['forward_finite']}, max |logit - fp32| "
            f"{f['forward_max_abs_diff']:.3g} (|logit| up to {f['reference_max_abs']:.3g}); {f['skipped_steps']} of "
            f"{len(f['steps'])} steps skipped by the scaler (the first few calibrate its scale; skips that go on "
            f"mean overflow); losses {[round(r['loss'], 4) for r in f['steps']]}",
            flush=True,
        )
        _free(device)
    if "nccl" in parts:
        report["nccl"] = nccl_two_processes(device)
        print(f"nccl two processes: {report['nccl']}", flush=True)
    report["seconds"] = time.time() - started
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(report, indent=1, default=str))
    os.replace(tmp, path)
    print(f"wrote {path} ({report['seconds']:.0f} s)", flush=True)
    return report


if __name__ == "__main__":
    run_cli(main)
