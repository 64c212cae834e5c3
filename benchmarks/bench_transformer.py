"""Pretraining-step throughput of the scGPT-style transformer against this machine's matmul rate, and the SDPA kernel.

    python benchmarks/bench_transformer.py                         # recipe size (12 x 512, 1,201 tokens), fp32 + bf16
    python benchmarks/bench_transformer.py --steps 2 --batch_size 2
    python benchmarks/bench_transformer.py --device cuda --batch_size 32

One pretraining step = tokens of full length (1,201: `<cls>` + 1,200 genes, no padding, as the recipe's cap), the
masking of `transformer_model.mask_values` (ratio 0.5), forward with both decoders, the masked-MSE loss, backward,
gradient clipping at 1.0 and an Adam step; dropout 0.2 as in training. bf16 = autocast (weights stay float32).
Tokens/s = batch x 1,201 / the median step time (after one warm-up step).

FLOPs are counted analytically (`step_flops`: matmul FLOPs, 2 per multiply-add, elementwise work not counted) and
checked in the same run against `torch.utils.flop_counter.FlopCounterMode` at a tiny size on the math SDPA path.
Per cell of L tokens, width d, feed-forward f, forward:
    per layer: packed qkv 2Ld(3d), output 2Ld^2, feed-forward 2 * 2Ldf, scores and weighted sum 2 * 2L^2 d;
    value encoder Linear(1, d) 2Ld and Linear(d, d) 2Ld^2; expression decoder 2L(2d^2 + d);
    MVC query and projection 2 * 2Ld^2 and the inner product with the cell 2Ld.
Backward: each matmul's FLOPs once per operand needing a gradient: 2x forward, except the value encoder's first
Linear whose input (the values) needs none. The matmul rate is the best of square float32 / bfloat16 matmuls into a
preallocated output, measured in the same run just before the steps of that dtype; "% rate" = achieved / that rate.

The kernel torch chose: the attention ops named in a profiler trace of one step (e.g.
`aten::_scaled_dot_product_flash_attention_for_cpu` on a CPU, `aten::_scaled_dot_product_flash_attention` or
`..._efficient_attention` on a GPU, `aten::_scaled_dot_product_attention_math` for the unfused path).
Results: a table on stdout and a JSON file (default benchmarks/results/bench_transformer.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from transformer_model import RECIPE, GeneVocab, TransformerModel, mask_values, pretraining_losses  # noqa: E402
from utils import ScbertError, atomic_write_bytes, run_cli  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "bench_transformer.json"
TINY = dict(dim=32, depth=2, heads=4, ff_dim=48)


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser("Benchmark a transformer pretraining step against the matmul rate",
                                     add_help=add_help)
    parser.add_argument("--batch_size", type=int, default=4,
                        help="cells per step (the recipe trains with 32 per GPU; 4 keeps a CPU step to seconds)")
    parser.add_argument("--seq_len", type=int, default=RECIPE["max_seq_len"], help="tokens per cell (recipe 1,201)")
    parser.add_argument("--genes", type=int, default=1200, help="vocabulary genes (recipe: 1,200 HVGs)")
    parser.add_argument("--dim", type=int, default=RECIPE["dim"])
    parser.add_argument("--depth", type=int, default=RECIPE["depth"])
    parser.add_argument("--heads", type=int, default=RECIPE["heads"])
    parser.add_argument("--ff_dim", type=int, default=RECIPE["ff_dim"])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per dtype (after one warm-up step)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma-separated: fp32, bf16 (bf16 = autocast)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (CPU)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--max_step_seconds", type=float, default=300.0,
                        help="skip a dtype whose step would take longer than this by its matmul rate (its kernel is "
                             "still named, from a 1-layer step of 65 tokens)")
    parser.add_argument("--json", default=str(DEFAULT_JSON), help="where to write the results")
    return parser


def step_flops(batch: int, length: int, dim: int, depth: int, ff_dim: int) -> dict[str, float]:
    """Matmul FLOPs of one pretraining step: {"forward", "backward", "step"} (see the module docstring)."""
    L, d, f = length, dim, ff_dim  # noqa: N806
    per_layer = 2 * L * d * 3 * d + 2 * L * d * d + 2 * 2 * L * d * f + 2 * 2 * L * L * d
    value_fc1, value_fc2 = 2 * L * d, 2 * L * d * d
    expr = 2 * L * (2 * d * d + d)
    mvc = 2 * 2 * L * d * d + 2 * L * d
    forward = batch * (depth * per_layer + value_fc1 + value_fc2 + expr + mvc)
    backward = 2 * forward - batch * value_fc1
    return {"forward": float(forward), "backward": float(backward), "step": float(forward + backward)}


def build(args_like: dict, genes: int, device: torch.device, dropout: float = 0.2):
    vocab = GeneVocab([f"g{i}" for i in range(genes)])
    model = TransformerModel(vocab=vocab, dropout=dropout, **args_like).to(device)
    return vocab, model


def full_batch(vocab: GeneVocab, batch: int, length: int, device: torch.device, generator: torch.Generator):
    """(batch, length) cells without padding: <cls> then length - 1 distinct genes in order, bins 1..50."""
    if length - 1 > vocab.gene_num:
        raise ScbertError(f"--seq_len {length} needs at least {length - 1} --genes")
    genes = torch.stack([torch.randperm(vocab.gene_num, generator=generator)[: length - 1].sort().values
                         for _ in range(batch)])
    values = torch.randint(1, 51, (batch, length - 1), generator=generator).float()
    genes = torch.cat([torch.full((batch, 1), vocab.cls_id), genes], dim=1)
    values = torch.cat([torch.zeros(batch, 1), values], dim=1)
    return {"genes": genes.to(device), "values": values.to(device)}


def one_step(model, optimizer, vocab, batch, dtype, device, generator) -> None:
    masked, chosen, _ = mask_values(batch, 0.5, pad_id=vocab.pad_id, generator=generator)
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        loss = pretraining_losses(model, batch, masked, chosen)["loss"]
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(dtype: torch.dtype, device: torch.device, repeats: int = 3, cap_seconds: float = 1.0) -> float:
    """Best GFLOP/s of square matmuls into a preallocated output, sizes growing from 256 until one call takes
    `cap_seconds` (bf16 on a CPU without bf16 instructions is a hundred times slower than fp32)."""
    sizes = (256, 512, 1024, 2048, 4096, 8192) if device.type == "cuda" else (256, 512, 1024, 2048)
    best = 0.0
    for n in sizes:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        out = torch.empty(n, n, device=device, dtype=dtype)
        torch.mm(a, b, out=out)
        synchronize(device)
        slowest = 0.0
        for _ in range(repeats):
            start = time.perf_counter()
            torch.mm(a, b, out=out)
            synchronize(device)
            seconds = time.perf_counter() - start
            slowest = max(slowest, seconds)
            best = max(best, 2 * n**3 / seconds / 1e9)
        if slowest > cap_seconds:
            break
    return best


def attention_kernels(model, optimizer, vocab, batch, dtype, device, generator) -> list[str]:
    """Names of the SDPA ops a profiled step ran (forward and backward)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        one_step(model, optimizer, vocab, batch, dtype, device, generator)
        synchronize(device)
    names = {e.key for e in prof.key_averages()}
    return sorted(n for n in names if "scaled_dot_product" in n or "flash" in n or "efficient_attention" in n)


def flop_counter_check() -> dict[str, float]:
    """Analytic vs FlopCounterMode FLOPs of a tiny step on the math SDPA path (whose matmuls are all counted)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    device = torch.device("cpu")
    vocab, model = build(TINY, 40, device, dropout=0.0)
    gen = torch.Generator().manual_seed(0)
    batch = full_batch(vocab, 3, 17, device, gen)
    masked, chosen, _ = mask_values(batch, 0.5, pad_id=vocab.pad_id, generator=gen)
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = pretraining_losses(model, batch, masked, chosen)["loss"]
        forward = counter.get_total_flops()
        loss.backward()
        total = counter.get_total_flops()
    analytic = step_flops(3, 17, TINY["dim"], TINY["depth"], TINY["ff_dim"])
    return {"counted_forward": float(forward), "analytic_forward": analytic["forward"],
            "counted_step": float(total), "analytic_step": analytic["step"]}


def run_dtype(args, name: str, device: torch.device) -> dict:
    dtype = DTYPES[name]
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(0)
    sizes = dict(dim=args.dim, depth=args.depth, heads=args.heads, ff_dim=args.ff_dim)
    vocab, model = build(sizes, args.genes, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    batch = full_batch(vocab, args.batch_size, args.seq_len, device, gen)
    rate = matmul_rate(dtype, device)
    flops = step_flops(args.batch_size, args.seq_len, args.dim, args.depth, args.ff_dim)["step"]
    predicted = flops / (rate * 1e9)
    row = dict(dtype=name, batch=args.batch_size, seq_len=args.seq_len, step_gflop=flops / 1e9, matmul_gflops=rate)
    if predicted > args.max_step_seconds:
        small_vocab, small = build({**sizes, "depth": 1}, 64, device)
        small_opt = torch.optim.Adam(small.parameters(), lr=1e-4)
        small_batch = full_batch(small_vocab, 2, 65, device, gen)
        kernels = attention_kernels(small, small_opt, small_vocab, small_batch, dtype, device, gen)
        return dict(row, skipped=f"a step would take about {predicted:.0f} s at {rate:.1f} GFLOP/s",
                    attention_kernels=kernels)
    kernels = attention_kernels(model, optimizer, vocab, batch, dtype, device, gen)  # also the warm-up step
    seconds = []
    for _ in range(args.steps):
        synchronize(device)
        start = time.perf_counter()
        one_step(model, optimizer, vocab, batch, dtype, device, gen)
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    achieved = flops / median / 1e9
    return dict(row, step_seconds=seconds, median_seconds=median, tokens_per_second=args.batch_size * args.seq_len
                / median, achieved_gflops=achieved, fraction_of_matmul_rate=achieved / rate, attention_kernels=kernels)


def main(argv: Sequence[str] | None = None) -> dict:
    args = get_args_parser().parse_args(argv)
    names = [n.strip() for n in args.dtypes.split(",") if n.strip()]
    bad = [n for n in names if n not in DTYPES]
    if bad:
        raise ScbertError(f"--dtypes {bad[0]!r} is not one of {', '.join(DTYPES)}")
    if args.steps < 1 or args.batch_size < 1:
        raise ScbertError("--steps and --batch_size must be at least 1")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ScbertError("--device cuda, but torch sees no GPU: pass --device cpu")
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    check = flop_counter_check()
    print(f"FLOP formula check (tiny model, math SDPA): forward {check['analytic_forward']:.0f} analytic vs "
          f"{check['counted_forward']:.0f} counted; step {check['analytic_step']:.0f} vs {check['counted_step']:.0f}")
    machine = (torch.cuda.get_device_name(device) if device.type == "cuda"
               else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"model {args.depth} x {args.dim} (heads {args.heads}, ff {args.ff_dim}), {args.batch_size} cells x "
          f"{args.seq_len} tokens per step, {args.steps} timed steps; torch {torch.__version__} on {machine}")
    rows = []
    print(f"{'dtype':5} {'s/step':>7} {'tokens/s':>9} {'GFLOP/step':>10} {'GFLOP/s':>8} {'matmul':>7} {'% rate':>6}"
          "  attention kernel")
    for name in names:
        row = run_dtype(args, name, device)
        rows.append(row)
        if "skipped" in row:
            print(f"{name:5} skipped: {row['skipped']} (matmul {row['matmul_gflops']:.1f} GFLOP/s)  "
                  f"{', '.join(row['attention_kernels']) or 'none found'}", flush=True)
            continue
        print(f"{name:5} {row['median_seconds']:7.2f} {row['tokens_per_second']:9.0f} {row['step_gflop']:10.1f} "
              f"{row['achieved_gflops']:8.1f} {row['matmul_gflops']:7.1f} {100 * row['fraction_of_matmul_rate']:5.1f}%"
              f"  {', '.join(row['attention_kernels']) or 'none found'}", flush=True)
    result = {"machine": machine, "torch": torch.__version__, "flop_check": check, "args": vars(args), "rows": rows}
    atomic_write_bytes(args.json, (json.dumps(result, indent=1) + "\n").encode())
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    run_cli(main)
