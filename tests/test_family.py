"""A second model family needs only a module and a registration: fine-tuning, checkpoints and annotation run on it.

The toy family reads expression values (not bins), prepends a learned <cls> embedding and classifies from it, as a
transformer family would; nothing outside this file knows about it.
"""

import anndata as ad
import numpy as np
import pytest
import torch
from torch import nn

import annotate
import finetune
import models
from performer_pytorch import load_checkpoint
from tests.test_training import write_preprocessed


class ValueVocab:
    def __init__(self, gene_num):
        self.gene_num = gene_num

    def make_cell(self, values):
        return {"values": torch.as_tensor(np.asarray(values, dtype=np.float32))}  # (genes,)

    def make_batch(self, values):
        values = values.toarray() if hasattr(values, "toarray") else values
        return {"values": torch.as_tensor(np.asarray(values, dtype=np.float32))}  # (cells, genes)


class ClsHead(nn.Module):
    def __init__(self, dim, n_classes):
        super().__init__()
        self.config = {"dim": dim, "n_classes": n_classes}
        self.hidden = nn.Linear(dim, dim)
        self.out = nn.Linear(dim, n_classes)

    def forward(self, encodings, return_hidden=False):
        hidden = torch.relu(self.hidden(encodings[:, 0]))  # the <cls> token
        logits = self.out(hidden)
        return (logits, hidden) if return_hidden else logits


class ToyFamily(nn.Module):
    def __init__(self, *, gene_num, dim, depth, lm_head=False):
        super().__init__()
        self.config = {"gene_num": gene_num, "dim": dim, "depth": depth}
        self.cls = nn.Parameter(torch.zeros(dim))
        self.gene = nn.Embedding(gene_num, dim)
        self.value = nn.Linear(1, dim)
        self.blocks = nn.ModuleList(nn.Linear(dim, dim) for _ in range(depth))
        self.norm = nn.LayerNorm(dim)
        self.to_out = None

    vocab = property(lambda self: ValueVocab(self.config["gene_num"]))
    vocab_for = staticmethod(lambda config: ValueVocab(config["gene_num"]))
    head = property(lambda self: self.to_out)

    @property
    def head_config(self):
        return None if self.to_out is None else {"type": "classifier", **self.to_out.config}

    def make_batch(self, values):
        return self.vocab.make_batch(values)

    def encode(self, batch):
        values = batch["values"]
        x = self.gene.weight.unsqueeze(0) + self.value(values.unsqueeze(-1))  # (cells, genes, dim)
        x = torch.cat([self.cls.expand(len(values), 1, -1), x], dim=1)  # (cells, 1 + genes, dim)
        for block in self.blocks:
            x = x + torch.tanh(block(x))
        return self.norm(x)

    def pool(self, encodings, batch):
        return encodings[:, 0].float()

    def named_blocks(self):
        return [(f"block{i}", b) for i, b in enumerate(self.blocks)]

    def trainable_groups(self, spec):
        parsed = models.parse_block_spec(spec, len(self.blocks)) if not isinstance(spec, list) else spec
        if parsed == "all":
            return [self.gene, self.value, self.blocks, self.norm]
        return [self.norm, *(self.blocks[i] for i in parsed)]

    def attach_head(self, n_classes, **options):
        self.to_out = ClsHead(self.config["dim"], n_classes)
        return self

    def forward(self, batch, return_hidden=False):
        return self.to_out(self.encode(batch), return_hidden=return_hidden)

    def classify(self, batch, return_hidden=False):
        return self(batch, return_hidden=return_hidden)

    @classmethod
    def from_checkpoint(cls, ckpt, *, head="checkpoint", **overrides):
        model = cls(**ckpt.config)
        state = dict(ckpt.state_dict)
        if head == "checkpoint" and ckpt.head is not None:
            model.attach_head(ckpt.head["n_classes"])
        else:
            state = {k: v for k, v in state.items() if not k.startswith("to_out.")}
        model.load_state_dict(state, strict=True)
        return model

    @classmethod
    def config_from_args(cls, args):
        return {"gene_num": args.gene_num, "dim": args.dim, "depth": args.depth}, {}


@pytest.fixture
def toy():
    models.register_model("toy")(ToyFamily)
    yield
    models.MODEL_TYPES.pop("toy")


def test_a_second_family_fine_tunes_saves_resumes_and_annotates(toy, tmp_path):
    genes = write_preprocessed(tmp_path / "d.h5ad", n_cells=120, n_modules=2, genes_per_module=4)
    argv = ["--data_path", str(tmp_path / "d.h5ad"), "--model_type", "toy", "--gene_num", str(len(genes)), "--dim",
            "8", "--depth", "2", "--pos_embed", "False", "--batch_size", "16", "--grad_acc", "1", "--learning_rate",
            "1e-2", "--ckpt_dir", str(tmp_path / "ckpts"), "--unfreeze_layers", "all", "--label_key", "celltype"]
    [best] = finetune.main([*argv, "--epoch", "3"])
    ckpt = load_checkpoint(str(tmp_path / "ckpts" / "finetune_best.pth"))
    assert ckpt.model_type == "toy" and ckpt.classes == ["type0", "type1", "type2", "type3"]
    assert isinstance(models.load_model(ckpt), ToyFamily)
    [resumed] = finetune.main([*argv, "--epoch", "4"])  # the same command with more epochs continues the run
    assert resumed["epoch"] >= best["epoch"]

    query = ad.read_h5ad(tmp_path / "d.h5ad")
    out = annotate.annotate(query, str(tmp_path / "ckpts" / "finetune_best.pth"), embeddings=True,
                            label_key="celltype")
    assert out.obsm["scbert_probabilities"].shape == (120, 4) and out.obsm["X_scbert"].shape == (120, 8)
    assert out.uns["scbert_predict"]["params"]["model_type"] == "toy"
    assert 0.0 <= out.uns["scbert_predict"]["metrics"]["accuracy"] <= 1.0
