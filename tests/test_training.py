"""The shared training plumbing: flags, schedule, data, loops, checkpoints and resume semantics."""

import argparse
import math

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import distributed
import training
from performer_pytorch import PerformerLM, load_checkpoint
from utils import PREPROCESS_UNS_KEY, ScbertError, tokenize

# ---- helpers shared with test_pretrain.py --------------------------------------------------------------------


def write_preprocessed(path, *, n_cells=640, n_modules=4, genes_per_module=12, dim=16, seed=0, gene2vec_path=None,
                       genes=None):
    """A preprocess.py-style .h5ad of cells whose genes come in modules sharing one expression bin per cell.

    Four cell types give each module a different level (bins 1..5), so a gene's bin is predictable from the other
    genes of its module, while predicting each cell's most common bin is right for about a quarter of its genes.
    With gene2vec_path, also writes a (genes, dim) table whose first columns say the module (what gene2vec learns
    from co-expression). Returns the gene list.
    """
    rng = np.random.default_rng(seed)
    n_genes = n_modules * genes_per_module
    levels = np.stack([rng.permutation(np.arange(1, 6))[:n_modules] for _ in range(4)])  # (types, modules)
    types = rng.integers(4, size=n_cells)
    module = np.repeat(np.arange(n_modules), genes_per_module)
    values = levels[types][:, module] + rng.uniform(0.05, 0.95, (n_cells, n_genes))
    values[rng.random(values.shape) < 0.1] = 0  # dropouts
    genes = list(genes) if genes is not None else [f"G{i}" for i in range(n_genes)]
    adata = ad.AnnData(
        sp.csr_matrix(values.astype(np.float32)),
        obs=pd.DataFrame({"celltype": [f"type{t}" for t in types]}, index=[f"cell{i}" for i in range(n_cells)]),
        var=pd.DataFrame(index=genes),
    )
    adata.uns[PREPROCESS_UNS_KEY] = {
        "params": {"target_sum": 10000.0, "log_base": 2.0, "min_genes": 200, "reference": "synthetic",
                   "revision": "none", "duplicates": "first"},
        "summary": {"genes_in": n_genes, "reference_genes": n_genes, "cells_in": n_cells, "cells_removed": 0},
    }
    adata.write_h5ad(path)
    if gene2vec_path is not None:
        table = rng.normal(0, 0.5, (n_genes, dim)).astype(np.float32)
        table[:, :n_modules] += 2 * np.eye(n_modules, dtype=np.float32)[module]
        np.save(gene2vec_path, table)
    return genes


def common_args(argv):
    return training.get_common_parser().parse_args(argv)


# ---- flags --------------------------------------------------------------------------------------------------


def test_common_flags_have_published_defaults_and_both_local_rank_spellings():
    args = common_args([])
    assert (args.bin_num, args.gene_num, args.epoch, args.seed, args.batch_size) == (5, 16906, 100, 2021, 3)
    assert (args.learning_rate, args.grad_acc, args.valid_every, args.pos_embed) == (1e-4, 60, 1, True)
    assert (args.ckpt_dir, args.dim, args.depth, args.heads, args.resume) == ("./ckpts/", 200, 6, 10, None)
    assert common_args(["--local_rank", "1"]).local_rank == 1
    assert common_args(["--local-rank=3"]).local_rank == 3
    assert common_args(["--pos_embed", "False", "--resume", "True"]).pos_embed is False
    args = common_args(["--ckpt_dir", "out", "--model_name", "m"])
    assert training.resolve_log_path(args).replace("\\", "/") == "out/m_log.jsonl"


def test_plain_process_reads_local_rank_from_the_environment_first(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("LOCAL_RANK", "0")
    ctx = training.setup_distributed(common_args(["--local_rank", "5", "--device", "cpu"]))
    assert (ctx.rank, ctx.world_size, ctx.local_rank, ctx.distributed, ctx.is_main) == (0, 1, 0, False, True)
    assert ctx.device.type == "cpu"


def test_leaving_the_process_group_waits_for_peers_only_on_a_normal_exit(monkeypatch):
    # Waiting on the way out is what keeps a gloo peer from aborting at shutdown; waiting while an error propagates
    # would hang a rank whose peers are elsewhere, so that path leaves at once.
    calls = []
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(distributed.dist, "barrier", lambda: calls.append("barrier"))
    monkeypatch.setattr(distributed.dist, "destroy_process_group", lambda: calls.append("destroy"))
    ctx = distributed.DistContext(rank=1, world_size=2, distributed=True, backend="gloo")
    try:
        pass
    finally:
        distributed.cleanup_distributed(ctx)
    assert calls == ["barrier", "destroy"]
    calls.clear()
    with pytest.raises(ScbertError):
        try:
            raise ScbertError("a refusal on this rank")
        finally:
            distributed.cleanup_distributed(ctx)
    assert calls == ["destroy"]
    distributed.cleanup_distributed(distributed.DistContext())  # one plain process: nothing to leave
    assert calls == ["destroy"]


# ---- schedule -----------------------------------------------------------------------------------------------

# SPEC section 6, lr by epoch for --learning_rate 1e-4 (three significant figures).
SPEC_LR = {1: 1.0e-6, 2: 2.08e-5, 3: 4.06e-5, 4: 6.04e-5, 5: 8.02e-5, 6: 1.0e-4, 7: 9.76e-5, 8: 9.06e-5, 9: 7.96e-5,
           10: 6.58e-5, 11: 5.05e-5, 12: 3.52e-5, 13: 2.14e-5, 14: 1.05e-5, 15: 3.42e-6, 16: 1.0e-6, 21: 9.0e-5,
           40: 1.55e-6, 41: 1.0e-6, 46: 8.1e-5}


def _schedule_lrs(n_epochs, lr=1e-4):
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    scheduler = training.CosineAnnealingWarmupRestarts(optimizer, first_cycle_steps=15, cycle_mult=2, max_lr=lr,
                                                       min_lr=1e-6, warmup_steps=5, gamma=0.9)
    lrs = []
    for _ in range(n_epochs):
        lrs.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    return lrs, scheduler


def test_schedule_reproduces_the_published_learning_rates_by_epoch():
    lrs, _ = _schedule_lrs(140)
    for epoch, expected in SPEC_LR.items():
        assert math.isclose(lrs[epoch - 1], expected, rel_tol=6e-3), (epoch, lrs[epoch - 1], expected)
    # Warm-up of the second cycle rises monotonically to 0.9 * max; restarts at 16, 41 and 86 (cycles 15, 25, 45).
    assert all(a < b for a, b in zip(lrs[15:20], lrs[16:21], strict=True))
    restarts = [epoch for epoch in range(2, 141) if lrs[epoch - 1] == 1e-6]
    assert restarts == [16, 41, 86]


def test_schedule_state_dict_resumes_the_same_sequence():
    lrs, _ = _schedule_lrs(30)
    _, scheduler = _schedule_lrs(12)
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    resumed = training.CosineAnnealingWarmupRestarts(optimizer, max_lr=1e-4)
    resumed.load_state_dict(scheduler.state_dict())
    rest = []
    for _ in range(18):
        rest.append(optimizer.param_groups[0]["lr"])
        resumed.step()
    assert rest == lrs[12:]


# ---- data ---------------------------------------------------------------------------------------------------


def test_cell_dataset_tokenises_one_cell_like_tokenize_and_carries_labels():
    dense = np.array([[0.0, 0.5, 1.2, 7.9], [3.3, 0.0, 0.0, 31.0], [0, 0, 0, 0]], dtype=np.float32)
    dataset = training.CellDataset(sp.csr_matrix(dense), indices=[2, 0], labels=[4, 5, 6])
    assert len(dataset) == 2
    item = dataset[1]
    assert torch.equal(item["tokens"], tokenize(dense[0]))
    assert item["tokens"].tolist() == [0, 0, 1, 5, 0]
    assert (item["index"], item["label"]) == (0, 4)
    assert dataset[0]["tokens"].tolist() == [0, 0, 0, 0, 0]


def test_loaders_cover_every_cell_once_for_evaluation_and_shuffle_per_epoch_for_training():
    dataset = training.CellDataset(sp.csr_matrix(np.ones((11, 3), dtype=np.float32)))
    seen = []
    for rank in range(3):
        ctx = training.DistContext(rank=rank, world_size=3)
        loader = training.build_loader(dataset, batch_size=2, ctx=ctx, train=False)
        seen += [int(i) for batch in loader for i in batch["index"]]
    assert sorted(seen) == list(range(11))
    ctx = training.DistContext(rank=0, world_size=2)
    loader = training.build_loader(dataset, batch_size=4, ctx=ctx, train=True, seed=1)
    orders = []
    for epoch in (1, 2, 1):
        training.set_loader_epoch(loader, epoch)
        orders.append([int(i) for batch in loader for i in batch["index"]])
    assert len(orders[0]) == 6  # ceil(11 / 2): every rank runs the same number of steps
    assert orders[0] == orders[2] and orders[0] != orders[1]


def test_bootstrap_sampler_draws_with_replacement_reproducibly():
    sampler = training.BootstrapSampler(50, rank=0, world_size=2, seed=3)
    sampler.set_epoch(1)
    first = list(sampler)
    sampler.set_epoch(2)
    assert len(first) == 25 and first != list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) == first


def test_training_data_is_checked_against_gene_num_preprocessing_and_checkpoint_genes(tmp_path):
    path = tmp_path / "cells.h5ad"
    genes = write_preprocessed(path, n_cells=20)
    args = common_args(["--data_path", str(path)])
    with pytest.raises(ScbertError, match=r"--gene_num 16906 .* has 48 genes: pass --gene_num 48"):
        training.load_training_data(args)
    args.gene_num = 48
    assert training.load_training_data(args).n_obs == 20
    with pytest.raises(ScbertError, match="not the model's 48 genes"):
        training.load_training_data(args, genes=genes[::-1], genes_source="old.pth")
    adata = ad.read_h5ad(path)
    del adata.uns[PREPROCESS_UNS_KEY]
    adata.write_h5ad(tmp_path / "raw.h5ad")
    args.data_path = str(tmp_path / "raw.h5ad")
    with pytest.raises(ScbertError, match="not written by preprocess.py"):
        training.load_training_data(args)


def test_model_from_flags_needs_gene2vec_when_pos_embed_is_on(tmp_path):
    args = common_args(["--gene_num", "4", "--dim", "8", "--depth", "1", "--heads", "2", "--dim_head", "4"])
    with pytest.raises(ScbertError, match="--gene2vec_path"):
        training.build_model_from_args(args, ["a", "b", "c", "d"])
    args.pos_embed = False
    model = training.build_model_from_args(args, ["a", "b", "c", "d"])
    assert model.config["num_tokens"] == 7 and model.config["max_seq_len"] == 5
    with pytest.raises(ScbertError, match="--gene_num 4 .* 3 genes"):
        training.build_model_from_args(args, ["a", "b", "c"])


# ---- loops --------------------------------------------------------------------------------------------------


def _linear_problem(n=12, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 3, generator=generator), torch.randn(n, generator=generator)
    dataset = [{"x": x[i], "y": y[i]} for i in range(n)]

    def loss_fn(model, batch):
        return ((model(batch["x"]).squeeze(-1) - batch["y"]) ** 2).mean(), {"cells": batch["x"].shape[0]}

    return x, y, dataset, loss_fn


def test_gradient_accumulation_equals_one_step_on_the_whole_batch():
    x, y, dataset, loss_fn = _linear_problem()
    torch.manual_seed(0)
    accumulated, single = torch.nn.Linear(3, 1), torch.nn.Linear(3, 1)
    single.load_state_dict(accumulated.state_dict())
    with torch.no_grad():
        micro_losses = [float(((accumulated(x[i : i + 3]).squeeze(-1) - y[i : i + 3]) ** 2).mean())
                        for i in range(0, 12, 3)]
    ctx = training.DistContext()
    loader = torch.utils.data.DataLoader(dataset, batch_size=3)  # 4 micro-batches of 3 -> one optimiser step
    optimizer = torch.optim.SGD(accumulated.parameters(), lr=0.1)
    out = training.train_one_epoch(accumulated, loader, optimizer, loss_fn, ctx=ctx, epoch=1, grad_acc=4,
                                   clip_norm=100.0)
    whole = torch.utils.data.DataLoader(dataset, batch_size=12)
    training.train_one_epoch(single, whole, torch.optim.SGD(single.parameters(), lr=0.1), loss_fn, ctx=ctx,
                             epoch=1, grad_acc=1, clip_norm=100.0)
    assert torch.allclose(accumulated.weight, single.weight, atol=1e-6)
    assert out["cells"] == 12 and out["steps"] == 4
    assert math.isclose(out["loss"], np.mean(micro_losses), rel_tol=1e-6)  # the mean of undivided micro-losses


def test_partial_accumulation_at_the_end_of_an_epoch_still_steps():
    _, _, dataset, loss_fn = _linear_problem(n=10)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    steps = []
    original = optimizer.step
    optimizer.step = lambda *a, **k: steps.append(1) or original(*a, **k)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2)  # 5 micro-batches, grad_acc 2 -> steps at 2, 4, 5
    training.train_one_epoch(model, loader, optimizer, loss_fn, ctx=training.DistContext(), epoch=1, grad_acc=2)
    assert len(steps) == 3
    assert all(p.grad is None for p in model.parameters())


def test_non_finite_loss_stops_with_a_message_naming_epoch_step_and_checkpoint():
    _, _, dataset, _ = _linear_problem()
    model = torch.nn.Linear(3, 1)
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss = model(batch["x"]).mean()
        return (loss * float("nan") if len(calls) == 3 else loss), {}

    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    with pytest.raises(training.NonFiniteLossError, match=r"epoch 7, step 3.*'m_6.pth' is kept"):
        training.train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                                 ctx=training.DistContext(), epoch=7, last_good="m_6.pth")
    assert torch.isfinite(model.weight).all()


def test_non_finite_gradient_stops_before_the_weights_change():
    _, _, dataset, _ = _linear_problem()
    model = torch.nn.Linear(3, 1)
    before = model.weight.detach().clone()

    def loss_fn(model, batch):
        out = model(batch["x"])
        return torch.sqrt(out - out.detach()).sum(), {}  # a finite loss (0) whose gradient is infinite

    loader = torch.utils.data.DataLoader(dataset, batch_size=3)
    with pytest.raises(training.NonFiniteLossError, match="gradient norm became non-finite at epoch 1, step 1"):
        training.train_one_epoch(model, loader, torch.optim.SGD(model.parameters(), lr=0.1), loss_fn,
                                 ctx=training.DistContext(), epoch=1, clip_norm=100.0)
    assert torch.equal(model.weight, before)


def test_amp_modes():
    with pytest.raises(ScbertError, match="fp16 needs a CUDA GPU"):
        training.Amp("fp16", torch.device("cpu"))
    amp = training.Amp("bf16", torch.device("cpu"))
    with amp.autocast():
        assert torch.nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.bfloat16


def test_evaluate_sums_numbers_and_returns_tensors_in_dataset_order():
    dataset = training.CellDataset(sp.csr_matrix(np.arange(12, dtype=np.float32).reshape(6, 2) / 2),
                                   indices=[5, 1, 3, 0])
    loader = training.build_loader(dataset, batch_size=3, ctx=training.DistContext(), train=False)
    model = torch.nn.Linear(1, 1)

    def step(core, batch):
        assert not core.training and not torch.is_grad_enabled()
        return {"index": batch["index"], "first": batch["tokens"][:, 0], "n": batch["tokens"].shape[0]}

    out = training.evaluate(model, loader, step, ctx=training.DistContext())
    assert model.training
    assert out["index"].tolist() == [0, 1, 3, 5] and out["n"] == 4 and out["cells"] == 4
    assert out["first"].tolist() == [0, 1, 3, 5]  # row r starts with value r


# ---- checkpoints --------------------------------------------------------------------------------------------


def _tiny_model():
    torch.manual_seed(0)
    return PerformerLM(num_tokens=7, max_seq_len=5, dim=8, depth=1, heads=2, dim_head=4, g2v_position_emb=False)


def _trained_state(model):
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    scheduler = training.CosineAnnealingWarmupRestarts(optimizer, max_lr=1e-3)
    model(torch.randint(0, 7, (2, 5))).sum().backward()
    optimizer.step()
    scheduler.step()
    return optimizer, scheduler


def test_checkpoint_roundtrip_restores_model_optimiser_scheduler_and_random_state(tmp_path):
    genes = ["a", "b", "c", "d"]
    ctx = training.DistContext()
    model = _tiny_model()
    optimizer, scheduler = _trained_state(model)
    path = training.epoch_checkpoint_path(str(tmp_path), "m", 3)
    torch.manual_seed(123)
    training.save_training_checkpoint(path, model=model, ctx=ctx, genes=genes, epoch=3, optimizer=optimizer,
                                      scheduler=scheduler, args=argparse.Namespace(seed=1, f=[1]), losses=0.5)
    after_save = torch.rand(3)
    # The reference's keys are there, and the shared reader rebuilds the model.
    raw = torch.load(path, weights_only=True)
    assert {"epoch", "model_state_dict", "optimizer_state_dict", "scheduler_state_dict", "losses"} <= set(raw)
    assert raw["args"] == {"seed": 1} and raw["genes"] == genes
    assert load_checkpoint(path).config == model.config

    fresh = _tiny_model()
    fresh_optimizer = torch.optim.Adam(fresh.parameters(), lr=1e-3)
    fresh_scheduler = training.CosineAnnealingWarmupRestarts(fresh_optimizer, max_lr=1e-3)
    torch.manual_seed(999)
    payload = training.restore_training_state(path, model=fresh, ctx=ctx, genes=genes, optimizer=fresh_optimizer,
                                              scheduler=fresh_scheduler)
    assert payload["epoch"] == 3
    assert torch.equal(torch.rand(3), after_save)
    for p, q in zip(model.parameters(), fresh.parameters(), strict=True):
        assert torch.equal(p, q)
        assert torch.equal(optimizer.state[p]["exp_avg"], fresh_optimizer.state[q]["exp_avg"])
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    with pytest.raises(ScbertError, match="genes"):
        training.restore_training_state(path, model=fresh, ctx=ctx, genes=["a", "b", "d", "c"])


class _Counter:
    """A stateful object a new kind of run might add (as CANAL's stage state or early stopping are)."""

    def __init__(self, value=0):
        self.value = value

    def state_dict(self):
        return {"value": self.value}

    def load_state_dict(self, state):
        self.value = state["value"]


def test_run_state_is_a_list_of_named_stateful_objects(tmp_path):
    ctx = training.DistContext()
    model = _tiny_model()
    path = training.epoch_checkpoint_path(str(tmp_path), "m", 1)
    settings = training.RunSettings("m", unfreeze_layers="-2")
    training.save_training_checkpoint(path, model=model, ctx=ctx, genes=None, epoch=1,
                                      state={"counter": _Counter(7), "settings": settings})
    assert torch.load(path, weights_only=True)["counter_state_dict"] == {"value": 7}
    restored = _Counter()
    training.restore_training_state(path, model=_tiny_model(), ctx=ctx, genes=None,
                                    state={"counter": restored, "settings": training.RunSettings("m",
                                                                                                 unfreeze_layers="-2")})
    assert restored.value == 7
    with pytest.raises(ScbertError, match="--unfreeze_layers all \\(that run: -2\\)"):
        training.restore_training_state(path, model=_tiny_model(), ctx=ctx, genes=None,
                                        state={"settings": training.RunSettings("m", unfreeze_layers="all")})


def test_fit_runs_the_epoch_skeleton_and_resumes_a_run_with_its_objects(tmp_path):
    genes = write_preprocessed(tmp_path / "d.h5ad", n_cells=40, n_modules=2, genes_per_module=2)
    argv = ["--data_path", str(tmp_path / "d.h5ad"), "--gene_num", "4", "--dim", "8", "--depth", "1", "--heads",
            "2", "--dim_head", "4", "--pos_embed", "False", "--batch_size", "8", "--grad_acc", "1",
            "--ckpt_dir", str(tmp_path), "--model_name", "f", "--valid_every", "2"]
    adata = training.load_training_data(common_args(argv))
    seen = []

    def go(epochs):
        args = common_args([*argv, "--epoch", str(epochs)])
        counter = _Counter()
        run = training.start_run(args, training.DistContext(), genes=genes,
                                 make_model=lambda: training.build_model_from_args(args, genes, head="lm"),
                                 train_set=training.CellDataset(adata.X, indices=range(30)),
                                 valid_set=training.CellDataset(adata.X, indices=range(30, 40)),
                                 resume_path=training.resolve_resume(args), clip_norm=1.0, state={"counter": counter})

        def loss_fn(model, batch):
            counter.value += 1
            return model(batch["tokens"]).float().pow(2).mean(), {}

        def train_summary(train):
            seen.append(counter.value)
            return {"train_loss": train["loss"]}

        return run, training.fit(run, loss_fn, lambda model, batch: {"n": batch["tokens"].shape[0]},
                                 train_summary=train_summary, valid_summary=lambda v, e: {"valid_n": v["n"]},
                                 line=lambda r: f"epoch {r['epoch']}")

    run, records = go(3)
    assert [r["epoch"] for r in records] == [1, 2, 3] and seen == [4, 8, 12]  # 30 cells in batches of 8
    assert [("valid_n" in r) for r in records] == [False, True, True]  # every 2nd epoch and the last
    assert load_checkpoint(str(tmp_path / "f_3.pth")).payload["model_type"] == "performer"
    run, records = go(4)  # rerunning with more epochs continues, counter and schedule included
    assert run.start_epoch == 4 and [r["epoch"] for r in records] == [4] and seen[-1] == 16
    assert run.scheduler.last_epoch == 4


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    model, ctx = _tiny_model(), training.DistContext()
    path = training.epoch_checkpoint_path(str(tmp_path), "m", 1)
    training.save_training_checkpoint(path, model=model, ctx=ctx, genes=None, epoch=1)
    before = open(path, "rb").read()

    def crash(obj, fh, *args, **kwargs):
        fh.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        training.save_training_checkpoint(path, model=model, ctx=ctx, genes=None, epoch=1)
    with pytest.raises(KeyboardInterrupt):
        training.save_training_checkpoint(training.epoch_checkpoint_path(str(tmp_path), "m", 2), model=model,
                                          ctx=ctx, genes=None, epoch=2)
    assert open(path, "rb").read() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m_1.pth"]


def test_resume_flag_semantics(tmp_path):
    args = common_args(["--ckpt_dir", str(tmp_path), "--model_name", "m"])
    assert training.resolve_resume(args) is None  # nothing yet: a fresh start
    args.resume = True
    with pytest.raises(ScbertError, match="holds no checkpoint m_<epoch>.pth"):
        training.resolve_resume(args)
    model, ctx = _tiny_model(), training.DistContext()
    for epoch in (1, 2, 10):
        training.save_training_checkpoint(training.epoch_checkpoint_path(str(tmp_path), "m", epoch), model=model,
                                          ctx=ctx, genes=None, epoch=epoch)
    (tmp_path / "m_11.pth").write_bytes(b"truncated")  # e.g. a broken copy: skipped, the previous one is used
    (tmp_path / "m_best.pth").write_bytes(b"x")
    (tmp_path / "mm_12.pth").write_bytes(b"x")
    assert training.resolve_resume(args).endswith("m_10.pth")
    args.resume = None
    assert training.resolve_resume(args).endswith("m_10.pth")
    args.resume = False
    with pytest.raises(ScbertError, match="would overwrite it"):
        training.resolve_resume(args)
