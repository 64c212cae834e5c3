"""The shard corpus: preprocess.py --out_format shards round-trips an .h5ad exactly, several 10x folders in one call
equal their concatenation, and the loaders read shards like an .h5ad for both model families."""

import json

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.io
import scipy.sparse as sp
import torch

import preprocess
import scgpt_preprocess
from data import CellDataset
from genes import DEFAULT_REFERENCE
from models import BinVocab
from shards import ShardCorpus, genes_sha256, open_corpus
from transformer_model import GeneVocab
from utils import ScbertError, run_cli

N_GENES = 60


@pytest.fixture(scope="module")
def genes():
    with open(DEFAULT_REFERENCE) as fh:
        return [line.strip() for line in fh if line.strip()][:N_GENES]


def _counts(n_cells, genes, seed):
    rng = np.random.default_rng(seed)
    lam = rng.gamma(0.6, 3.0, size=(1, len(genes))) * rng.uniform(0.3, 3.0, size=(n_cells, 1))
    x = rng.poisson(lam).astype(np.float32)
    x[rng.random(x.shape) < 0.3] = 0
    x[::9, 5:] = 0  # every ninth cell expresses at most 5 genes: under --min_genes 10
    return sp.csr_matrix(x)


def _write_10x(folder, counts, genes, prefix):
    folder.mkdir()
    scipy.io.mmwrite(str(folder / "matrix.mtx"), sp.coo_matrix(counts.T.astype(np.int64)), field="integer")
    (folder / "features.tsv").write_text("".join(f"ENSGX{i:08d}\t{g}\tGene Expression\n" for i, g in enumerate(genes)))
    (folder / "barcodes.tsv").write_text("".join(f"{prefix}-{i}\n" for i in range(counts.shape[0])))


def _tokens(matrix, vocab, n):
    return torch.stack([CellDataset(matrix, vocab=vocab)[i]["tokens"] for i in range(n)])


def test_shards_round_trip_an_h5ad_exactly(genes, tmp_path, capsys):
    counts = _counts(53, genes, 0)
    raw = ad.AnnData(counts, obs=pd.DataFrame({"celltype": [f"t{i % 3}" for i in range(53)]},
                                              index=[f"c{i}" for i in range(53)]),
                     var=pd.DataFrame(index=genes))
    raw.write_h5ad(tmp_path / "raw.h5ad")
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(genes) + "\n")
    common = ["--data_path", str(tmp_path / "raw.h5ad"), "--ref", str(ref), "--min_genes", "10"]
    preprocess.main([*common, "--out_path", str(tmp_path / "pp.h5ad")])
    preprocess.main([*common, "--out_format", "shards", "--out_path", str(tmp_path / "sh"), "--cells_per_shard", "8",
                     "--block_cells", "5"])
    assert "backed: rows read from disk a block at a time" in capsys.readouterr().out  # never the whole file
    h5 = ad.read_h5ad(tmp_path / "pp.h5ad")
    corpus = open_corpus(str(tmp_path / "sh"), kind="scbert")
    manifest = json.loads((tmp_path / "sh" / "manifest.json").read_text())
    assert corpus.n_obs == h5.n_obs and 0 < h5.n_obs < 53  # some cells fell under --min_genes
    assert len(manifest["shards"]) == -(-h5.n_obs // 8) and manifest["genes_sha256"] == genes_sha256(genes)
    assert manifest["params"]["min_genes"] == 10 and manifest["kind"] == "scbert"
    assert manifest["index_dtype"] == "uint16" and manifest["value_dtype"] == "uint8"
    assert list(corpus.var_names) == list(h5.var_names) == genes
    pd.testing.assert_frame_equal(corpus.obs, h5.obs, check_categorical=False, check_index_type=False)
    # Every cell's tokens are the .h5ad's, for the published bin_num and for any other below 255.
    for bin_num in (5, 7):
        vocab = BinVocab(bin_num=bin_num, gene_num=N_GENES)
        assert torch.equal(_tokens(corpus, vocab, corpus.n_obs), _tokens(h5.X, vocab, h5.n_obs))
    # Stored values are the bins floor(v) of the non-zero values with floor(v) >= 1, nothing else.
    expected = sp.csr_matrix(h5.X, dtype=np.float32)
    expected.data = np.floor(expected.data)
    expected.eliminate_zeros()
    assert (corpus.to_csr() != expected).nnz == 0
    with pytest.raises(ScbertError, match="holds scbert values but this model reads scgpt"):
        open_corpus(str(tmp_path / "sh"), kind="scgpt")
    import pretrain

    with pytest.raises(ScbertError, match="is a folder without a shard manifest"):
        pretrain.main(["--data_path", str(tmp_path), "--ckpt_dir", str(tmp_path / "ck")])
    with pytest.raises(SystemExit) as exit_info:  # nothing the user had is overwritten
        run_cli(preprocess.main, [*common, "--out_format", "shards", "--out_path", str(tmp_path / "sh")])
    assert exit_info.value.code == 2


def test_several_10x_folders_in_one_call_equal_their_concatenation(genes, tmp_path):
    samples = tmp_path / "samples"
    samples.mkdir()
    parts = []
    for k, n in enumerate((23, 31, 17)):
        _write_10x(samples / f"s{k}", _counts(n, genes, 10 + k), genes, f"s{k}")
    ref = tmp_path / "ref.txt"
    ref.write_text("\n".join(genes) + "\n")
    for k in range(3):
        out = tmp_path / f"one{k}.h5ad"
        preprocess.main(["--data_path", str(samples / f"s{k}"), "--ref", str(ref), "--min_genes", "10",
                         "--out_path", str(out)])
        parts.append(ad.read_h5ad(out))
    expected = sp.vstack([p.X for p in parts], format="csr")
    summary = preprocess.main(["--data_path", str(samples), "--ref", str(ref), "--min_genes", "10",
                               "--out_path", str(tmp_path / "all.h5ad"), "--block_cells", "4"])
    together = ad.read_h5ad(tmp_path / "all.h5ad")
    assert summary["cells_out"] == expected.shape[0] == together.n_obs
    assert (together.X != expected).nnz == 0 and np.array_equal(together.X.toarray(), expected.toarray())
    assert list(together.obs_names) == [name for p in parts for name in p.obs_names]
    assert list(together.obs["input"]) == [f"s{k}" for k, p in enumerate(parts) for _ in range(p.n_obs)]
    # The same call into shards: every cell's tokens equal those of the concatenation.
    preprocess.main(["--data_path", str(samples / "s0"), str(samples / "s1"), str(samples / "s2"), "--ref", str(ref),
                     "--min_genes", "10", "--out_format", "shards", "--out_path", str(tmp_path / "sh"),
                     "--cells_per_shard", "16", "--block_cells", "4"])
    corpus = ShardCorpus(str(tmp_path / "sh"))
    vocab = BinVocab(bin_num=5, gene_num=N_GENES)
    assert torch.equal(_tokens(corpus, vocab, corpus.n_obs), _tokens(expected, vocab, expected.shape[0]))
    assert list(corpus.obs["input"]) == list(together.obs["input"])


def test_scgpt_bins_round_trip_and_feed_the_transformer_vocabulary(genes, tmp_path):
    counts = _counts(40, genes, 3)
    obs = pd.DataFrame({"donor_id": ["a"] * 20 + ["b"] * 20}, index=[f"c{i}" for i in range(40)])
    raw = ad.AnnData(counts, obs=obs, var=pd.DataFrame(index=genes))
    out = scgpt_preprocess.preprocess_scgpt(raw, n_hvg=30, hvg_batch_key=None, n_bins=11)
    scgpt_preprocess.write_scgpt_shards(out, str(tmp_path / "sg"), cells_per_shard=9)
    corpus = open_corpus(str(tmp_path / "sg"), kind="scgpt")
    assert (corpus.to_csr() != sp.csr_matrix(out.X, dtype=np.float32)).nnz == 0  # the bins, exactly
    vocab = GeneVocab(list(out.var_names))
    from_shards = CellDataset(corpus, vocab=vocab)
    from_h5ad = CellDataset(sp.csr_matrix(out.X, dtype=np.float32), vocab=vocab)
    for i in range(corpus.n_obs):
        a, b = from_shards[i], from_h5ad[i]
        assert torch.equal(a["genes"], b["genes"]) and torch.equal(a["values"], b["values"])


@pytest.mark.parametrize("n, world_size", [(1000, 4), (997, 3), (5, 2)])
def test_the_block_shuffle_sampler_gives_every_cell_once_per_epoch_over_the_ranks(n, world_size):
    from data import BlockShuffleSampler

    def epoch_order(epoch, start=0):
        ranks = []
        for rank in range(world_size):
            sampler = BlockShuffleSampler(n, rank=rank, world_size=world_size, seed=7, block_size=16, buffer_blocks=3)
            sampler.set_epoch(epoch)
            sampler.set_start(start)
            ranks.append(list(sampler))
            assert len(sampler) == len(ranks[-1])
        return ranks

    orders = epoch_order(1)
    assert len({len(r) for r in orders}) == 1  # the same count on every rank (DDP needs it)
    seen = np.bincount(np.concatenate(orders), minlength=n)
    assert seen.min() == 1 and seen.sum() - n == len(orders[0]) * world_size - n < world_size
    if n % world_size == 0:
        assert seen.max() == 1  # exactly once
    # Shuffled, differently each epoch, identically on a rerun; a resumed rank continues where it stopped.
    assert orders[0] != sorted(orders[0]) and epoch_order(2) != orders and epoch_order(1) == orders
    assert epoch_order(1, start=2) == [r[2:] for r in orders]


def test_the_shard_benchmark_writes_about_three_bytes_per_value_and_reads_it_back(tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_shards.py"
    spec = importlib.util.spec_from_file_location("bench_shards", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    row = bench.write_corpus(str(tmp_path / "c"), 300, 2000, 100)
    assert 2.9 < row["bytes_per_value"] < 3.6  # uint16 gene + uint8 value + row pointers and obs
    corpus = ShardCorpus(str(tmp_path / "c"))
    per_cell = np.diff(corpus.to_csr().indptr)
    assert corpus.n_obs == 300 and 90 <= per_cell.mean() <= 105
    assert bench.loader_rate(str(tmp_path / "c"), 5) > 0
