"""The scGPT-style transformer: value-regression pretraining on binned expression (the scLLM-pretrain recipe).

Facts from scGPT's released configuration and the scLLM-pretrain run (see the README). Written from those
facts; no upstream code.

A cell is its non-zero genes in gene order, `<cls>` first. Each token is a gene id and a value (its bin; `<cls>` 0,
padding -2, a masked value -1). Input = LayerNorm(Embedding(gene)) + value encoder (clamp 512, Linear(1, d), ReLU,
Linear(d, d), LayerNorm, dropout); no positional encoding (a set of genes has no order). A stack of post-norm
encoder layers (softmax attention through `scaled_dot_product_attention` with a key-padding mask, ReLU feed-forward)
gives one encoding per token; the `<cls>` encoding is the cell embedding. Pretraining regresses the masked values
twice: the expression decoder from each token's encoding, and the MVC decoder from the cell embedding and a query
made of the gene's identity alone; loss = masked MSE + masked MSE, 1:1, over masked positions only.

Public pieces, in the order a run uses them:
- `GeneVocab`: genes + `<pad>`, `<cls>` as a plain list (it travels in the checkpoint); `tokenize_cells` of a binned
  CSR matrix, `collate` (pad to the batch's longest cell, cap `max_seq_len` by subsampling that keeps `<cls>`).
- `mask_values`: value -1 at exactly floor(ratio * genes) positions per cell, never `<cls>` or pads.
- `TransformerModel`: `forward(genes, values)`, `encode`, `pool`, `named_blocks`, `attach_head`, `classify`.
- `pretraining_losses`, `masked_mse`, `baseline_mses`: the objective and the trivial baselines.
- `save_transformer` / `load_transformer`: a checkpoint that rebuilds the model (config, vocabulary, head).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from utils import ScbertError, atomic_write_bytes

__all__ = [
    "CLS_TOKEN",
    "CLS_VALUE",
    "MASK_RATIOS",
    "MASK_VALUE",
    "MODEL_TYPE",
    "PAD_TOKEN",
    "PAD_VALUE",
    "RECIPE",
    "GeneVocab",
    "TransformerModel",
    "baseline_mses",
    "load_transformer",
    "mask_values",
    "masked_mse",
    "pretraining_losses",
    "save_transformer",
]

MODEL_TYPE = "transformer"
PAD_TOKEN, CLS_TOKEN = "<pad>", "<cls>"
PAD_VALUE, MASK_VALUE, CLS_VALUE = -2.0, -1.0, 0.0  # scGPT's continuous-value conventions
MASK_RATIOS = (0.25, 0.5, 0.75)  # scGPT draws one per batch; scLLM fixes 0.5
VALUE_CLAMP = 512.0  # the value encoder clamps its input here (scGPT)
# The released whole-human model and scLLM's run: 12 layers x 8 heads, d 512, feed-forward 512, dropout 0.2,
# sequences capped at 1,201 tokens (1,200 genes + <cls>), 51 bins.
RECIPE = dict(dim=512, depth=12, heads=8, ff_dim=512, dropout=0.2, max_seq_len=1201, n_bins=51)


# ---------------------------------------------------------------------------------------------------------------------
# Vocabulary and tokens
# ---------------------------------------------------------------------------------------------------------------------


class GeneVocab:
    """Genes in the data's column order, then `<pad>` and `<cls>`: token id = position in `tokens`.

    A gene's id is its column in the binned matrix, so tokenising needs no lookup. `to_list()` is what a checkpoint
    stores; `GeneVocab.from_list` checks it.
    """

    def __init__(self, genes: Sequence[str]):
        genes = [str(g) for g in genes]
        if not genes:
            raise ScbertError("the vocabulary needs at least one gene: pass data with genes")
        if len(set(genes)) != len(genes):
            seen: set[str] = set()
            first = next(g for g in genes if g in seen or seen.add(g))
            raise ScbertError(f"gene {first!r} appears twice in the gene list: make var_names unique first")
        if PAD_TOKEN in genes or CLS_TOKEN in genes:
            raise ScbertError(f"a gene is named {PAD_TOKEN} or {CLS_TOKEN}: rename it, these are special tokens")
        self.tokens = [*genes, PAD_TOKEN, CLS_TOKEN]

    @classmethod
    def from_list(cls, tokens: Sequence[str]) -> GeneVocab:
        tokens = [str(t) for t in tokens]
        if len(tokens) < 3 or tokens[-2:] != [PAD_TOKEN, CLS_TOKEN]:
            raise ScbertError(
                f"the stored vocabulary does not end in {PAD_TOKEN}, {CLS_TOKEN}: the checkpoint was not written by "
                f"this project's transformer"
            )
        return cls(tokens[:-2])

    def to_list(self) -> list[str]:
        return list(self.tokens)

    @property
    def genes(self) -> list[str]:
        return self.tokens[:-2]

    @property
    def gene_num(self) -> int:
        return len(self.tokens) - 2

    @property
    def pad_id(self) -> int:
        return len(self.tokens) - 2

    @property
    def cls_id(self) -> int:
        return len(self.tokens) - 1

    def __len__(self) -> int:
        return len(self.tokens)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GeneVocab) and other.tokens == self.tokens

    max_seq_len: int | None = None  # a cap on tokens per cell (pretraining: 1,201); None: every non-zero gene

    def cell_tokens(
        self, row: sp.spmatrix | np.ndarray, max_seq_len: int | None = None, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One cell's bins, (genes,) or a 1-row CSR -> (gene ids, values), each (1 + non-zero genes,), capped."""
        row = sp.csr_matrix(np.asarray(row).reshape(1, -1) if not sp.issparse(row) else row)
        if row.shape != (1, self.gene_num):
            raise ScbertError(f"a cell has {row.shape[1]} genes but the vocabulary {self.gene_num}: align the genes")
        row.sort_indices()
        keep = row.data != 0
        genes = torch.as_tensor(row.indices[keep].astype(np.int64))
        values = torch.as_tensor(row.data[keep].astype(np.float32))
        if max_seq_len is not None and genes.numel() + 1 > max_seq_len:
            # Random subsampling, genes kept in order; <cls> is added after, so it is always kept.
            chosen = torch.randperm(genes.numel(), generator=generator)[: max_seq_len - 1].sort().values
            genes, values = genes[chosen], values[chosen]
        genes = torch.cat([torch.tensor([self.cls_id]), genes])
        values = torch.cat([torch.tensor([CLS_VALUE]), values])
        return genes, values

    def make_cell(self, values: np.ndarray | sp.spmatrix) -> dict[str, torch.Tensor]:
        """The batch entries of one cell (variable length; `collate` pads them), capped at `self.max_seq_len`."""
        genes, vals = self.cell_tokens(values, self.max_seq_len)
        return {"genes": genes, "values": vals}

    def collate(self, items: Sequence[dict[str, Any] | tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Cells (`make_cell` dicts, maybe with "index"/"label", or (genes, values) pairs) -> a batch:
        {"genes": (cells, L) int64, "values": (cells, L) float32, ...}, L = the longest cell; shorter cells padded
        with the pad id and PAD_VALUE; other entries stacked."""
        pairs = [(it["genes"], it["values"]) if isinstance(it, dict) else it for it in items]
        length = max(g.numel() for g, _ in pairs)
        genes = torch.full((len(pairs), length), self.pad_id, dtype=torch.long)
        values = torch.full((len(pairs), length), PAD_VALUE, dtype=torch.float32)
        for i, (g, v) in enumerate(pairs):
            genes[i, : g.numel()] = g
            values[i, : v.numel()] = v
        batch = {"genes": genes, "values": values}
        if items and isinstance(items[0], dict):
            for key in items[0]:
                if key not in batch:
                    batch[key] = torch.as_tensor([it[key] for it in items])
        return batch

    def tokenize_cells(
        self, bins: sp.spmatrix, max_seq_len: int | None = None, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """A binned (cells, genes) CSR matrix (the vocabulary's genes in order) -> one padded batch (`collate`)."""
        bins = sp.csr_matrix(bins)
        return self.collate([self.cell_tokens(bins[i], max_seq_len, generator) for i in range(bins.shape[0])])

    def make_batch(self, values: np.ndarray | sp.spmatrix) -> dict[str, torch.Tensor]:
        """(cells, genes) bins -> a padded batch, without a length cap (prediction sees every non-zero gene)."""
        return self.tokenize_cells(sp.csr_matrix(values))


def mask_values(
    batch: dict[str, torch.Tensor],
    mask_ratio: float | Sequence[float] = 0.5,
    *,
    pad_id: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Hide values for pretraining. batch: {"genes", "values"} (cells, L) from `collate`.

    mask_ratio: a fixed ratio (scLLM: 0.5) or a sequence to draw one ratio from for this batch (scGPT: MASK_RATIOS).
    Per cell, exactly floor(ratio * g) of its g gene positions (not `<cls>` at position 0, not pads) are chosen
    uniformly without replacement; `<cls>` and pads are never candidates (both upstreams could mask `<cls>`).
    Returns (values with MASK_VALUE at the chosen positions, (cells, L) bool chosen, the ratio used).
    """
    if isinstance(mask_ratio, (int, float)):
        ratio = float(mask_ratio)
    else:
        ratios = list(mask_ratio)
        ratio = float(ratios[int(torch.randint(len(ratios), (1,), generator=generator))])
    if not 0.0 <= ratio <= 1.0:
        raise ScbertError(f"--mask_ratio {ratio} is outside 0..1: pass for example 0.5")
    genes, values = batch["genes"], batch["values"]
    candidates = genes != pad_id
    candidates[:, 0] = False  # <cls>
    n_candidates = candidates.sum(dim=1)
    k = torch.floor(n_candidates.double() * ratio + 1e-9).long()  # exact at whole products (0.5 * 4 is 2)
    scores = torch.rand(genes.shape, generator=generator).to(values.device).masked_fill(~candidates, -1.0)
    order = scores.argsort(dim=1, descending=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(genes.shape[1], device=genes.device).expand_as(order))
    chosen = (ranks < k.unsqueeze(1)) & candidates
    return values.masked_fill(chosen, MASK_VALUE), chosen, ratio


# ---------------------------------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------------------------------


class ValueEncoder(nn.Module):
    """(cells, L) values -> (cells, L, dim): clamp at 512, Linear(1, d), ReLU, Linear(d, d), LayerNorm, dropout.
    Mask (-1) and pad (-2) values go through as ordinary numbers, as in scGPT."""

    def __init__(self, dim: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(1, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        x = values.clamp(max=VALUE_CLAMP).unsqueeze(-1)
        return self.dropout(self.norm(self.fc2(F.relu(self.fc1(x)))))


class EncoderLayer(nn.Module):
    """Post-norm transformer layer: x = LN(x + drop(MHA(x))); x = LN(x + drop(FF(x))), FF = Linear, ReLU, Linear.

    q, k and v come from one packed Linear(d, 3d) (the layout of torch's `in_proj` and scGPT's `Wqkv`). Attention is
    `F.scaled_dot_product_attention` with a boolean key mask, so torch picks a fused kernel where it can.
    """

    def __init__(self, dim: int, heads: int, ff_dim: int, dropout: float):
        super().__init__()
        if dim % heads:
            raise ScbertError(f"--dim {dim} is not a multiple of --heads {heads}: pick sizes that divide")
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out_proj = nn.Linear(dim, dim)
        self.ff1 = nn.Linear(dim, ff_dim)
        self.ff2 = nn.Linear(ff_dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = dropout

    def attention(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """x (cells, L, d); keep (cells, 1, 1, L) bool, True for keys to attend to -> (cells, L, d)."""
        b, length, d = x.shape
        q, k, v = self.qkv(x).view(b, length, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # (b, h, L, dh)
        p = self.dropout if self.training else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=p)  # (b, h, L, dh)
        return self.out_proj(out.transpose(1, 2).reshape(b, length, d))

    def forward(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        x = self.norm1(x + F.dropout(self.attention(x, keep), self.dropout, self.training))
        ff = self.ff2(F.dropout(F.relu(self.ff1(x)), self.dropout, self.training))
        return self.norm2(x + F.dropout(ff, self.dropout, self.training))


class ExprDecoder(nn.Module):
    """(cells, L, d) encodings -> (cells, L) predicted values: Linear, LeakyReLU, Linear, LeakyReLU, Linear(d, 1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, dim), nn.LeakyReLU(), nn.Linear(dim, 1)
        )

    def forward(self, encodings: torch.Tensor) -> torch.Tensor:
        return self.net(encodings).squeeze(-1)


class MVCDecoder(nn.Module):
    """Masked value prediction from the cell embedding: pred_j = (W sigmoid(Q g_j)) . c.

    g_j: the gene's embedding alone (no value), c: the cell embedding. (cells, L, d), (cells, d) -> (cells, L).
    """

    def __init__(self, dim: int):
        super().__init__()
        self.query = nn.Linear(dim, dim)
        self.weight = nn.Linear(dim, dim, bias=False)

    def forward(self, gene_emb: torch.Tensor, cell_emb: torch.Tensor) -> torch.Tensor:
        query = self.weight(torch.sigmoid(self.query(gene_emb)))  # (cells, L, d)
        return torch.einsum("bld,bd->bl", query, cell_emb)


class ClsDecoder(nn.Module):
    """Cell-type head on the cell embedding (scGPT's: 3 layers): (n_layers - 1) x [Linear, ReLU, LayerNorm], Linear."""

    def __init__(self, dim: int, n_classes: int, n_layers: int = 3):
        super().__init__()
        blocks = []
        for _ in range(max(n_layers - 1, 0)):
            blocks += [nn.Linear(dim, dim), nn.ReLU(), nn.LayerNorm(dim)]
        self.hidden = nn.Sequential(*blocks)
        self.out = nn.Linear(dim, n_classes)

    def forward(self, cell_emb: torch.Tensor, return_hidden: bool = False):
        """(cells, dim) cell embeddings, or (cells, L, dim) encodings whose <cls> token is read -> logits."""
        if cell_emb.dim() == 3:
            cell_emb = cell_emb[:, 0]
        hidden = self.hidden(cell_emb)
        logits = self.out(hidden)
        return (logits, hidden) if return_hidden else logits


class TransformerModel(nn.Module):
    """The scGPT-style encoder with its pretraining decoders and an optional cell-type head.

    Keyword-only arguments (all in `config`, so `TransformerModel(**model.config)` rebuilds the trunk):
      vocab       the vocabulary: a GeneVocab or its plain list (genes, then <pad>, <cls>); it travels in `config`
      dim         model width d (512);       depth: encoder layers (12);   heads: attention heads (8)
      ff_dim      feed-forward width (512);  dropout: everywhere (0.2)
    Batch: {"genes": (cells, L) int64, "values": (cells, L) float32}, `<cls>` at position 0, pads = pad_id.
    """

    model_type = MODEL_TYPE

    def __init__(
        self, *, vocab: GeneVocab | Sequence[str], dim: int = 512, depth: int = 12, heads: int = 8, ff_dim: int = 512,
        dropout: float = 0.2, lm_head: bool = True,
    ):
        super().__init__()
        del lm_head  # the shared builder passes it; the pretraining decoders are always built (and small)
        vocab = vocab if isinstance(vocab, GeneVocab) else GeneVocab.from_list(vocab)
        self.vocab = vocab
        n_tokens, pad_id = len(vocab), vocab.pad_id
        self.config = dict(vocab=vocab.to_list(), dim=int(dim), depth=int(depth), heads=int(heads),
                           ff_dim=int(ff_dim), dropout=float(dropout))
        self.pad_id = pad_id
        self.gene_emb = nn.Embedding(n_tokens, dim, padding_idx=pad_id)
        self.gene_norm = nn.LayerNorm(dim)
        self.value_enc = ValueEncoder(dim, dropout)
        self.layers = nn.ModuleList(EncoderLayer(dim, heads, ff_dim, dropout) for _ in range(depth))
        self.expr_decoder = ExprDecoder(dim)
        self.mvc_decoder = MVCDecoder(dim)
        self.head: ClsDecoder | None = None
        self.head_config: dict[str, Any] | None = None
        nn.init.uniform_(self.gene_emb.weight, -0.1, 0.1)  # scGPT's initialisation of the gene table
        with torch.no_grad():
            self.gene_emb.weight[pad_id].zero_()

    def work_per_cell(self) -> int:
        """The size measure `performer_pytorch.cpu_threads` chooses threads by (tokens x width x width): tokens are
        a cell's genes, at most the recipe's 1,201 (a typical cell holds fewer than the vocabulary)."""
        tokens = min(len(self.vocab), RECIPE["max_seq_len"])
        return tokens * self.config["dim"] * self.config["dim"]

    def _gene_embedding(self, genes: torch.Tensor) -> torch.Tensor:
        return self.gene_norm(self.gene_emb(genes))  # (cells, L, d)

    def _encode(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        genes, values = batch["genes"], batch["values"]
        gene_emb = self._gene_embedding(genes)
        x = gene_emb + self.value_enc(values.to(gene_emb.dtype))
        keep = (genes != self.pad_id)[:, None, None, :]  # (cells, 1, 1, L): attend to non-pad keys
        for layer in self.layers:
            x = layer(x, keep)
        return x, gene_emb

    def encode(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """(cells, L, dim) encodings of every token (pads included; ignore them)."""
        return self._encode(batch)[0]

    def pool(self, encodings: torch.Tensor, batch: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """(cells, dim) cell embeddings: the `<cls>` encoding, float32."""
        return encodings[:, 0].float()

    def forward(self, batch: dict[str, torch.Tensor], return_hidden: bool = False):
        """With a cell-type head: its logits (and hidden with `return_hidden`). Without one: the pretraining outputs
        {"expr": (cells, L), "mvc": (cells, L), "cell": (cells, dim)}."""
        encodings, gene_emb = self._encode(batch)
        cell = encodings[:, 0]
        if self.head is not None:
            return self.head(cell, return_hidden=return_hidden)
        return {"expr": self.expr_decoder(encodings), "mvc": self.mvc_decoder(gene_emb, cell), "cell": cell}

    def named_blocks(self) -> list[tuple[str, nn.Module]]:
        return [(f"layer{i}", layer) for i, layer in enumerate(self.layers)]

    def trainable_groups(self, spec: str | Sequence[int] | list[int]) -> list[nn.Module]:
        """The trunk modules that train under an --unfreeze_layers spec: "all" -> embeddings, value encoder and every
        layer (scGPT fine-tunes everything); block indices -> those layers. The head is added by the caller."""
        from models import parse_block_spec

        parsed = parse_block_spec(spec, len(self.layers)) if not isinstance(spec, list) else spec
        if parsed == "all":
            return [self.gene_emb, self.gene_norm, self.value_enc, self.layers]
        return [self.layers[i] for i in parsed]

    def make_batch(self, values: np.ndarray | sp.spmatrix) -> dict[str, torch.Tensor]:
        return self.vocab.make_batch(values)

    @staticmethod
    def vocab_for(config: dict[str, Any]) -> GeneVocab:
        return GeneVocab.from_list(config["vocab"])

    @classmethod
    def from_checkpoint(cls, ckpt: Any, *, head: str = "checkpoint", **overrides: Any) -> TransformerModel:
        """The model of a `performer_pytorch.checkpoint.Checkpoint` (any object with payload) loaded strictly."""
        return load_transformer(ckpt.payload, head="none" if head in ("none", "lm") else head, **overrides)[0]

    @classmethod
    def config_from_args(cls, args: Any, genes: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, Any]]:
        """(config, options) from the shared flags (--dim --depth --heads; --ff_dim, --dropout if present) and the
        data's genes (`args.genes`, set by the data loader)."""
        genes = genes if genes is not None else args.genes
        config = dict(vocab=GeneVocab(genes).to_list(), dim=args.dim, depth=args.depth, heads=args.heads,
                      ff_dim=getattr(args, "ff_dim", None) or args.dim, dropout=getattr(args, "dropout", 0.2))
        return config, {}

    def attach_head(self, n_classes: int, *, n_layers: int = 3) -> TransformerModel:
        """A fresh cell-type head (`ClsDecoder`) for `n_classes` on the `<cls>` embedding; returns the model."""
        self.head = ClsDecoder(self.config["dim"], int(n_classes), int(n_layers))
        self.head_config = {"type": "classifier", "n_classes": int(n_classes), "n_layers": int(n_layers)}
        return self

    def classify(self, batch: dict[str, torch.Tensor], return_hidden: bool = False):
        """(cells, n_classes) logits, or (logits, (cells, dim) input of the last Linear) with `return_hidden`."""
        if self.head is None:
            raise ValueError("this model has no cell-type head: call attach_head(n_classes) first")
        return self(batch, return_hidden=return_hidden)


# ---------------------------------------------------------------------------------------------------------------------
# Objective and baselines
# ---------------------------------------------------------------------------------------------------------------------


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of (pred - target)^2 over the True positions of `mask` (all (cells, L)); float32, 0-dim."""
    mask = mask.float()
    return (((pred.float() - target.float()) ** 2) * mask).sum() / mask.sum().clamp(min=1.0)


def pretraining_losses(
    model: nn.Module, batch: dict[str, torch.Tensor], masked_values: torch.Tensor, chosen: torch.Tensor
) -> dict[str, torch.Tensor]:
    """{"loss": expr + mvc, "expr": masked MSE of the expression decoder, "mvc": of the MVC decoder}.

    batch holds the true values; the model sees `masked_values`; both MSEs run over the `chosen` positions only.
    """
    out = model({"genes": batch["genes"], "values": masked_values})  # through forward, so DDP syncs gradients
    if not isinstance(out, dict):
        raise ValueError("pretraining needs the model without a cell-type head")
    expr = masked_mse(out["expr"], batch["values"], chosen)
    mvc = masked_mse(out["mvc"], batch["values"], chosen)
    return {"loss": expr + mvc, "expr": expr, "mvc": mvc}


def baseline_mses(batch: dict[str, torch.Tensor], chosen: torch.Tensor, pad_id: int) -> dict[str, torch.Tensor]:
    """Sums of squared errors of the trivial predictors on the `chosen` positions, and their count.

    cell_mean: each cell's mean bin over all its genes (it even sees the masked values: a generous baseline);
    constant: returned as sums so a caller can form the pooled variance (the MSE of predicting the global mean).
    Returns {"cell_mean_sse", "sum", "sum_sq", "n"} as float64 0-dim tensors.
    """
    genes, values = batch["genes"], batch["values"].double()
    is_gene = genes != pad_id
    is_gene[:, 0] = False
    cell_mean = (values * is_gene).sum(dim=1) / is_gene.sum(dim=1).clamp(min=1)  # (cells,)
    target = values[chosen]
    pred = cell_mean.unsqueeze(1).expand_as(values)[chosen]
    return {
        "cell_mean_sse": ((pred - target) ** 2).sum(),
        "sum": target.sum(),
        "sum_sq": (target**2).sum(),
        "n": torch.tensor(float(target.numel()), dtype=torch.float64),
    }


def constant_mse(totals: dict[str, float]) -> float:
    """MSE of predicting the pooled mean of the targets (about 208 for bins spread evenly over 1..50)."""
    n = max(totals["n"], 1.0)
    return totals["sum_sq"] / n - (totals["sum"] / n) ** 2


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------------------------------


def transformer_payload(model: TransformerModel, vocab: GeneVocab, **extra: Any) -> dict[str, Any]:
    """What a transformer checkpoint holds: weights, `model_type`, `config` (with the vocabulary as a plain list),
    `head`, `genes`."""
    core = getattr(model, "module", model)
    return {
        "model_state_dict": {k: v.detach().cpu() for k, v in core.state_dict().items()},
        "model_type": MODEL_TYPE,
        "config": dict(core.config),
        "head": core.head_config,
        "genes": vocab.genes,
        **extra,
    }


def save_transformer(path: str, model: TransformerModel, vocab: GeneVocab, **extra: Any) -> None:
    """Write the checkpoint atomically (temp file + rename); call on rank 0 only."""
    buffer = io.BytesIO()
    torch.save(transformer_payload(model, vocab, **extra), buffer)
    atomic_write_bytes(path, buffer.getvalue())


def load_transformer(
    path_or_payload: str | dict[str, Any], *, head: str = "checkpoint", **overrides: Any
) -> tuple[TransformerModel, GeneVocab, dict[str, Any]]:
    """(model, vocab, payload) from a transformer checkpoint, weights loaded strictly (`weights_only=True`).

    head: "checkpoint" (its own head, if any) or "none" (the trunk and decoders only, to attach a new head).
    overrides: config entries that leave weight shapes alone (dropout).
    """
    if isinstance(path_or_payload, dict):
        payload = path_or_payload
    else:
        try:
            payload = torch.load(path_or_payload, map_location="cpu", weights_only=True)
        except FileNotFoundError as err:
            raise ScbertError(f"checkpoint {path_or_payload!r} does not exist: check --model_path") from err
        except Exception as err:  # pickle, zip and torch raise many types for foreign files
            raise ScbertError(
                f"could not read {path_or_payload!r} as a checkpoint ({type(err).__name__}): pass a .pth written by "
                f"pretrain.py or finetune.py"
            ) from err
    if not isinstance(payload, dict) or payload.get("model_type") != MODEL_TYPE:
        raise ScbertError("the checkpoint does not hold a transformer model: pass one written with --model_type "
                          "transformer")
    config = {**payload["config"], **overrides}
    model = TransformerModel(**config)
    vocab = model.vocab
    state = dict(payload["model_state_dict"])
    head_config = payload.get("head") if head == "checkpoint" else None
    if head_config:
        model.attach_head(head_config["n_classes"], n_layers=head_config["n_layers"])
    else:
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
    model.load_state_dict(state, strict=True)
    return model, vocab, payload
