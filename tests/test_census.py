"""census.py on a small local SOMA collection laid out like the Census, built here from real PBMC counts."""

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

pytest.importorskip("tiledbsoma", reason="census.py needs tiledbsoma (requirements.txt)")
pytest.importorskip("cellxgene_census", reason="census.py needs cellxgene-census (requirements.txt)")

import census  # noqa: E402
from utils import ScbertError  # noqa: E402

FILTER_COLUMNS = ("is_primary_data", "suspension_type", "disease", "tissue_general")


@pytest.fixture(scope="module")
def local_census(tmp_path_factory):
    """(uri, source AnnData): 700 PBMCs given 16 donors of uneven sizes (two with a single cell), tissues, diseases,
    suspension types and primary flags; stored with tiledbsoma.io as census_data/homo_sapiens, RNA, X 'raw'."""
    import tiledbsoma as soma
    import tiledbsoma.io

    from preprocess import load_pbmc68k_counts

    adata = load_pbmc68k_counts()
    rng = np.random.default_rng(0)
    n = adata.n_obs
    sizes = [150, 120, 90, 80, 60, 50, 40, 30, 25, 20, 14, 10, 5, 4]
    donors = np.concatenate([np.repeat([f"donor{i}" for i in range(len(sizes))], sizes)])
    donors = np.concatenate([donors, np.repeat("other", n - donors.size - 2), ["single1", "single2"]])
    obs = pd.DataFrame(index=adata.obs_names)
    obs["donor_id"] = rng.permutation(donors)
    single = obs["donor_id"].str.startswith("single")
    obs["tissue_general"] = np.where(rng.random(n) < 0.85, "blood", "lung")
    obs["disease"] = np.where(rng.random(n) < 0.85, "normal", "COVID-19")
    obs["suspension_type"] = np.where(rng.random(n) < 0.9, "cell", "na")
    obs["is_primary_data"] = rng.random(n) < 0.95
    obs.loc[single, list(FILTER_COLUMNS)] = [True, "cell", "normal", "blood"]  # the single-cell donors match
    adata.obs = obs
    adata.var["feature_name"] = adata.var_names
    adata.var_names = [f"ENSG{i:011d}" for i in range(adata.n_vars)]
    root = str(tmp_path_factory.mktemp("census") / "soma")
    with soma.Collection.create(root) as collection:
        collection.add_new_collection("census_data")
    experiment_uri = f"{root}/census_data/homo_sapiens"
    tiledbsoma.io.from_anndata(experiment_uri, adata, measurement_name="RNA", X_layer_name="raw")
    with soma.Collection.open(f"{root}/census_data", "w") as data:
        data.set("homo_sapiens", soma.Experiment.open(experiment_uri), use_relative_uri=True)
    return root, adata


def matching(obs: pd.DataFrame) -> pd.Series:
    return obs["is_primary_data"] & (obs["suspension_type"] != "na") & (obs["disease"] == "normal") & (
        obs["tissue_general"] == "blood"
    )


def test_sample_donors_whole_within_budget_greedy():
    counts = pd.Series({"a": 5, "b": 3, "c": 1, "d": 4, "e": 2})
    results = set()
    for seed in range(30):
        chosen = census.sample_donors(counts, 8, seed)
        total = int(counts[chosen].sum())
        assert total <= 8 and "c" not in chosen and len(set(chosen)) == len(chosen)
        # A donor left out would have overflowed when its turn came (totals only grow).
        assert all(total + counts[d] > 8 for d in counts.index if d not in chosen and d != "c")
        assert census.sample_donors(counts, 8, seed) == chosen
        results.add(tuple(sorted(chosen)))
    assert len(results) > 1  # the seed changes the donors


@pytest.mark.parametrize("max_cells", [200, 10_000])
def test_census_keeps_whole_donors_and_the_budget(local_census, tmp_path, max_cells):
    uri, source = local_census
    out_path = tmp_path / "blood.h5ad"
    result = census.main(["--uri", uri, "--max_cells", str(max_cells), "--seed", "3", "--out_path", str(out_path)])
    out = ad.read_h5ad(out_path)
    want = source.obs[matching(source.obs)]
    per_donor = want["donor_id"].value_counts()
    donors = out.uns["census_sample"]["donors"]
    assert result["donors"] == list(donors) and result["cells"] == out.n_obs <= max_cells
    assert not any(d.startswith("single") for d in donors)
    assert sorted(set(out.obs["donor_id"])) == sorted(donors)
    for donor in donors:  # every matching cell of a chosen donor, nothing else
        assert (out.obs["donor_id"] == donor).sum() == per_donor[donor]
    assert matching(out.obs).all()
    unchosen = [d for d in per_donor.index if d not in donors and per_donor[d] > 1]
    assert all(out.n_obs + per_donor[d] > max_cells for d in unchosen)
    if max_cells >= len(want):
        # Everything but the donors with one matching cell (the two planted ones and any the filter left at one).
        assert out.n_obs == int(per_donor[per_donor > 1].sum()) <= len(want) - 2
    # Raw counts of the same cells and genes, genes named by feature_name.
    assert list(out.var_names) == list(source.var["feature_name"])
    cells = source.obs_names[out.obs["soma_joinid"].astype(int).to_numpy()]
    assert (out.X.toarray() == source[cells].X.toarray()).all()
    assert out.uns["census_sample"]["params"]["max_cells"] == max_cells


def test_census_refusals(local_census, tmp_path):
    uri, _ = local_census
    out_path = tmp_path / "x.h5ad"
    with pytest.raises(ScbertError, match="could not be applied"):
        census.main(["--uri", uri, "--obs_value_filter", "no_such_column == 'x'", "--out_path", str(out_path)])
    with pytest.raises(ScbertError, match="is not an obs column"):
        census.main(["--uri", uri, "--sample_key", "sample", "--out_path", str(out_path)])
    with pytest.raises(ScbertError, match="does not exist"):
        census.main(["--uri", str(tmp_path / "missing"), "--out_path", str(out_path)])
    out_path.write_text("keep me")
    with pytest.raises(ScbertError, match="already exists"):
        census.main(["--uri", uri, "--out_path", str(out_path)])
    assert out_path.read_text() == "keep me"


def test_census_cli_exit_code(local_census, tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    uri, _ = local_census
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run(
        [sys.executable, str(root / "census.py"), "--uri", uri, "--sample_key", "nope", "--out_path",
         str(tmp_path / "y.h5ad")], capture_output=True, text=True,
    )
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "nope" in proc.stderr


def test_a_census_query_streams_into_the_shards_preprocessing_its_h5ad_gives(local_census, tmp_path):
    # Fetched and preprocessed 37 cells at a time (several blocks, the last one short): the same shard folder as
    # census.py's .h5ad of raw counts put through preprocess.py --out_format shards.
    import preprocess
    from shards import ShardCorpus

    uri, _ = local_census
    flags = ["--uri", uri, "--max_cells", "400", "--seed", "3"]
    census.main([*flags, "--out_path", str(tmp_path / "blood.h5ad")])
    preprocess.main(["--data_path", str(tmp_path / "blood.h5ad"), "--ref", "panglao", "--min_genes", "20",
                     "--out_format", "shards", "--out_path", str(tmp_path / "via_h5ad")])
    result = census.main([*flags, "--out_format", "shards", "--block_cells", "37", "--out_path",
                          str(tmp_path / "streamed"), "--preprocess_flags", "--ref panglao --min_genes 20"])
    want, got = ShardCorpus(str(tmp_path / "via_h5ad")), ShardCorpus(str(tmp_path / "streamed"))
    assert result["cells"] == got.n_obs == want.n_obs > 37 * 2
    assert got.genes == want.genes
    assert (got.to_csr() != want.to_csr()).nnz == 0
    assert list(got.obs.index) == list(want.obs.index)
    assert list(got.obs["donor_id"].astype(str)) == list(want.obs["donor_id"].astype(str))
    assert got.manifest["params"]["input"] == f"census:{uri}"
    with pytest.raises(ScbertError, match="must not set --out_path"):
        census.main([*flags, "--out_format", "shards", "--out_path", str(tmp_path / "x"),
                     "--preprocess_flags", "--out_path elsewhere"])


def test_a_census_query_streams_through_the_scgpt_recipe(local_census, tmp_path):
    # Three passes over the collection (HVG sums, clipped sums, bins), 50 cells a fetch: the in-memory recipe's
    # genes and bins on census.py's .h5ad of the same cells.
    from scgpt_preprocess import preprocess_scgpt
    from shards import ShardCorpus

    uri, _ = local_census
    flags = ["--uri", uri, "--max_cells", "400", "--seed", "3"]
    census.main([*flags, "--out_path", str(tmp_path / "blood.h5ad")])
    expected = preprocess_scgpt(ad.read_h5ad(tmp_path / "blood.h5ad"), n_hvg=100, n_bins=21)
    census.main([*flags, "--out_format", "shards", "--block_cells", "50", "--out_path", str(tmp_path / "binned"),
                 "--preprocess_flags", "--recipe scgpt --n_hvg 100 --n_bins 21"])
    got = ShardCorpus(str(tmp_path / "binned"))
    assert got.genes == list(expected.var_names)
    assert (got.to_csr() != sp.csr_matrix(expected.X, dtype=np.float32)).nnz == 0
    assert list(got.obs.index) == list(expected.obs_names)
