"""Run by tests/test_redraw.py under torchrun (2 gloo ranks): train a tiny model with projection redraws every
2 calls and gradient accumulation over 3 micro-steps (no_sync on the others), and after each redraw gather every
rank's projections. Rank 0 writes {"redraws": [...], "equal": [...], "changed": [...]} to argv[1].

argv[2] "seeded" passes the run's seed to `training.wrap_model` (what pretrain.py and finetune.py do); "unseeded"
leaves redraws on each rank's own RNG (seed + rank), the behaviour the seed replaces."""

import contextlib
import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import training  # noqa: E402
from performer_pytorch import PerformerLM  # noqa: E402

SEED, GRAD_ACC, MICRO_STEPS = 5, 3, 12


def main(out: str, mode: str) -> None:
    ctx = training.setup_distributed(device="cpu")
    torch.manual_seed(SEED)  # the same initial weights on every rank, as the scripts do
    model = PerformerLM(num_tokens=7, max_seq_len=9, dim=8, depth=2, heads=2, dim_head=4, g2v_position_emb=False,
                        feature_redraw_interval=2)
    training.seed_everything(SEED, ctx.rank)  # seed + rank: ranks' global RNGs differ
    model = training.wrap_model(model, ctx, seed=SEED if mode == "seeded" else None)
    core = training.unwrap_model(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    records = {"redraws": [], "equal": [], "changed": []}
    previous = None
    for step in range(MICRO_STEPS):
        tokens = torch.randint(0, 7, (2, 9))
        last = (step + 1) % GRAD_ACC == 0
        with contextlib.nullcontext() if last else model.no_sync():
            model(tokens).float().logsumexp(-1).mean().backward()
        if last:
            optimizer.step()
            optimizer.zero_grad()
        if int(core.performer.calls_since_last_redraw) != 0:
            continue  # this call counted instead of redrawing
        mine = torch.cat([fa.projection_matrix.flatten() for fa in core.performer.fast_attentions()])
        everyone = [torch.empty_like(mine) for _ in range(ctx.world_size)]
        dist.all_gather(everyone, mine)
        records["redraws"].append(int(core.performer.redraws))
        records["equal"].append(all(torch.equal(everyone[0], other) for other in everyone[1:]))
        records["changed"].append(previous is None or not torch.equal(previous, everyone[0]))
        previous = everyone[0]
    if ctx.is_main:
        Path(out).write_text(json.dumps(records))
    training.cleanup_distributed(ctx)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(sys.argv[1], sys.argv[2])
