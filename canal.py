"""CANAL continual annotation (Wan et al., Brief Bioinform 2024): the method's parts, on plain tensors and modules.

A stream of labelled datasets arrives in stages; after each, the classifier knows the old cell types and the new ones.
This module holds what CANAL adds to fine-tuning, each piece testable alone (`continual.py` runs the stages):

- `select_bank`: the example bank replayed at later stages: an equal quota of floor(L / classes) cells per class,
  the cells whose embedding z has the largest dot product with their class's row of the last layer (its prototype),
  indexed by the head's own class index; quota a class cannot use is handed to classes with more cells.
- head growth is the classification core's `classification.grow_head` (old rows copied, each stage's rows computed
  as their own product by `performer_pytorch.BlockLinear`, so old logits stay bit-identical before training).
- `canal_loss`, `kd_weight`, `FrozenTeacher`: label-smoothed cross-entropy plus lambda_t * MSE between the student's
  and the previous stage's z, lambda_t = lambda_kd * |old classes| / |all classes| (0 at stage 1); the teacher is
  frozen and in eval mode (the authors left it in train mode, so its FAVOR+ projections were redrawn under it).
- `canal_novelty`: novel-cell calls from the energy and the top softmax probability, with a threshold set by virtual
  outliers made by manifold mixup of random pairs of test cells at the head's first hidden layer.

Shapes: z is (cells, h_dim), the head's penultimate layer (post-ReLU); h is (cells, hidden), its first hidden layer.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from utils import ScbertError

__all__ = [
    "BANK_SIZE",
    "LABEL_SMOOTHING",
    "LAMBDA_KD",
    "TEMPERATURE",
    "FrozenTeacher",
    "Novelty",
    "bank_quotas",
    "canal_loss",
    "canal_novelty",
    "energy",
    "head_first_hidden",
    "head_forward",
    "head_from_first_hidden",
    "kd_weight",
    "manifold_mixup",
    "select_bank",
]

BANK_SIZE = 1000  # CANAL's rehearsal_size L (README: "L default 1000")
LAMBDA_KD = 0.1  # CANAL's lambda_KD (README: "lambda default 0.1")
LABEL_SMOOTHING = 0.1  # CANAL's CrossEntropyLabelSmooth epsilon
TEMPERATURE = 0.8  # CANAL's energy temperature in predict


# ---------------------------------------------------------------------------------------------------------------------
# Example bank
# ---------------------------------------------------------------------------------------------------------------------


def bank_quotas(counts: Sequence[int], bank_size: int) -> np.ndarray:
    """Cells kept per class: an equal quota q = floor(bank_size / classes), with unused quota handed on.

    counts: (classes,) cells available per class (0 allowed: a class seen earlier whose cells are gone). A class
    with fewer than its share keeps all its cells; what it leaves is shared equally among the classes with more
    cells, repeatedly (water filling), and the units a floor division leaves over go one each to the classes with
    the most cells still unused (ties: lower class index first). The total is min(classes * q, sum(counts)), never
    more than bank_size. Raises ScbertError when bank_size is smaller than the number of classes (a zero quota).
    """
    counts = np.asarray(counts, dtype=np.int64)
    n_classes = len(counts)
    if n_classes == 0:
        return np.zeros(0, dtype=np.int64)
    if bank_size < n_classes:
        raise ScbertError(
            f"--bank_size {bank_size} is smaller than the {n_classes} classes seen so far, so some class would keep "
            f"no example: pass --bank_size {n_classes} or more (CANAL uses {BANK_SIZE})"
        )
    budget = n_classes * (bank_size // n_classes)  # the equal quotas; the floor's remainder is not a quota
    quotas = np.zeros(n_classes, dtype=np.int64)
    open_ = counts > 0
    while budget > 0 and open_.any():
        share = budget // int(open_.sum())
        if share == 0:
            break
        give = np.where(open_, np.minimum(share, counts - quotas), 0)
        quotas += give
        budget -= int(give.sum())
        open_ = counts > quotas
    if budget > 0 and open_.any():  # fewer leftover units than classes still wanting cells
        left = counts - quotas
        order = np.lexsort((np.arange(n_classes), -left))  # most cells unused first, then class index
        for c in order[: min(budget, int(open_.sum()))]:
            quotas[c] += 1
    return quotas


def _as_float64(x: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def select_bank(
    z: torch.Tensor | np.ndarray,
    labels: torch.Tensor | np.ndarray,
    prototypes: torch.Tensor | np.ndarray,
    bank_size: int,
) -> np.ndarray:
    """Indices of the cells to keep as CANAL's example bank, at most `bank_size` of them.

    z: (cells, h_dim) embeddings of the pooled candidates (the old bank plus the new stage's cells), computed with
    the model just trained. labels: (cells,) each cell's class as the head's class index. prototypes: (classes,
    h_dim) the last layer's weight; row c is class c's prototype, whatever order the stage listed its labels in.
    Each class keeps its `bank_quotas` share: the cells with the largest dot product z . prototypes[c], exact top-k
    (ties: lower cell index first). Old and new candidates compete on the same scores; nothing is compared by rank.

    Returns int64 indices into the candidates, grouped by class index, each group in decreasing score.
    """
    z64, protos = _as_float64(z), _as_float64(prototypes)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels, dtype=np.int64)
    if z64.ndim != 2 or protos.ndim != 2 or z64.shape[1] != protos.shape[1] or len(labels) != len(z64):
        raise ValueError(f"z {z64.shape}, labels {labels.shape} and prototypes {protos.shape} do not fit together")
    n_classes = protos.shape[0]
    if len(labels) and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"labels must be head class indices in 0..{n_classes - 1}, got {labels.min()}..{labels.max()}")
    quotas = bank_quotas(np.bincount(labels, minlength=n_classes), bank_size)
    picked = []
    for c in range(n_classes):
        members = np.flatnonzero(labels == c)
        if quotas[c] == 0:
            continue
        scores = z64[members] @ protos[c]  # (members,)
        order = np.argsort(-scores, kind="stable")[: quotas[c]]
        picked.append(members[order])
    return np.concatenate(picked).astype(np.int64) if picked else np.zeros(0, dtype=np.int64)


# ---------------------------------------------------------------------------------------------------------------------
# The head's layers (scBERT's ClassificationHead: conv -> fc1 -> ReLU -> fc2 -> ReLU -> fc3)
# ---------------------------------------------------------------------------------------------------------------------


def head_first_hidden(head: nn.Module, encodings: torch.Tensor) -> torch.Tensor:
    """(cells, seq_len, dim) encodings -> (cells, hidden) h: the head's first hidden layer (CANAL's "manifold")."""
    return head.dropout1(head.act1(head.fc1(head.gene_scores(encodings))))


def head_from_first_hidden(head: nn.Module, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(cells, hidden) h -> ((cells, h_dim) z, (cells, classes) logits): the rest of the head."""
    z = head.dropout2(head.act2(head.fc2(h)))
    return z, head.fc3(z)


def head_forward(head: nn.Module, encodings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(h, z, logits) of a scBERT ClassificationHead, the same numbers as `head(encodings)` for the logits."""
    h = head_first_hidden(head, encodings)
    z, logits = head_from_first_hidden(head, h)
    return h, z, logits


# ---------------------------------------------------------------------------------------------------------------------
# Loss and teacher
# ---------------------------------------------------------------------------------------------------------------------


def kd_weight(n_old: int, n_all: int, lambda_kd: float = LAMBDA_KD) -> float:
    """lambda_t = lambda_kd * |old classes| / |all classes|; 0 at stage 1 (no old classes, no teacher)."""
    if n_all < 1 or not 0 <= n_old <= n_all:
        raise ValueError(f"need 0 <= n_old <= n_all and n_all >= 1, got n_old={n_old}, n_all={n_all}")
    return float(lambda_kd) * n_old / n_all


def canal_loss(
    logits: torch.Tensor,
    labels: torch.Tensor,
    z_student: torch.Tensor | None = None,
    z_teacher: torch.Tensor | None = None,
    *,
    n_old: int = 0,
    lambda_kd: float = LAMBDA_KD,
    label_smoothing: float = LABEL_SMOOTHING,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CANAL's loss on one batch: CE with label smoothing + lambda_t * MSE(z_student, z_teacher).

    logits: (cells, classes) of the student; labels: (cells,) head class indices; z_student, z_teacher: (cells,
    h_dim) penultimate embeddings of the same cells (new and replayed alike), the teacher's without gradient. The
    smoothed target is (1 - eps) * onehot + eps / classes (torch's label_smoothing, as CANAL's CrossEntropyLabelSmooth).
    The MSE is the plain mean over cells x h_dim. n_old 0 (stage 1): the CE alone; no teacher is needed.
    Returns (loss, {"ce", "kd", "lambda"}) with detached parts for logging.
    """
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    weight = kd_weight(n_old, logits.shape[-1], lambda_kd)
    if weight == 0.0:
        kd = torch.zeros((), dtype=ce.dtype, device=ce.device)
        loss = ce
    else:
        if z_student is None or z_teacher is None:
            raise ValueError("stages after the first need z_student and z_teacher for the distillation term")
        kd = F.mse_loss(z_student.float(), z_teacher.detach().float())
        loss = ce + weight * kd
    return loss, {"ce": ce.detach(), "kd": kd.detach(), "lambda": torch.tensor(weight)}


class FrozenTeacher(nn.Module):
    """The previous stage's model as a fixed target: a deep copy, no gradients, always in eval mode.

    Eval mode turns dropout off and stops FAVOR+ projection redraws (the Performer redraws only while training); its
    `train()` is a no-op, so a `student.train()` elsewhere, or wrapping both in one module, cannot switch it back.
    Calls run under `torch.no_grad()` and return what the wrapped module returns.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.module = copy.deepcopy(model)
        for param in self.module.parameters():
            param.requires_grad_(False)
        if hasattr(self.module, "fix_projections"):
            self.module.fix_projections(True)
        self.module.eval()

    def train(self, mode: bool = True) -> FrozenTeacher:
        super().train(False)
        self.module.eval()
        return self

    def forward(self, *args, **kwargs):
        with torch.no_grad():
            return self.module(*args, **kwargs)

    def run(self, fn: Callable[..., object], *args, **kwargs):
        """fn(frozen model, *args, **kwargs) under no_grad, e.g. to read the head's z instead of the logits."""
        self.module.eval()
        with torch.no_grad():
            return fn(self.module, *args, **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Novel cells
# ---------------------------------------------------------------------------------------------------------------------


def energy(logits: torch.Tensor, temperature: float = TEMPERATURE) -> torch.Tensor:
    """(cells, classes) -> (cells,) free energy -T * logsumexp(logits / T): higher means less like any known class."""
    return -temperature * torch.logsumexp(logits.double() / temperature, dim=-1)


def _minmax(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    span = hi - lo
    return torch.where(span > 0, (values - lo) / torch.where(span > 0, span, 1), torch.zeros_like(values))


def manifold_mixup(h: torch.Tensor, *, seed: int) -> torch.Tensor:
    """Virtual outliers: each row of h mixed with a random partner row (drawn with replacement) of the same set.

    h: (cells, hidden). h_mix = w * h + (1 - w) * h[partner], w ~ Uniform(0, 1) drawn per cell and per dimension
    (CANAL's Beta(1, 1)). Seeded by `seed` through its own generator, so calls are reproducible and leave torch's
    global random state alone. Returns (cells, hidden).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    n = h.shape[0]
    partner = torch.randint(n, (n,), generator=gen)
    w = torch.rand(h.shape, generator=gen, dtype=torch.float32).to(device=h.device, dtype=h.dtype)
    return w * h + (1 - w) * h[partner.to(h.device)]


@dataclass
class Novelty:
    """What `canal_novelty` found: per-cell uncertainty u (cells,), the threshold, and which cells are novel."""

    score: torch.Tensor
    threshold: float
    novel: torch.Tensor
    outlier_score: torch.Tensor


def canal_novelty(
    h: torch.Tensor,
    rest: Callable[[torch.Tensor], torch.Tensor],
    *,
    temperature: float = TEMPERATURE,
    seed: int = 0,
    orientation: str = "uncertainty",
) -> Novelty:
    """CANAL's novel-cell call for a set of test cells, from the head's first hidden layer h (cells, hidden).

    rest: h -> (cells, classes) logits (the head after its first hidden layer). Each cell's uncertainty is
    u = (E_scaled + 1 - max softmax) / 2, E the energy at `temperature`, min-max scaled over the test cells, so u is
    in [0, 1] and grows with novelty. The virtual outliers (`manifold_mixup` of h) get the same score, their energy
    min-max scaled over the mixed set (as the authors do). A cell is novel when u > threshold, with

    - orientation "uncertainty" (kept): threshold = the mean u of the virtual outliers: an uncertainty compared with
      an uncertainty, so a cell is novel when it is more uncertain than a typical virtual outlier;
    - orientation "authors": threshold = 1 - that mean = (mean(1 - E_mix_scaled) + mean(conf_mix)) / 2, the
      outliers' mean *certainty*, compared with an uncertainty: it moves the wrong way (the more uncertain the
      outliers, the lower the bar). On held-out synthetic types it calls almost no cell novel (tests/test_canal.py).
    """
    if orientation not in {"uncertainty", "authors"}:
        raise ValueError(f"orientation must be 'uncertainty' or 'authors', got {orientation!r}")
    with torch.no_grad():
        logits = rest(h).double()
        e = energy(logits, temperature)
        lo, hi = e.min(), e.max()
        u = (_minmax(e, lo, hi) + 1 - logits.softmax(dim=-1).max(dim=-1).values) / 2
        mixed = rest(manifold_mixup(h, seed=seed)).double()
        e_mix = energy(mixed, temperature)
        conf_mix = mixed.softmax(dim=-1).max(dim=-1).values
        u_mix = (_minmax(e_mix, e_mix.min(), e_mix.max()) + 1 - conf_mix) / 2
        threshold = float(u_mix.mean()) if orientation == "uncertainty" else float(1 - u_mix.mean())
    return Novelty(score=u.float(), threshold=threshold, novel=u > threshold, outlier_score=u_mix.float())
