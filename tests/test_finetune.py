"""finetune.py: published defaults and schedule, what trains, accuracy on separable data, outputs a user keeps,
k-fold, bootstrap sampling, class weights, resume after an interruption, two processes, and input errors."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch

import classification
import finetune
import optim
import training
from label_io import read_label_dict
from models import ScbertPerformer
from performer_pytorch import PerformerLM, build_model, checkpoint_payload, load_checkpoint, save_checkpoint
from utils import PREPROCESS_UNS_KEY, ScbertError, tokenize

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT.parent / "shared" / "reference" / "scbert_reference_small.pt"
N_GENES = 40


def write_dataset(path, *, n_genes=N_GENES, per_type=(50, 50, 50, 50), seed=0, markers=5, labels=None):
    """A preprocess.py-style .h5ad whose cell types are separable: type k expresses genes 5k..5k+4 in bin 4.

    Background: 30% of the other genes expressed in bins 0..2. labels: obs values to use instead of type names.
    """
    rng = np.random.default_rng(seed)
    blocks, names = [], []
    for k, n in enumerate(per_type):
        x = np.where(rng.random((n, n_genes)) < 0.3, rng.uniform(0.2, 2.8, (n, n_genes)), 0.0)
        x[:, k * markers : (k + 1) * markers] = rng.uniform(4.1, 4.9, (n, markers))
        blocks.append(x)
        names += [f"type{k}"] * n
    matrix = sp.csr_matrix(np.vstack(blocks).astype(np.float32))
    obs = pd.DataFrame({"celltype": pd.Categorical(names if labels is None else labels)},
                       index=[f"cell{i}" for i in range(matrix.shape[0])])
    obs["batch"] = "b1"
    adata = ad.AnnData(matrix, obs=obs, var=pd.DataFrame(index=[f"G{i}" for i in range(n_genes)]))
    adata.uns[PREPROCESS_UNS_KEY] = {
        "params": {"target_sum": 10000.0, "log_base": 2.0, "min_genes": 0, "reference": "synthetic",
                   "revision": "none", "duplicates": "first"},
        "summary": {"cells_in": int(matrix.shape[0]), "cells_removed": 0},
    }
    adata.write_h5ad(path)
    return adata


def write_pretrained(path, genes, seed=0):
    """A tiny 'pretrained' checkpoint in our format: random weights, gene2vec rows and the gene list inside."""
    torch.manual_seed(seed)
    model = PerformerLM(num_tokens=7, max_seq_len=len(genes) + 1, dim=16, depth=2, heads=2, dim_head=8,
                        gene2vec=torch.randn(len(genes), 16))
    save_checkpoint(checkpoint_payload(model, genes=list(genes)), str(path))
    return str(path)


def args_for(data, ckpt_dir, *extra, model_path=None, gene_num=N_GENES):
    argv = ["--data_path", str(data), "--ckpt_dir", str(ckpt_dir), "--gene_num", str(gene_num),
            "--batch_size", "16", "--grad_acc", "1", "--learning_rate", "1e-3"]
    if model_path:
        argv += ["--model_path", str(model_path)]
    return argv + [str(e) for e in extra]


def read_log(path):
    with open(path) as fh:
        return [json.loads(line) for line in fh]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("finetune_data")
    adata = write_dataset(folder / "cells.h5ad")
    ckpt = write_pretrained(folder / "pretrained.pth", adata.var_names)
    return {"data": folder / "cells.h5ad", "ckpt": ckpt, "adata": adata}


# ---------------------------------------------------------------------------------------------------------------------
# Published defaults and schedule
# ---------------------------------------------------------------------------------------------------------------------


def test_published_flags_and_defaults():
    args = finetune.get_args_parser().parse_args([])
    published = {"epoch": 100, "seed": 2021, "batch_size": 3, "learning_rate": 1e-4, "grad_acc": 60,
                 "valid_every": 1, "pos_embed": True, "ckpt_dir": "./ckpts/", "model_name": "finetune",
                 "patience": 10, "label_key": "celltype", "unfreeze_layers": "-2", "sampling": "epoch",
                 "class_weight": "none", "n_splits": 1, "label_smoothing": 0.0, "loss_div_grad_acc": True}
    assert {k: getattr(args, k) for k in published} == published
    # str2bool, not type=bool: "False" must mean False.
    assert finetune.get_args_parser().parse_args(["--pos_embed", "False"]).pos_embed is False


def test_learning_rate_per_epoch_matches_spec_section_6():
    optimizer = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=1e-4)
    scheduler = optim.build_scheduler(optimizer, 1e-4)
    lrs = {}
    for epoch in range(1, 47):
        lrs[epoch] = optimizer.param_groups[0]["lr"]
        scheduler.step()
    spec = {1: 1.0e-6, 2: 2.08e-5, 3: 4.06e-5, 4: 6.04e-5, 5: 8.02e-5, 6: 1.0e-4, 7: 9.76e-5, 8: 9.06e-5,
            9: 7.96e-5, 10: 6.58e-5, 11: 5.05e-5, 12: 3.52e-5, 13: 2.14e-5, 14: 1.05e-5, 15: 3.42e-6, 16: 1.0e-6,
            21: 9.0e-5, 40: 1.55e-6, 41: 1.0e-6, 46: 8.1e-5}
    for epoch, value in spec.items():
        assert lrs[epoch] == pytest.approx(value, rel=1e-2), epoch
    # Warm-ups rise and cosines fall between the listed points (cycles of 15 and 25 epochs).
    assert all(lrs[e] < lrs[e + 1] for e in range(16, 21)) and all(lrs[e] > lrs[e + 1] for e in range(21, 40))


# ---------------------------------------------------------------------------------------------------------------------
# Labels, splits, weights, what trains
# ---------------------------------------------------------------------------------------------------------------------


def test_labels_are_sorted_unique_names():
    obs = pd.DataFrame({"celltype": ["T", "B", "NK", "B", "T", "NK"]})
    classes, labels = finetune.read_labels(obs, "celltype")
    assert classes == ["B", "NK", "T"]
    assert labels.tolist() == [2, 0, 1, 0, 2, 1]


@pytest.mark.parametrize(
    ("column", "message"),
    [
        (None, r"no obs column 'celltype' \(its obs columns: 'cell_type', 'batch'\).*--label_key"),
        (["T", "B", None, "B"], r"1 of 4 cells have no label \(NaN\)"),
        (["T", "T", "T"], r"one class only \('T'\)"),
        (["T", "T", "B", "B", "Mono"], r"'Mono'.*single cell.*remove that cell or merge"),
    ],
)
def test_label_errors_name_the_problem_and_the_fix(column, message):
    if column is None:
        obs = pd.DataFrame({"cell_type": ["T", "B"], "batch": ["1", "1"]})
    else:
        obs = pd.DataFrame({"celltype": pd.Series(column, dtype=object)})
    with pytest.raises(ScbertError, match=message):
        finetune.read_labels(obs, "celltype")


def test_default_split_is_the_references_stratified_80_20():
    from sklearn.model_selection import StratifiedShuffleSplit

    labels = np.repeat(np.arange(4), [50, 30, 15, 5])
    [(train, valid)] = finetune.make_splits(labels, n_splits=1, seed=2021)
    ref_train, ref_valid = next(StratifiedShuffleSplit(n_splits=1, test_size=0.2, random_state=2021)
                                .split(np.zeros(len(labels)), labels))
    assert np.array_equal(train, np.sort(ref_train)) and np.array_equal(valid, np.sort(ref_valid))
    assert len(valid) == 20 and np.bincount(labels[valid]).tolist() == [10, 6, 3, 1]


def test_kfold_splits_partition_the_cells_by_stratum():
    labels = np.repeat(np.arange(3), [30, 15, 9])
    folds = finetune.make_splits(labels, n_splits=3, seed=2021)
    valid = np.concatenate([v for _, v in folds])
    assert np.array_equal(np.sort(valid), np.arange(len(labels)))  # each cell validated exactly once
    for train, val in folds:
        assert not set(train) & set(val)
        assert np.bincount(labels[val]).tolist() == [10, 5, 3]
    with pytest.raises(ScbertError, match="fewer than the 10 folds"):
        finetune.make_splits(labels, n_splits=10, seed=2021)


def test_inverse_frequency_class_weights_average_one_and_enter_the_loss():
    labels = np.repeat(np.arange(3), [10, 30, 60])
    weights = finetune.inverse_frequency_weights(labels, 3)
    assert weights.mean().item() == pytest.approx(1.0)
    assert weights[0] / weights[1] == pytest.approx(3.0) and weights[0] / weights[2] == pytest.approx(6.0)
    args = finetune.get_args_parser().parse_args(["--class_weight", "inverse", "--label_smoothing", "0.1"])
    criterion = finetune.build_criterion(args, labels, 3)
    logits, target = torch.randn(5, 3), torch.tensor([0, 1, 2, 2, 0])
    expected = torch.nn.functional.cross_entropy(logits, target, weight=weights, label_smoothing=0.1)
    assert torch.allclose(criterion(logits, target), expected)
    plain = finetune.build_criterion(finetune.get_args_parser().parse_args([]), labels, 3)
    assert plain.weight is None and plain.label_smoothing == 0.0


def test_unfreeze_choices():
    model = finetune.attach_head(ScbertPerformer(num_tokens=7, max_seq_len=9, dim=8, depth=3, heads=1, dim_head=4,
                                                 gene2vec=torch.randn(8, 8), lm_head=False), 2)

    def training(spec):
        finetune.set_trainable(model, finetune.parse_unfreeze(spec, 3))
        return {n.split(".")[0] if not n.startswith("performer") else ".".join(n.split(".")[:4])
                for n, p in model.named_parameters() if p.requires_grad}

    assert training("-2") == {"norm", "performer.net.layers.1", "to_out"}
    assert training("0,-1") == {"norm", "performer.net.layers.0", "performer.net.layers.2", "to_out"}
    assert training("none") == {"norm", "to_out"}
    everything = training("all")
    assert "token_emb" in everything and "pos_emb" not in everything  # the gene2vec table never trains
    with pytest.raises(ScbertError, match="has 3 blocks"):
        finetune.parse_unfreeze("3", 3)
    with pytest.raises(ScbertError, match="not understood"):
        finetune.parse_unfreeze("last", 3)


# ---------------------------------------------------------------------------------------------------------------------
# Whole runs
# ---------------------------------------------------------------------------------------------------------------------


def test_finetunes_separable_types_and_the_best_checkpoint_predicts_alone(tiny, tmp_path):
    ckpts = tmp_path / "ckpts"
    [best] = finetune.main(args_for(tiny["data"], ckpts, "--epoch", 6, model_path=tiny["ckpt"]))
    assert best["accuracy"] >= 0.9

    # The best checkpoint alone rebuilds the model, knows genes and classes, and reproduces the reported accuracy.
    ckpt = load_checkpoint(str(ckpts / "finetune_best.pth"))
    adata = tiny["adata"]
    classes, labels = finetune.read_labels(adata.obs, "celltype")
    assert ckpt.genes == list(adata.var_names) and ckpt.classes == classes == ["type0", "type1", "type2", "type3"]
    assert ckpt.payload["epoch"] == best["epoch"] and ckpt.payload["metrics"]["accuracy"] == best["accuracy"]
    model = build_model(ckpt).eval()
    [(_, valid)] = finetune.make_splits(labels, n_splits=1, seed=2021)
    with torch.no_grad():
        pred = model(tokenize(adata.X[valid])).argmax(dim=-1).numpy()
    assert best["n_cells"] == len(valid)
    assert np.mean(pred == labels[valid]) == pytest.approx(best["accuracy"])

    # predict.py, given nothing but the checkpoint, labels the validation cells the same way.
    import predict

    alone = tmp_path / "alone" / "model.pth"
    alone.parent.mkdir()
    alone.write_bytes((ckpts / "finetune_best.pth").read_bytes())
    adata[valid].copy().write_h5ad(tmp_path / "query.h5ad")
    predict.main(["--data_path", str(tmp_path / "query.h5ad"), "--model_path", str(alone),
                  "--out_path", str(tmp_path / "query_pred.h5ad")])
    called = ad.read_h5ad(tmp_path / "query_pred.h5ad").obs["scbert_celltype"].astype(str).to_numpy()
    assert np.mean(called == np.asarray(classes)[labels[valid]]) == pytest.approx(best["accuracy"])
    assert load_checkpoint(str(alone)).payload["model_type"] == "performer"
    # One macro-F1: fine-tuning's validation figure, predict's metrics and the demo's table agree on these cells.
    import demo
    from metrics import annotation_metrics

    truth = np.asarray(classes)[labels[valid]]
    scored, _ = annotation_metrics(truth, called, classes, novel_type=False)
    assert scored["macro_f1"] == pytest.approx(best["macro_f1"], abs=1e-12)
    assert demo.summarise(truth, called, classes)["macro_f1"] == pytest.approx(best["macro_f1"], abs=1e-12)

    # Files a user keeps: no-pickle labels, metrics, confusion matrix (CSV and PNG), one log line per epoch.
    assert read_label_dict(str(ckpts / "finetune_label_dict.txt")) == classes
    assert np.array_equal(np.load(ckpts / "finetune_label.npy"), labels)
    metrics = json.loads((ckpts / "finetune_metrics.json").read_text())
    assert metrics["accuracy"] == best["accuracy"] and set(metrics["per_class"]) == set(classes)
    assert set(metrics["per_class"]["type0"]) == {"precision", "recall", "f1", "support"}
    assert np.asarray(metrics["confusion_matrix"]).sum() == len(valid)
    assert (ckpts / "finetune_confusion.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (ckpts / "finetune_confusion.csv").read_text().splitlines()[0].endswith("type0,type1,type2,type3")
    log = read_log(ckpts / "finetune_log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2, 3, 4, 5, 6]
    # The run follows the published schedule (SPEC section 6, scaled by lr 1e-3 / 1e-4).
    assert [r["lr"] for r in log] == pytest.approx([1e-6, 2.008e-4, 4.006e-4, 6.004e-4, 8.002e-4, 1e-3], rel=1e-3)
    assert all(r["valid_cells"] == len(valid) for r in log)
    # Only the latest epoch checkpoint is kept (it is what resuming needs).
    assert sorted(p.name for p in ckpts.glob("finetune_*.pth")) == ["finetune_6.pth", "finetune_best.pth"]


def test_from_the_reference_trunk_exactly_the_published_parameters_train(tmp_path, capsys):
    reference = torch.load(REFERENCE, weights_only=True)
    finetuned = reference["finetune_checkpoint"]["model_state_dict"]
    state = {k: v for k, v in finetuned.items() if not k.startswith("to_out.")}
    state.update(reference["lm_head"])
    pretrained = tmp_path / "panglao_pretrain.pth"
    torch.save({"model_state_dict": state}, pretrained)  # the reference's format: no config, no gene list
    n_genes = reference["config"]["max_seq_len"] - 1
    data = tmp_path / "cells.h5ad"
    write_dataset(data, n_genes=n_genes, per_type=(6, 6), markers=10)

    ckpts = tmp_path / "ckpts"
    finetune.main(args_for(data, ckpts, "--epoch", 1, "--batch_size", 4, model_path=pretrained, gene_num=n_genes))
    assert "gene order cannot be checked" in capsys.readouterr().err

    before = build_model(load_checkpoint(str(pretrained)), head="none").state_dict()
    after = load_checkpoint(str(ckpts / "finetune_best.pth")).state_dict
    # SPEC section 4: the final norm and the second-to-last block (block 0 of 2) train, plus the new head.
    trainable = ("norm.", "performer.net.layers.0.")
    changed, unchanged = [], []
    for key, value in before.items():
        if key == "performer.calls_since_last_redraw":
            continue  # a counter of training forward calls, not a weight
        (changed if not torch.equal(value, after[key]) else unchanged).append(key)
    expected = sorted(k for k in before if k.startswith(trainable) and not k.endswith("projection_matrix"))
    assert sorted(changed) == expected
    assert any(k.startswith("performer.net.layers.1.") for k in unchanged) and "token_emb.weight" in unchanged
    assert all(k.startswith("to_out.") for k in set(after) - set(before)) and "to_out.fc3.weight" in after


def test_kfold_without_pretraining_writes_every_fold_and_a_summary(tiny, tmp_path, capsys):
    ckpts = tmp_path / "ckpts"
    size = ["--dim", 16, "--depth", 2, "--heads", 2, "--dim_head", 8]
    with pytest.raises(ScbertError, match="--gene2vec_path.*--pos_embed False"):
        finetune.main(args_for(tiny["data"], ckpts, *size, "--epoch", 1))
    results = finetune.main(args_for(tiny["data"], ckpts, *size, "--pos_embed", "False", "--epoch", 2,
                                     "--n_splits", 3, "--unfreeze_layers", "all"))
    assert "no pretraining" in capsys.readouterr().err
    assert len(results) == 3 and sum(r["n_cells"] for r in results) == tiny["adata"].n_obs
    for fold in (1, 2, 3):
        assert load_checkpoint(str(ckpts / f"finetune_fold{fold}_best.pth")).classes == [f"type{k}" for k in range(4)]
        assert (ckpts / f"finetune_fold{fold}_metrics.json").exists()
    summary = json.loads((ckpts / "finetune_cv.json").read_text())
    accuracies = [r["accuracy"] for r in results]
    assert summary["n_splits"] == 3 and summary["accuracy"]["values"] == accuracies
    assert summary["accuracy"]["mean"] == pytest.approx(np.mean(accuracies))
    assert summary["accuracy"]["std"] == pytest.approx(np.std(accuracies))
    assert "mean" in summary["macro_f1"] and len(summary["folds"]) == 3


def test_bootstrap_sampling_weights_and_smoothing_reach_training(tiny, tmp_path, monkeypatch):
    data = tmp_path / "imbalanced.h5ad"
    adata = write_dataset(data, per_type=(80, 40, 20, 20))
    seen = {"train": [], "valid": []}
    criteria = []
    # The run loop (training.fit) calls these; the criterion is finetune's own.
    original_train, original_eval, original_criterion = (training.train_one_epoch, training.evaluate,
                                                         finetune.build_criterion)

    def spy_train(model, loader, *args, **kwargs):
        seen["train"].append([int(loader.dataset.indices[i]) for i in loader.sampler])
        return original_train(model, loader, *args, **kwargs)

    def spy_eval(model, loader, *args, **kwargs):
        seen["valid"].append([int(loader.dataset.indices[i]) for i in loader.sampler])
        return original_eval(model, loader, *args, **kwargs)

    def spy_criterion(*args, **kwargs):
        criteria.append(original_criterion(*args, **kwargs))
        return criteria[-1]

    monkeypatch.setattr(training, "train_one_epoch", spy_train)
    monkeypatch.setattr(training, "evaluate", spy_eval)
    monkeypatch.setattr(finetune, "build_criterion", spy_criterion)
    finetune.main(args_for(data, tmp_path / "ckpts", "--epoch", 2, "--sampling", "bootstrap", "--class_weight",
                           "inverse", "--label_smoothing", "0.1", model_path=tiny["ckpt"]))
    _, labels = finetune.read_labels(adata.obs, "celltype")
    [(train, valid)] = finetune.make_splits(labels, n_splits=1, seed=2021)
    for drawn in seen["train"]:  # len(train) draws with replacement from the training cells
        assert len(drawn) == len(train) and set(drawn) <= set(train) and len(set(drawn)) < len(train)
    assert seen["train"][0] != seen["train"][1]  # a new sample each epoch
    assert all(sorted(v) == valid.tolist() for v in seen["valid"])  # validation: each cell once, never bootstrapped
    [criterion] = criteria
    assert torch.allclose(criterion.weight, finetune.inverse_frequency_weights(labels[train], 4))
    assert criterion.label_smoothing == 0.1

    # Default sampling: every training cell exactly once per epoch.
    seen["train"].clear()
    finetune.main(args_for(data, tmp_path / "epoch_ckpts", "--epoch", 1, model_path=tiny["ckpt"]))
    assert sorted(seen["train"][0]) == train.tolist()


def test_resume_after_an_interruption_continues_where_it_stopped(tiny, tmp_path, monkeypatch):
    argv = ["--epoch", 4, "--patience", 0]
    finetune.main(args_for(tiny["data"], tmp_path / "whole", *argv, model_path=tiny["ckpt"]))

    interrupted = tmp_path / "interrupted"
    original = training.train_one_epoch  # what the run loop calls

    def crash_in_epoch_3(*args, **kwargs):
        if kwargs["epoch"] == 3:
            raise KeyboardInterrupt  # as if the job were killed during epoch 3
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", crash_in_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(args_for(tiny["data"], interrupted, *argv, model_path=tiny["ckpt"]))
    assert (interrupted / "finetune_2.pth").exists() and not (interrupted / "finetune_3.pth").exists()
    monkeypatch.setattr(training, "train_one_epoch", original)
    finetune.main(args_for(tiny["data"], interrupted, *argv, model_path=tiny["ckpt"]))  # the same command again

    assert [r["epoch"] for r in read_log(interrupted / "finetune_log.jsonl")] == [1, 2, 3, 4]
    for name in ("finetune_4.pth", "finetune_best.pth"):
        whole = load_checkpoint(str(tmp_path / "whole" / name))
        resumed = load_checkpoint(str(interrupted / name))
        assert whole.payload["epoch"] == resumed.payload["epoch"]
        assert all(torch.equal(whole.state_dict[k], resumed.state_dict[k]) for k in whole.state_dict), name
    # Rerunning the finished command trains nothing more and keeps the result.
    finetune.main(args_for(tiny["data"], interrupted, *argv, model_path=tiny["ckpt"]))
    assert len(read_log(interrupted / "finetune_log.jsonl")) == 4
    assert load_checkpoint(str(interrupted / "finetune_best.pth")).payload["epoch"] == whole.payload["epoch"]
    # A fresh run must not overwrite the finished one's files.
    with pytest.raises(ScbertError, match="would overwrite"):
        finetune.main(args_for(tiny["data"], interrupted, *argv, "--resume", "False", model_path=tiny["ckpt"]))


def test_killed_between_epoch_and_best_checkpoint_the_rerun_restores_the_best(tiny, tmp_path, monkeypatch):
    """The epoch checkpoint is written before the best one; a kill in between loses no result."""
    argv = ["--epoch", 1, "--patience", 0]
    original = classification.save_best  # what the classification run calls

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # as if the job were killed right after the epoch checkpoint was written

    monkeypatch.setattr(classification, "save_best", killed)
    with pytest.raises(KeyboardInterrupt):
        finetune.main(args_for(tiny["data"], tmp_path, *argv, model_path=tiny["ckpt"]))
    assert (tmp_path / "finetune_1.pth").exists() and not (tmp_path / "finetune_best.pth").exists()
    monkeypatch.setattr(classification, "save_best", original)
    finetune.main(args_for(tiny["data"], tmp_path, *argv, model_path=tiny["ckpt"]))  # the same command again
    best = load_checkpoint(str(tmp_path / "finetune_best.pth"))
    epoch = load_checkpoint(str(tmp_path / "finetune_1.pth"))
    assert best.payload["epoch"] == 1 and best.classes
    assert all(torch.equal(best.state_dict[k], epoch.state_dict[k]) for k in best.state_dict)
    assert (tmp_path / "finetune_metrics.json").exists() and (tmp_path / "finetune_label_dict.txt").exists()


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_under_torchrun(tiny, tmp_path):
    ckpts = tmp_path / "ckpts"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_PORT": str(_free_port())}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           env["MASTER_PORT"], "finetune.py",
           *args_for(tiny["data"], ckpts, "--epoch", 2, "--batch_size", 8, model_path=tiny["ckpt"])]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir() if p.suffix == ".pth") == ["finetune_2.pth", "finetune_best.pth"]
    assert not [p for p in ckpts.iterdir() if ".tmp" in p.name]
    metrics = json.loads((ckpts / "finetune_metrics.json").read_text())
    assert metrics["n_cells"] == 40  # every validation cell once, gathered from both ranks
    log = read_log(ckpts / "finetune_log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]  # rank 0 alone logs
    assert log[0]["train_cells"] == 160


def test_input_errors(tiny, tmp_path):
    other = write_pretrained(tmp_path / "other_genes.pth", [f"X{i}" for i in range(N_GENES)])
    with pytest.raises(ScbertError, match="not the model's 40 genes in order"):
        finetune.main(args_for(tiny["data"], tmp_path / "a", "--epoch", 1, model_path=other))
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "finetune_best.pth").write_bytes(b"an earlier result")
    with pytest.raises(ScbertError, match="would overwrite"):
        finetune.main(args_for(tiny["data"], tmp_path / "b", "--epoch", 1, model_path=tiny["ckpt"]))
    assert (tmp_path / "b" / "finetune_best.pth").read_bytes() == b"an earlier result"


def test_command_line_error_exits_2_without_traceback(tiny, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "finetune.py", *args_for(tiny["data"], tmp_path, "--label_key", "cell_type",
                                                     model_path=tiny["ckpt"])]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "'celltype', 'batch'" in last
    assert "Traceback" not in done.stderr
