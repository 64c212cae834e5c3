"""Every gene keeps its identity through preprocessing: a current symbol beats its alias in any column order, aliases
among themselves follow --duplicates, names that cannot be revised are revised by the Ensembl id beside them, each
case is counted and the collisions are reported; and a pbmc3k-like file (hg19-era symbols plus Ensembl ids) aligns
exactly as an independent per-gene computation says."""

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import preprocess
from genes import AMBIGUOUS, CURRENT, UNKNOWN, load_gene_table
from preprocess import preprocess_adata
from utils import PREPROCESS_UNS_KEY


@pytest.fixture(scope="module")
def table():
    return load_gene_table()


def raw(counts, names, **var_columns):
    var = pd.DataFrame(var_columns, index=pd.Index(names, dtype=object))
    obs = pd.DataFrame(index=[f"c{i}" for i in range(len(counts))])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique.*")  # repeated names, as in 10x files
        return ad.AnnData(sp.csr_matrix(np.asarray(counts, dtype=np.float32)), obs=obs, var=var)


def run(adata, ref, table, **kw):
    return preprocess_adata(adata, ref, table=table, min_genes=0, normalize=False, log1p=False, **kw)


@pytest.mark.parametrize("order", [["HNRNPU-AS1", "HNRNPU"], ["HNRNPU", "HNRNPU-AS1"]])
@pytest.mark.parametrize("duplicates", ["first", "sum"])
def test_the_current_symbol_beats_its_alias_in_any_column_order(table, order, duplicates):
    counts = {"HNRNPU-AS1": [1, 0, 0], "HNRNPU": [7, 5, 9]}  # pbmc3k: the antisense transcript is much rarer
    adata = raw(np.array([counts[name] for name in order]).T, order)
    out, summary = run(adata, ["CD3E", "HNRNPU"], table, duplicates=duplicates)
    np.testing.assert_array_equal(out.X.toarray()[:, 1], [7, 5, 9])
    assert summary["genes_collisions"] == 1 and summary["genes_collisions_current_won"] == 1
    assert summary["collision_examples"] == "HNRNPU: kept HNRNPU over HNRNPU-AS1"
    assert out.uns[PREPROCESS_UNS_KEY]["summary"]["collision_examples"] == summary["collision_examples"]


def test_two_aliases_of_one_gene_follow_duplicates(table):
    adata = raw([[2, 3, 1], [1, 4, 0]], ["IGJ", "CD3E", "IGCJ"])  # both old names of JCHAIN, JCHAIN itself absent
    out, summary = run(adata, ["JCHAIN", "CD3E"], table)
    np.testing.assert_array_equal(out.X.toarray(), [[2, 3], [1, 4]])
    assert summary["collision_examples"] == "JCHAIN: kept IGJ over IGCJ"
    assert (summary["genes_collisions"], summary["genes_collisions_current_won"], summary["genes_duplicated"]) == (
        1, 0, 1)
    out, summary = run(adata, ["JCHAIN", "CD3E"], table, duplicates="sum")
    np.testing.assert_array_equal(out.X.toarray(), [[3, 3], [1, 4]])
    assert summary["collision_examples"] == "JCHAIN: kept IGJ + IGCJ (summed)"


def test_an_unknown_name_is_revised_by_its_ensembl_id(table):
    names = ["RP11-206L10.9", "CD3E", "NOT-A-GENE"]
    ids = ["ENSG00000237491", "ENSG00000198851", "ENSG00000000000"]
    adata = raw([[4, 1, 2], [0, 2, 2]], names, gene_ids=ids, feature_types=["Gene Expression"] * 3)
    out, summary = run(adata, ["LINC01409", "CD3E"], table)
    np.testing.assert_array_equal(out.X.toarray(), [[4, 1], [0, 2]])
    assert summary["id_column"] == "gene_ids" and summary["genes_revised_by_id"] == 1
    assert summary["genes_unknown"] == 1 and summary["genes_current"] == 1 and summary["genes_revised"] == 1
    assert summary["revised_by_id_examples"] == "RP11-206L10.9 (ENSG00000237491)->LINC01409"
    out, summary = run(adata, ["LINC01409", "CD3E"], table, id_column="none")
    np.testing.assert_array_equal(out.X.toarray(), [[0, 1], [0, 2]])
    assert summary["genes_revised_by_id"] == 0 and summary["genes_unknown"] == 2


def test_an_id_revision_collides_with_the_current_symbol_and_loses(table):
    # A clone name whose id is now CD3E's, beside a CD3E column: the column named CD3E wins in either order.
    for names in (["RP11-1.1", "CD3E"], ["CD3E", "RP11-1.1"]):
        counts = {"RP11-1.1": [5, 5], "CD3E": [1, 2]}
        adata = raw(np.array([counts[n] for n in names]).T, names,
                    ensembl_id=["ENSG00000198851"] * 2)
        out, summary = run(adata, ["CD3E"], table)
        np.testing.assert_array_equal(out.X.toarray()[:, 0], [1, 2])
        assert summary["id_column"] == "ensembl_id" and summary["genes_collisions_current_won"] == 1


def test_id_column_errors_and_summary_lines(table, tmp_path, capsys):
    adata = raw([[4, 1], [0, 2]], ["RP11-206L10.9", "CD3E"], gene_ids=["ENSG00000237491", "ENSG00000198851"],
                symbol_again=["RP11-206L10.9", "CD3E"])
    path = tmp_path / "in.h5ad"
    adata.write_h5ad(path)
    ref = tmp_path / "ref.txt"
    ref.write_text("LINC01409\nCD3E\n")
    summary = preprocess.main(["--data_path", str(path), "--ref", str(ref), "--min_genes", "0",
                               "--out_path", str(tmp_path / "out.h5ad")])
    out = capsys.readouterr().out
    assert "revised by Ensembl id (var column 'gene_ids'): 1 names" in out and summary["reference_covered"] == 2
    from utils import run_cli

    with pytest.raises(SystemExit) as exit_info:
        run_cli(preprocess.main, ["--data_path", str(path), "--ref", str(ref), "--id_column", "symbol_again",
                                  "--out_path", str(tmp_path / "out2.h5ad")])
    assert exit_info.value.code == 2
    assert "--id_column 'symbol_again' does not hold Ensembl gene ids" in capsys.readouterr().err


def independent_alignment(names, ids, reference, counts, table):
    """Per reference gene, the input column it receives, by the rules written out one gene at a time."""
    revised = []
    for name, gene_id in zip(names, ids, strict=True):
        symbol, status = table.classify(name)
        if symbol is None and gene_id.startswith("ENSG"):
            carriers = table.ensembl_to_current.get(gene_id.split(".")[0], ())
            if len(carriers) == 1:
                symbol, status = carriers[0], "by_id"
        revised.append((symbol, status))
    expected = np.zeros((counts.shape[0], len(reference)), dtype=np.float32)
    for j, gene in enumerate(reference):
        named = [i for i, (s, st) in enumerate(revised) if s == gene and st == CURRENT]
        others = [i for i, (s, st) in enumerate(revised) if s == gene and st != CURRENT]
        verbatim = [i for i, (s, st) in enumerate(revised) if s is None and names[i] == gene]
        chosen = (named or others or verbatim)[:1]
        if chosen:
            expected[:, j] = counts[:, chosen[0]]
    return expected


def test_a_pbmc3k_like_file_aligns_gene_for_gene(table):
    """Hg19-era 10x names with Ensembl ids: current symbols, their aliases (some before, some after them), aliases
    alone, clone names with a known id, unknown names and ids, ambiguous names, repeated names, in shuffled order."""
    rng = np.random.default_rng(15)
    current = [s for s in table.protein_coding()[::97]][:150]
    aliases = {}
    for name, targets in table.synonym_to_current.items():
        if len(targets) == 1 and targets[0] in current and table.classify(name) == (targets[0], "synonym"):
            aliases.setdefault(targets[0], []).append(name)
    names, ids = [], []
    for k, gene in enumerate(current):
        if k % 4 != 3:
            names.append(gene)
            ids.append(f"ENSG{rng.integers(10**10, 10**11):011d}")
        for alias in aliases.get(gene, [])[: 1 + k % 2]:
            names.append(alias)
            ids.append(f"ENSG{rng.integers(10**10, 10**11):011d}")
    ensembl_known = [(e, s[0]) for e, s in list(table.ensembl_to_current.items())[::211] if len(s) == 1][:60]
    for n, (gene_id, _) in enumerate(ensembl_known):
        names.append(f"RP11-{n}L{n}.{n % 9}")
        ids.append(gene_id + ".3" * (n % 2))
    ambiguous = [name for name, t in list(table.synonym_to_current.items())[:5000] if len(t) > 1][:10]
    names += ambiguous + ["NOT-A-GENE1", "NOT-A-GENE2", current[0], current[1]]
    ids += ["ENSG00000000000"] * (len(ambiguous) + 2) + ["ENSG00000000001", "ENSG00000000002"]
    order = rng.permutation(len(names))
    names, ids = [names[i] for i in order], [ids[i] for i in order]
    counts = rng.poisson(1.0, size=(40, len(names))).astype(np.float32)
    reference = sorted(set(current) | {s for _, s in ensembl_known} | {"CD3E", "GAPDH"})
    statuses = {table.classify(n)[1] for n in names}
    assert {CURRENT, "synonym", UNKNOWN, AMBIGUOUS} <= statuses

    adata = raw(counts, names, gene_ids=ids)
    out, summary = run(adata, reference, table)
    expected = independent_alignment(names, ids, reference, counts, table)
    np.testing.assert_array_equal(out.X.toarray(), expected)
    assert summary["genes_revised_by_id"] >= 40 and summary["genes_collisions_current_won"] >= 50
    assert list(out.var_names) == reference


def test_ref_panglao_gives_the_published_16906_columns_in_order(table, tmp_path):
    from genes import PANGLAO_REFERENCE, read_panglao_genes, read_reference_genes

    shipped = open(PANGLAO_REFERENCE, encoding="utf-8").read().splitlines()
    genes = read_reference_genes("panglao")
    assert genes == shipped and len(genes) == 16906 and genes[:2] == ["A1BG", "A1CF"] and genes[-1] == "ZBED1"
    rng = np.random.default_rng(0)
    names = [genes[i] for i in rng.choice(len(genes), 300, replace=False)] + ["NOT-A-GENE"]
    counts = rng.poisson(2.0, size=(5, len(names))).astype(np.float32)
    path = tmp_path / "cells.h5ad"
    raw(counts, names).write_h5ad(path)
    summary = preprocess.main(["--data_path", str(path), "--ref", "panglao", "--min_genes", "0",
                               "--out_path", str(tmp_path / "out.h5ad")])
    out = ad.read_h5ad(tmp_path / "out.h5ad")
    assert out.shape == (5, 16906) and list(out.var_names) == shipped and summary["reference_covered"] == 300
    column = {g: j for j, g in enumerate(shipped)}
    expected = np.log2(1 + counts[:, :300] * 1e4 / counts[:, :300].sum(axis=1, keepdims=True))
    np.testing.assert_allclose(out.X.toarray()[:, [column[g] for g in names[:300]]], expected, rtol=1e-5)

    damaged = tmp_path / "panglao.txt"
    damaged.write_text("\n".join(shipped[:-2] + [shipped[-1], shipped[-2]]) + "\n")  # two genes swapped
    with pytest.raises(Exception, match="is not the published gene list .* restore it from git"):
        read_panglao_genes(str(damaged))
