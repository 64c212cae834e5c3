"""Step-based runs on a shard corpus: --max_steps / --save_every_steps, mid-epoch resume to the parameters of an
uninterrupted run (in-process, and a two-"node" torchrun killed mid-epoch), and rank 0 deciding resume."""

import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import anndata as ad
import pytest
import torch

import pretrain
from shards import ShardWriter
from tests.test_training import write_preprocessed
from utils import ScbertError

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from bench_shards import _descendants  # noqa: E402  (the processes below a launcher, from /proc)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--gene_num", "48", "--dim", "16", "--depth", "1", "--heads", "2", "--dim_head", "8", "--batch_size", "8",
        "--grad_acc", "2", "--learning_rate", "5e-2", "--model_name", "k"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """640 cells as a shard folder of 100-cell shards, and a gene2vec table."""
    folder = tmp_path_factory.mktemp("step_data")
    write_preprocessed(folder / "cells.h5ad", n_cells=640, gene2vec_path=folder / "g2v.npy")
    adata = ad.read_h5ad(folder / "cells.h5ad")
    writer = ShardWriter(str(folder / "shards"), adata.var_names, kind="scbert", cells_per_shard=100)
    writer.add(adata.X, adata.obs)
    writer.close()
    return ["--data_path", str(folder / "shards"), "--gene2vec_path", str(folder / "g2v.npy")]


def _weights(path):
    return torch.load(path, weights_only=True)["model_state_dict"]


def _assert_same_weights(a, b):
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), key


@pytest.mark.parametrize("data_format", ["shards", "h5ad"])
def test_a_run_stopped_mid_epoch_continues_to_the_parameters_of_an_uninterrupted_run(corpus, tmp_path, data_format):
    # 608 training cells, batch 8, grad_acc 2: 38 optimiser steps per epoch; 50 steps end in epoch 2.
    if data_format == "h5ad":  # the in-memory path: DistributedSampler's order, skipped by ResumableSampler
        corpus = ["--data_path", str(Path(corpus[1]).parent / "cells.h5ad"), *corpus[2:]]
    stopped, whole = tmp_path / "stopped", tmp_path / "whole"
    first = pretrain.main([*corpus, *TINY, "--ckpt_dir", str(stopped), "--max_steps", "20", "--save_every_steps", "7"])
    assert [r["step"] for r in first] == [20] and first[0]["epoch"] == 1  # stopped in epoch 1, validated
    assert sorted(p.name for p in stopped.glob("*.pth")) == ["k_epoch1_step20.pth"]  # older step files removed
    resumed = pretrain.main([*corpus, *TINY, "--ckpt_dir", str(stopped), "--max_steps", "50",
                             "--save_every_steps", "7"])
    assert [(r["epoch"], r["step"]) for r in resumed] == [(1, 38), (2, 50)]
    assert resumed[0]["train_cells"] == (38 - 20) * 2 * 8  # the rest of epoch 1 only: the next unseen batch on
    complete = pretrain.main([*corpus, *TINY, "--ckpt_dir", str(whole), "--max_steps", "50"])
    assert [(r["epoch"], r["step"]) for r in complete] == [(1, 38), (2, 50)]
    _assert_same_weights(stopped / "k_epoch2_step50.pth", whole / "k_epoch2_step50.pth")
    assert resumed[0]["valid_loss"] == pytest.approx(complete[0]["valid_loss"], rel=1e-5)
    assert pretrain.main([*corpus, *TINY, "--ckpt_dir", str(whole), "--max_steps", "50"]) == []  # already done
    with pytest.raises(ScbertError, match="cannot resume mid-epoch with --batch_size 4 on 1 processes: that run "
                                          "used --batch_size 8 on 1"):
        pretrain.main([*corpus, *TINY, "--ckpt_dir", str(whole), "--max_steps", "60", "--batch_size", "4"])


def _free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _launch_two_nodes(args, log_dir, name):
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous on this machine (two "nodes")."""
    port = _free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
               "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", name,
               "pretrain.py", *args]
    return [subprocess.Popen(command, cwd=ROOT, env=_env(), stdout=open(log_dir / f"{name}{i}.out", "w"),
                             stderr=subprocess.STDOUT) for i in range(2)]




def _kill_all(launchers):
    pids = [pid for p in launchers for pid in (p.pid, *_descendants(p.pid))]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    for p in launchers:
        p.wait()


def _wait(launchers, log_dir, name, timeout=240):
    for p in launchers:
        p.wait(timeout=timeout)
    logs = "".join((log_dir / f"{name}{i}.out").read_text() for i in range(2))
    assert all(p.returncode == 0 for p in launchers), logs[-4000:]
    return logs


def test_two_node_torchrun_killed_mid_epoch_resumes_to_the_uninterrupted_parameters(corpus, tmp_path):
    # Two ranks: 304 training cells each, batch 8, grad_acc 2: 19 optimiser steps per epoch; 25 end in epoch 2.
    killed, whole = tmp_path / "killed", tmp_path / "whole"
    common = [*corpus, *TINY, "--max_steps", "25", "--save_every_steps", "3"]
    # The uninterrupted run beside the one to kill (timing changes nothing in what either computes).
    uninterrupted = _launch_two_nodes([*common, "--ckpt_dir", str(whole)], tmp_path, "whole")
    launchers = _launch_two_nodes([*common, "--ckpt_dir", str(killed)], tmp_path, "killed")
    try:
        deadline = time.time() + 240
        while not list(killed.glob("k_epoch*_step*.pth")) and time.time() < deadline:
            assert all(p.poll() is None for p in launchers), "the run ended before it could be killed"
            time.sleep(0.01)
    finally:
        _kill_all(launchers)
    assert not (killed / "k_epoch2_step25.pth").exists()  # killed mid-run
    logs = _wait(_launch_two_nodes([*common, "--ckpt_dir", str(killed)], tmp_path, "resumed"), tmp_path, "resumed")
    assert "resuming from" in logs and "from batch" in logs  # mid-epoch, at the next unseen batch
    _wait(uninterrupted, tmp_path, "whole")
    _assert_same_weights(killed / "k_epoch2_step25.pth", whole / "k_epoch2_step25.pth")
    assert torch.load(whole / "k_epoch2_step25.pth", weights_only=True)["world_size"] == 2


RESOLVE = textwrap.dedent("""
    import sys, types
    sys.path.insert(0, {root!r})
    from distributed import setup_distributed
    from run_state import resolve_resume
    from utils import ScbertError
    ctx = setup_distributed(types.SimpleNamespace(device="cpu", local_rank=None))
    try:
        print("resume:", resolve_resume(types.SimpleNamespace(ckpt_dir=sys.argv[1], model_name="k", resume=None)))
    except ScbertError as err:
        print("error:", err)
""")


def test_rank_zero_decides_resume_and_a_rank_that_cannot_see_the_checkpoint_stops_every_rank(tmp_path):
    # Each "node" runs in its own folder with --ckpt_dir ckpts: only one of them holds the checkpoint.
    seen, blind = tmp_path / "seen", tmp_path / "blind"
    (seen / "ckpts").mkdir(parents=True), (blind / "ckpts").mkdir(parents=True)
    torch.save({"epoch": 3}, seen / "ckpts" / "k_3.pth")
    folders = [seen, blind]  # rank 0 sees it, rank 1 does not
    port = _free_port()
    script = RESOLVE.format(root=str(ROOT))
    processes = [subprocess.Popen([sys.executable, "-c", script, "ckpts"], cwd=folders[rank], text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  env={**_env(), "RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_RANK": "0",
                                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port})
                 for rank in range(2)]
    outputs = [p.communicate(timeout=120)[0] for p in processes]
    for out in outputs:  # both stop with the same sentence instead of rank 1 starting fresh while rank 0 resumes
        assert "error: rank 1 cannot see 'ckpts/k_3.pth', the checkpoint rank 0 resumes from" in out, out


def test_finetuning_reads_shards_and_stops_at_max_steps_with_its_best_model(corpus, tmp_path):
    import finetune

    # 512 training cells (80%), batch 8, grad_acc 2: 32 optimiser steps per epoch; 10 stop in epoch 1.
    best = finetune.main([*corpus, *TINY, "--label_key", "celltype", "--ckpt_dir", str(tmp_path), "--max_steps",
                          "10", "--save_every_steps", "4", "--learning_rate", "1e-3", "--unfreeze_layers", "all"])
    assert best[0]["epoch"] == 1 and 0.0 <= best[0]["accuracy"] <= 1.0
    names = sorted(p.name for p in tmp_path.glob("*.pth"))
    assert names == ["k_best.pth", "k_epoch1_step10.pth"], names
    payload = torch.load(tmp_path / "k_epoch1_step10.pth", weights_only=True)
    assert payload["position_state_dict"] == {"epoch": 1, "batches": 20, "step": 10, "mid_epoch": True,
                                              "batch_size": 8, "world_size": 1}
    assert payload["classes"] == ["type0", "type1", "type2", "type3"]
    # Prediction in row blocks of the shards gives what the .h5ad gives for the same cells.
    from annotate import annotate
    from shards import ShardCorpus

    corpus_dir = corpus[1]
    h5ad = ad.read_h5ad(Path(corpus_dir).parent / "cells.h5ad")
    blocks = list(ShardCorpus(corpus_dir).blocks(70))
    start, block = blocks[1]
    from_shards = annotate(block, str(tmp_path / "k_best.pth"))
    from_h5ad = annotate(h5ad[start:start + 70].copy(), str(tmp_path / "k_best.pth"))
    assert len(blocks) == 10 and list(from_shards.obs_names) == list(from_h5ad.obs_names)
    assert (from_shards.obs["scbert_celltype"] == from_h5ad.obs["scbert_celltype"]).all()
    assert torch.equal(torch.as_tensor(from_shards.obsm["scbert_probabilities"]),
                       torch.as_tensor(from_h5ad.obsm["scbert_probabilities"]))
