"""The classification head cannot collapse to one class: its gene scorer starts alive on every seed, a dead head is
detected during fine-tuning, restarted with one sentence, never saved as the best model, and a run whose head keeps
dying stops with a clear error."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import finetune
import head_health
from performer_pytorch import (
    ClassificationHead,
    PerformerLM,
    build_model,
    checkpoint_payload,
    load_checkpoint,
    save_checkpoint,
)
from utils import PREPROCESS_UNS_KEY, ScbertError, tokenize

N_GENES, MARKERS, TYPES = 60, 4, 3


def write_cells(path, seed=0, per_type=20):
    """Like the demo's data: most genes of a cell are unexpressed (the same bin-0 token), a few markers per type."""
    rng = np.random.default_rng(seed)
    blocks, names = [], []
    for k in range(TYPES):
        x = np.where(rng.random((per_type, N_GENES)) < 0.1, rng.uniform(0.2, 2.8, (per_type, N_GENES)), 0.0)
        x[:, k * MARKERS:(k + 1) * MARKERS] = rng.uniform(3.0, 4.9, (per_type, MARKERS))
        blocks.append(x)
        names += [f"type{k}"] * per_type
    obs = pd.DataFrame({"celltype": pd.Categorical(names)}, index=[f"c{i}" for i in range(len(names))])
    adata = ad.AnnData(sp.csr_matrix(np.vstack(blocks).astype(np.float32)), obs=obs,
                       var=pd.DataFrame(index=[f"G{i}" for i in range(N_GENES)]))
    adata.uns[PREPROCESS_UNS_KEY] = {"params": {"target_sum": 1e4, "log_base": 2.0, "min_genes": 0,
                                                "reference": "synthetic", "revision": "none"},
                                     "summary": {"cells_in": adata.n_obs, "cells_removed": 0}}
    adata.write_h5ad(path)
    return adata


def write_trunk(path, genes, seed=0):
    """A tiny 'pretrained' trunk whose gene2vec rows are zero for two genes in three (as gene2vec.py's zero fallback
    gave the demo), so most genes of a cell have the same token and the same encoding."""
    torch.manual_seed(seed)
    table = torch.randn(len(genes), 16)
    table[torch.arange(len(genes)) % 3 != 0] = 0.0
    model = PerformerLM(num_tokens=7, max_seq_len=len(genes) + 1, dim=16, depth=2, heads=2, dim_head=8,
                        gene2vec=table)
    save_checkpoint(checkpoint_payload(model, genes=list(genes)), str(path))
    return str(path)


@pytest.fixture(scope="module")
def cells(tmp_path_factory):
    folder = tmp_path_factory.mktemp("head_health")
    adata = write_cells(folder / "cells.h5ad")
    return folder / "cells.h5ad", write_trunk(folder / "trunk.pth", adata.var_names), adata


def run(cells, ckpt_dir, seed, *extra):
    data, trunk, _ = cells
    argv = ["--data_path", str(data), "--model_path", trunk, "--gene_num", str(N_GENES), "--ckpt_dir", str(ckpt_dir),
            "--batch_size", "8", "--grad_acc", "1", "--learning_rate", "1e-3", "--epoch", "6", "--seed", str(seed),
            "--model_name", "ft", *map(str, extra)]
    best = finetune.main(argv)[0]
    log = [json.loads(line) for line in open(ckpt_dir / "ft_log.jsonl")]
    return best, log


def positive_share(model, adata):
    tokens = torch.stack([tokenize(row, 5) for row in adata.X.toarray()])
    with torch.no_grad():
        encodings = model.eval()(tokens, return_encodings=True)
        return float((model.to_out.gene_scores(encodings) > 0).float().mean())


def test_a_new_head_scores_every_gene_positively_with_its_spread_kept():
    torch.manual_seed(0)
    head = ClassificationHead(seq_len=9, dim=16, n_classes=3)
    x = torch.randn(4, 9, 16) * 0.2 + torch.randn(16) * 5  # a large component common to every gene
    head.reset_gene_scorer()  # data-free: every score 1
    assert torch.equal(head.gene_scores(x), torch.ones(4, 9))
    for seed in range(10):
        torch.manual_seed(seed)
        head.reset_gene_scorer(x)
        raw = x @ head.conv1.weight.view(-1)
        scores = head.gene_scores(x)
        assert (scores > 0).all()
        assert torch.allclose(scores.std(), raw.std(), rtol=1e-4)  # a shift, not a squash
        assert torch.allclose(scores.min(), raw.std(), rtol=1e-4)


def test_the_new_scorer_is_alive_where_the_default_draw_is_nearly_dead(cells):
    """Why reset_gene_scorer exists: with PyTorch's draw, some seeds score over 90% of the genes <= 0 at once (the
    demo's pretrained trunk: all of them, on seed 1); the reset scorer is positive for every gene on every seed."""
    _, trunk, adata = cells
    model = build_model(load_checkpoint(trunk), head="none")
    tokens = torch.stack([tokenize(row, 5) for row in adata.X[:16].toarray()])
    with torch.no_grad():
        encodings = model.eval()(tokens, return_encodings=True)
    shares = []
    for seed in range(20):
        torch.manual_seed(seed)
        head = ClassificationHead(seq_len=N_GENES + 1, dim=16, n_classes=TYPES)
        shares.append(float((head.gene_scores(encodings) > 0).float().mean()))
        head.reset_gene_scorer(encodings[:4])
        assert float((head.gene_scores(encodings) > 0).float().mean()) > 0.99
    assert min(shares) < 0.1, shares


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_fine_tuning_does_not_collapse_to_one_class_on_any_seed(cells, tmp_path, seed):
    best, log = run(cells, tmp_path, seed)
    assert not any(record["head_dead"] for record in log), log
    assert best["accuracy"] > 0.9, best  # one class would be 1/3
    predicted = np.asarray(best["confusion_matrix"]).sum(axis=0)
    assert (predicted > 0).sum() == TYPES
    model = build_model(load_checkpoint(str(tmp_path / "ft_best.pth")), head="checkpoint")
    assert positive_share(model, cells[2]) > 0.05


def test_a_dead_head_is_detected_restarted_and_never_kept_as_best(cells, tmp_path, monkeypatch, capsys):
    """The head is made to start dead (every gene score < 0); after the first validation it is restarted from the
    training cells and then learns."""
    real = ClassificationHead.reset_gene_scorer
    calls = []

    def dead_first(self, encodings=None):
        real(self, encodings)
        if encodings is not None and not calls:  # the start from training cells; the restart is left alone
            with torch.no_grad():
                self.conv1.bias.fill_(-1e3)
            calls.append(1)

    monkeypatch.setattr(ClassificationHead, "reset_gene_scorer", dead_first)
    best, log = run(cells, tmp_path, 0)
    out = capsys.readouterr().out
    assert "epoch 1: every gene score of the classification head is 0" in out and "restarted" in out
    assert log[0]["head_dead"] and log[0]["gene_scores_positive"] == 0.0 and not log[0]["best"]
    assert not any(record["head_dead"] for record in log[1:])
    assert best["epoch"] > 1 and best["accuracy"] > 0.9


def test_a_head_that_keeps_dying_stops_the_run_without_a_best_model(cells, tmp_path, monkeypatch):
    def always_dead(self, encodings=None):
        with torch.no_grad():
            self.conv1.weight.zero_()
            self.conv1.bias.fill_(-1e3)

    monkeypatch.setattr(ClassificationHead, "reset_gene_scorer", always_dead)
    with pytest.raises(ScbertError, match="died 3 times despite restarts; lower --learning_rate"):
        run(cells, tmp_path, 0)
    assert not (tmp_path / "ft_best.pth").exists()


def test_head_watch_sees_constant_logits_and_ignores_models_without_a_head():
    head = ClassificationHead(seq_len=5, dim=8, n_classes=3)
    model = torch.nn.Module()
    model.to_out = head
    with head_health.HeadWatch(model) as watch:
        head(torch.randn(6, 5, 8))
    assert not watch.result().dead
    with torch.no_grad():
        head.fc2.bias.fill_(-1e3)  # the second ReLU is 0 for every cell: logits constant though scores are not
        head.fc2.weight.zero_()
    with head_health.HeadWatch(model) as watch:
        head(torch.randn(6, 5, 8))
    health = watch.result()
    assert health.positive_share > 0 and health.logit_range == 0.0 and health.dead
    with head_health.HeadWatch(torch.nn.Linear(2, 2)) as watch:
        pass
    assert not watch.result().dead
