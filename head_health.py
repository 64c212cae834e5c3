"""Dead-head detection for fine-tuning: is the classification head still looking at the cells?

scBERT's head scores each gene with a 1 x dim convolution and a ReLU (`ClassificationHead.gene_scores`). When every
score of every cell is at or below zero, ReLU outputs 0 everywhere and passes no gradient back: the rest of the head
sees the same input for every cell, every cell gets the same class, and no optimiser step can bring the scorer back.
`HeadWatch` measures this during a validation pass, from forward hooks (no extra forward); `HeadHealth.dead` is the
verdict; `start_head_alive` sets a new scorer from a few training cells so it starts positive for every gene, and
`revive_head` restarts a dead one so the run can go on.

    with HeadWatch(model) as watch:
        valid = evaluate(...)
    health = watch.result()
    if health.dead: ...
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from performer_pytorch import ClassificationHead
from utils import ScbertError

# A run whose head died this many times has a cause that restarting the scorer does not remove: it stops.
MAX_REVIVALS = 2
# Training cells whose encodings set the gene scorer's starting bias: enough for the spread of the scores, few
# enough to cost about half a minute once per run at full size on a CPU (16,907 tokens, 2.2 s per cell, README).
SAMPLE_CELLS = 16


@dataclass
class HeadHealth:
    """What one validation pass showed. positive_share: share of gene scores above 0 (over cells and genes);
    logit_range: the largest range over cells of any class's logit, relative to 1 + its size; cells: how many were
    seen; watched: whether the model had a classification head to watch. `dead`: no cell-dependent signal reaches
    the logits."""

    positive_share: float
    logit_range: float
    cells: int
    watched: bool = True

    @property
    def dead(self) -> bool:
        if not self.watched or self.cells < 2:
            return False
        # Exactly 0: a ReLU layer of the head that is 0 for every cell makes every later output bit-identical, while a
        # live head that has barely moved (epoch 1 of the warm-up runs at lr 1e-6) still varies a little.
        return self.positive_share == 0.0 or self.logit_range == 0.0

    def describe(self) -> str:
        if self.positive_share == 0.0:
            return ("every gene score of the classification head is 0 (its Conv2d + ReLU gene scorer is dead), so "
                    "every cell gets the same prediction")
        return f"the head's logits do not vary across the {self.cells} validation cells (range {self.logit_range:.2g})"


def _head_of(model: nn.Module) -> ClassificationHead | None:
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    head = getattr(inner, "to_out", None)
    return head if isinstance(head, ClassificationHead) else None


class HeadWatch:
    """Counts, while active, the positive gene scores and the per-class logit minimum and maximum of the model's
    ClassificationHead (a no-op for a model without one). Sums over ranks in `result()` when distributed."""

    def __init__(self, model: nn.Module, *, eval_only: bool = False):
        self.head = _head_of(model)
        self.eval_only = eval_only  # count only eval-mode forwards (validation), not training steps
        self.handles: list = []
        self.positive = self.scores = self.cells = 0
        self.low: torch.Tensor | None = None
        self.high: torch.Tensor | None = None

    def reset(self) -> None:
        self.positive = self.scores = self.cells = 0
        self.low = self.high = None

    def _on_scores(self, module, _inputs, output: torch.Tensor) -> None:
        # output: (batch, seq_len) gene scores after the ReLU; training forwards are not counted
        if self.eval_only and module.training:
            return
        self.positive += int((output > 0).sum())
        self.scores += output.numel()

    def _on_logits(self, module, _inputs, output) -> None:
        if self.eval_only and module.training:
            return
        logits = (output[0] if isinstance(output, tuple) else output).detach().float()  # (batch, n_classes)
        low, high = logits.min(dim=0).values, logits.max(dim=0).values
        self.low = low if self.low is None else torch.minimum(self.low, low)
        self.high = high if self.high is None else torch.maximum(self.high, high)
        self.cells += logits.shape[0]

    def __enter__(self) -> HeadWatch:
        if self.head is not None:
            self.handles = [self.head.act.register_forward_hook(self._on_scores),
                            self.head.register_forward_hook(self._on_logits)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def result(self) -> HeadHealth:
        if self.head is None:
            return HeadHealth(positive_share=1.0, logit_range=float("inf"), cells=self.cells, watched=False)
        n_classes = self.head.fc3.out_features
        low = self.low if self.low is not None else torch.full((n_classes,), float("inf"))
        high = self.high if self.high is not None else torch.full((n_classes,), float("-inf"))
        counts = torch.tensor([self.positive, self.scores, self.cells], dtype=torch.float64)
        if dist.is_available() and dist.is_initialized():
            device = next(self.head.parameters()).device  # the backend's device (NCCL: the rank's GPU)
            counts, low, high = counts.to(device), low.to(device), high.to(device)
            dist.all_reduce(counts)
            dist.all_reduce(high, op=dist.ReduceOp.MAX)
            neg_low = -low
            dist.all_reduce(neg_low, op=dist.ReduceOp.MAX)
            low = -neg_low
        positive, scores, cells = (float(v) for v in counts.cpu())
        scale = 1.0 + float(torch.maximum(high.abs(), low.abs()).max().cpu()) if cells else 1.0
        spread = float((high - low).max().cpu()) / scale if cells else float("inf")
        return HeadHealth(positive_share=positive / scores if scores else 1.0, logit_range=spread, cells=int(cells))


def _sample_encodings(model: nn.Module, dataset, n_cells: int) -> torch.Tensor:
    """(cells, seq_len, dim) final-norm encodings of the first `n_cells` items of `dataset` (no gradients)."""
    inner = getattr(model, "module", model)
    inner = getattr(inner, "_orig_mod", inner)
    device = next(inner.parameters()).device
    tokens = torch.stack([dataset[i]["tokens"] for i in range(min(n_cells, len(dataset)))]).to(device)
    was_training = inner.training
    inner.eval()
    try:
        with torch.no_grad():
            if hasattr(inner, "encode"):  # a models.py family: batch dict in
                return inner.encode({"tokens": tokens})
            return inner(tokens, return_encodings=True)
    finally:
        inner.train(was_training)


def start_head_alive(model: nn.Module, dataset, n_cells: int = SAMPLE_CELLS) -> None:
    """Set the head's gene scorer from the encodings of a few training cells (`ClassificationHead.reset_gene_scorer`)
    so every gene score starts positive. The same on every rank: rank 0's values are broadcast."""
    head = _head_of(model)
    if head is None or len(dataset) == 0:
        return
    head.reset_gene_scorer(_sample_encodings(model, dataset, n_cells))
    if dist.is_available() and dist.is_initialized():
        for param in head.conv1.parameters():
            dist.broadcast(param.data, src=0)


def revive_head(model: nn.Module, optimizer: torch.optim.Optimizer, dataset=None) -> None:
    """Restart the head's gene scorer (`start_head_alive` on `dataset`, or the data-free reset without one) and
    forget its optimiser state, so Adam's running moments of the dead weights do not push it straight back."""
    head = _head_of(model)
    if head is None:
        return
    if dataset is None:
        head.reset_gene_scorer()
    else:
        start_head_alive(model, dataset)
    for param in head.conv1.parameters():
        optimizer.state.pop(param, None)


def handle_dead_head(model: nn.Module, optimizer: torch.optim.Optimizer, health: HeadHealth, *, epoch: int,
                     revivals: int, log, dataset=None) -> int:
    """After a validation whose `health` is dead: revive the head (returns the new revival count) and say so with
    `log(sentence)`, or raise ScbertError once it has died more than MAX_REVIVALS times."""
    if revivals >= MAX_REVIVALS:
        raise ScbertError(
            f"fine-tuning stopped at epoch {epoch}: {health.describe()}, and the head has now died {revivals + 1} "
            f"times despite restarts; lower --learning_rate (the best checkpoint saved so far is kept)"
        )
    revive_head(model, optimizer, dataset)
    log(f"epoch {epoch}: {health.describe()}; this epoch is not kept as best, and the head's gene scorer was "
        f"restarted (restart {revivals + 1} of at most {MAX_REVIVALS})")
    return revivals + 1


class HeadGuard:
    """A classification run's dead-head guard: starts a fresh head alive, watches every validation (eval-mode
    forwards only) and restarts or stops on a dead head. Saved with the run (`state_dict`: the restarts so far).

        guard = HeadGuard()                      # before the run is set up; put it in the run's state
        guard.attach(model, optimizer, train_set, fresh=True, log=print)
        health = guard.check(epoch)              # after each validation; health.dead: not kept as best
        guard.close()
    """

    def __init__(self) -> None:
        self.revivals = 0
        self.watch: HeadWatch | None = None
        self.model = self.optimizer = self.dataset = None
        self.log = print

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer, dataset, *, fresh: bool, log) -> None:
        self.model, self.optimizer, self.dataset, self.log = model, optimizer, dataset, log
        if fresh:
            start_head_alive(model, dataset)
        self.watch = HeadWatch(model, eval_only=True).__enter__()

    def check(self, epoch: int) -> HeadHealth:
        if self.watch is None:
            return HeadHealth(positive_share=1.0, logit_range=float("inf"), cells=0, watched=False)
        health = self.watch.result()
        self.watch.reset()
        if health.dead:
            self.revivals = handle_dead_head(self.model, self.optimizer, health, epoch=epoch, revivals=self.revivals,
                                             log=self.log, dataset=self.dataset)
        return health

    def close(self) -> None:
        if self.watch is not None:
            self.watch.__exit__(None, None, None)
            self.watch = None

    def state_dict(self) -> dict:
        return {"revivals": self.revivals}

    def load_state_dict(self, state: dict) -> None:
        self.revivals = int(state.get("revivals", 0))
