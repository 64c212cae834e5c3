"""continual.py: a three-stage stream on real PBMCs (classes the union, in arrival order; the bank in the checkpoint as
plain arrays), a later call that continues the stream and extends its table, resuming an interrupted stage, baselines,
and input errors that stop before anything is written."""

import json
import os
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp
import torch

import continual
import predict
import training
from annotate import annotate
from performer_pytorch import PerformerLM, checkpoint_payload, load_checkpoint, save_checkpoint
from utils import ScbertError, run_cli

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_continual  # noqa: E402

LABEL = bench_continual.LABEL_KEY


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    """pbmc68k_reduced as three stages (10 types) with a held-out test set per stage, and a tiny 'pretrained' model."""
    folder = tmp_path_factory.mktemp("pbmc_stream")
    stages, tests = bench_continual.write_pbmc_stream(str(folder), seed=0)
    genes = [str(g) for g in ad.read_h5ad(stages[0], backed="r").var_names]
    torch.manual_seed(0)
    model = PerformerLM(num_tokens=7, max_seq_len=len(genes) + 1, dim=8, depth=2, heads=2, dim_head=4,
                        g2v_position_emb=False)
    pretrained = folder / "pretrained.pth"
    save_checkpoint(checkpoint_payload(model, genes=genes), str(pretrained))
    return {"stages": stages, "tests": tests, "pretrained": str(pretrained), "genes": genes, "folder": folder}


def flags(ckpt_dir, *extra):
    return ["--label_key", LABEL, "--gene_num", "751", "--epoch", "1", "--batch_size", "32", "--learning_rate", "1e-3",
            "--bank_size", "60", "--head_hidden", "16", "--head_h_dim", "8", "--ckpt_dir", str(ckpt_dir),
            "--seed", "3", *map(str, extra)]


def arrival_order(stage_paths):
    order = []
    for path in stage_paths:
        order += sorted(set(np.asarray(ad.read_h5ad(path).obs[LABEL]).astype(str)) - set(order))
    return order


@pytest.mark.slow
def test_three_stage_stream_ends_with_the_union_of_classes_in_arrival_order(stream, tmp_path):
    stages, tests = stream["stages"], stream["tests"]
    continual.main(["--data_path", *stages[:2], "--model_path", stream["pretrained"], "--test_path", *tests,
                    *flags(tmp_path)])
    # Later, when stage 3 arrives: the stage-2 checkpoint is all the next call needs.
    stage2 = tmp_path / "stream_stage2_best.pth"
    continual.main(["--data_path", stages[2], "--model_path", str(stage2), "--test_path", *tests, *flags(tmp_path)])

    final = tmp_path / "stream_stage3_best.pth"
    raw = torch.load(final, weights_only=True)  # plain tensors and lists only
    state = raw[continual.STATE_KEY]
    assert state["stage"] == 3 and state["complete"]
    assert state["classes"] == raw["classes"] == arrival_order(stages)
    assert len(state["classes"]) == 10
    bank = continual.StreamState.from_payload(state)
    assert bank.bank_x.shape[0] == len(bank.bank_labels) <= 60
    assert np.bincount(bank.bank_labels, minlength=10).min() >= 1  # every class kept some cells
    assert bank.bank_x.shape[1] == len(stream["genes"])
    ckpt = load_checkpoint(str(final))
    assert ckpt.head["n_classes"] == 10 and ckpt.state_dict["to_out.fc3.weight"].shape == (10, 8)
    # The first stages' class indices never moved.
    stage1 = torch.load(tmp_path / "stream_stage1_best.pth", weights_only=True)
    assert state["classes"][: len(stage1["classes"])] == stage1["classes"]
    # Each stage's checkpoint keeps its model card through the re-save with the stream state.
    card = raw["model_card"]
    assert [c["name"] for c in card["classes"]] == state["classes"]
    assert card["validation"]["accuracy"] == pytest.approx(raw["metrics"]["accuracy"])

    table = json.loads((tmp_path / "stream_stream.json").read_text())
    assert sorted({(r["stage"], r["test_set"]) for r in table["rows"]}) == [
        (s, f"test_stage{t}") for s in (1, 2, 3) for t in (1, 2, 3)]
    first = {r["test_set"]: r for r in table["rows"] if r["stage"] == 1}
    assert first["test_stage2"]["accuracy"] is None and first["test_stage2"]["n_novel_cells"] > 0
    assert [s["stage"] for s in table["summary"]] == [1, 2, 3]
    for name in ("stream_stream.csv", "stream_stream_summary.csv", "stream_stream.png"):
        assert (tmp_path / name).stat().st_size > 0

    # predict.py with CANAL's novel-cell call on stage 3's types, unseen by the stage-2 model.
    out = tmp_path / "query.h5ad"
    result = predict.main(["--data_path", tests[2], "--model_path", str(stage2), "--novel_type", "True",
                           "--novel_method", "canal", "--label_key", LABEL, "--out_path", str(out), "--seed", "5"])
    written = ad.read_h5ad(out)
    threshold = written.uns["scbert_predict"]["params"]["novel_threshold"]
    unassigned = written.obs["scbert_celltype"].astype(str).to_numpy() == "Unassigned"
    assert np.array_equal(unassigned, written.obs["scbert_novelty"].to_numpy() > threshold)
    assert written.uns["scbert_predict"]["params"]["novel_method"] == "canal"
    assert result.metrics["novel_recall"] == pytest.approx(unassigned.mean())  # every cell here is of a novel type
    again = annotate(ad.read_h5ad(tests[2]), str(stage2), novel_type=True, novel_method="canal", seed=5)
    assert np.array_equal(again.obs["scbert_celltype"].to_numpy(), written.obs["scbert_celltype"].to_numpy())
    with pytest.raises(ScbertError, match="--attention groups cells"):
        predict.main(["--data_path", tests[2], "--model_path", str(stage2), "--novel_type", "True",
                      "--novel_method", "canal", "--attention", "type", "--out_path", str(tmp_path / "q2.h5ad")])


@pytest.mark.slow
def test_a_killed_stage_resumes_and_earlier_stages_are_not_trained_again(stream, tmp_path, monkeypatch):
    stages = stream["stages"][:2]
    argv = ["--data_path", *stages, "--model_path", stream["pretrained"], *flags(tmp_path, "--epoch", 2,
                                                                               "--patience", 0)]
    whole = tmp_path / "whole"
    continual.main(argv[:-len(flags(tmp_path))] + flags(whole, "--epoch", 2, "--patience", 0))

    original = training.train_one_epoch
    calls = []

    def killed_in_stage2_epoch2(*args, **kwargs):
        calls.append(kwargs["epoch"])
        if len(calls) == 4:  # stage 1: epochs 1, 2; stage 2: epoch 1, then killed during epoch 2
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(training, "train_one_epoch", killed_in_stage2_epoch2)
    with pytest.raises(KeyboardInterrupt):
        continual.main(argv)
    assert continual._completed(str(tmp_path / "stream_stage1_best.pth")) is not None
    assert continual._completed(str(tmp_path / "stream_stage2_best.pth")) is None  # epoch 1's best, no bank yet
    assert (tmp_path / "stream_stage2_1.pth").exists()
    monkeypatch.setattr(training, "train_one_epoch", original)
    continual.main(argv)  # the same command again

    def epochs(name):
        return [json.loads(line)["epoch"] for line in (tmp_path / f"{name}_log.jsonl").read_text().splitlines()]

    assert epochs("stream_stage1") == [1, 2]  # stage 1 was complete: not trained again
    assert epochs("stream_stage2") == [1, 2]  # stage 2 went on at epoch 2
    resumed = load_checkpoint(str(tmp_path / "stream_stage2_best.pth"))
    reference = load_checkpoint(str(whole / "stream_stage2_best.pth"))
    assert all(torch.equal(reference.state_dict[k], resumed.state_dict[k]) for k in reference.state_dict)
    a = torch.load(tmp_path / "stream_stage2_best.pth", weights_only=True)[continual.STATE_KEY]["bank"]
    b = torch.load(whole / "stream_stage2_best.pth", weights_only=True)[continual.STATE_KEY]["bank"]
    assert torch.equal(a["labels"], b["labels"]) and torch.equal(a["data"], b["data"])


@pytest.mark.slow
def test_baselines_share_the_table(stream, tmp_path):
    stages, tests = stream["stages"][:2], stream["tests"][:2]
    table = continual.main(["--data_path", *stages, "--model_path", stream["pretrained"], "--test_path", *tests,
                            "--baselines", "sequential,joint", *flags(tmp_path)])
    assert table.methods() == ["canal", "joint", "sequential"]
    assert [s["stage"] for s in table.summary() if s["method"] == "joint"] == [2]
    seq = torch.load(tmp_path / "stream_sequential_stage2_best.pth", weights_only=True)[continual.STATE_KEY]
    assert seq["bank"] is None and seq["classes"] == arrival_order(stages)


def _write_like(path, source, *, genes=None, drop_label=False, n_cells=None):
    adata = ad.read_h5ad(source)
    if n_cells is not None:
        adata = adata[:n_cells].copy()
    if genes is not None:
        adata = ad.AnnData(sp.csr_matrix(adata.X), obs=adata.obs, var=adata.var.iloc[::-1].copy(), uns=adata.uns)
    if drop_label:
        adata.obs = adata.obs.drop(columns=[LABEL])
    adata.write_h5ad(path)
    return str(path)


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("genes", "are not the model's"),
        ("label", "has no obs column 'bulk_labels'"),
        ("bank", "--bank_size 3 is smaller than the 7 classes"),
        ("empty", "holds no cells"),
    ],
)
def test_bad_input_stops_with_one_sentence_before_anything_is_written(stream, tmp_path, capsys, case, message):
    stage1, stage2 = stream["stages"][:2]
    bank = "60"
    if case == "genes":
        stage2 = _write_like(tmp_path / "other_genes.h5ad", stage2, genes="reversed")
    elif case == "label":
        stage2 = _write_like(tmp_path / "no_label.h5ad", stage2, drop_label=True)
    elif case == "bank":
        bank = "3"
    else:
        stage2 = _write_like(tmp_path / "empty.h5ad", stage2, n_cells=0)
    ckpts = tmp_path / "ckpts"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(continual.main, ["--data_path", stage1, stage2, "--model_path", stream["pretrained"],
                                 *flags(ckpts), "--bank_size", bank])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err
    assert not os.path.exists(ckpts)  # stage 1 was not trained either


@pytest.mark.slow
def test_two_stages_under_torchrun(stream, tmp_path):
    """Two gloo ranks run the stream like one process: rank 0 alone writes each stage's files (atomically), the
    classes are the union in arrival order, and the bank, chosen from embeddings gathered over both ranks, holds
    cells of every class, at most --bank_size, as plain arrays."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    stages, tests = stream["stages"][:2], stream["tests"][:2]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           "continual.py", "--data_path", *stages, "--model_path", stream["pretrained"], "--test_path", *tests,
           *flags(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]
    state = torch.load(tmp_path / "stream_stage2_best.pth", weights_only=True)[continual.STATE_KEY]
    assert state["complete"] and state["classes"] == arrival_order(stages)
    bank = continual.StreamState.from_payload(state)
    counts = np.bincount(bank.bank_labels, minlength=len(state["classes"]))
    assert counts.sum() <= 60 and counts.min() >= 1
    log = [json.loads(line) for line in (tmp_path / "stream_stage2_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]  # one line per epoch: rank 0 alone logs
    table = json.loads((tmp_path / "stream_stream.json").read_text())
    assert sorted({(r["stage"], r["test_set"]) for r in table["rows"]}) == [
        (s, f"test_stage{t}") for s in (1, 2) for t in (1, 2)]
