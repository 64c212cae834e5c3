"""Gene symbol revision against NCBI Gene, the committed table, its build script and the reference gene lists."""

import gzip
import importlib.util
import sqlite3
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import torch

import genes
from genes import GeneTable, detect_identifier_type, load_gene_table, read_reference_genes, revise_symbols
from utils import ScbertError

ROOT = Path(__file__).resolve().parents[1]


def _load_build_script():
    spec = importlib.util.spec_from_file_location("build_gene_table", ROOT / "scripts" / "build_gene_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def table():
    return load_gene_table()


@pytest.fixture
def tiny_table():
    """Hand-made: BBB is current and also a synonym of CCC; SHARED names two genes; MT-XX is an authority name."""
    return GeneTable(
        symbols=["AAA", "BBB", "CCC", "DDD"],
        gene_types=["protein-coding", "protein-coding", "ncRNA", "protein-coding"],
        synonyms=[["OLDA", "SHARED"], ["SHARED"], ["BBB", "OLDC"], ["MT-XX"]],
        ensembl_ids=[["ENSG00000000001"], [], ["ENSG00000000003"], ["ENSG00000000003"]],
        source="hand-made",
        authority_symbols=["", "", "", "MT-DDD"],
    )


# ------------------------------------------------------------------ the revision rules on a hand-made table


def test_each_revision_rule_on_a_hand_made_table(tiny_table):
    names = ["AAA", "OLDA", "BBB", "SHARED", "NOPE", "olda", "aaa", "ENSG00000000001.7", "ENSG00000000003", "MT-DDD"]
    revised, report = revise_symbols(names, tiny_table)
    assert revised == ["AAA", "AAA", "BBB", None, None, "AAA", "AAA", "AAA", None, "DDD"]
    # BBB: current wins over being CCC's synonym; SHARED: synonym of two genes; ENSG..3 is carried by CCC and DDD.
    assert report == {
        "names": 10,
        "identifier_type": "symbol",
        "current": 2,
        "synonym": 2,
        "ensembl": 1,
        "case": 2,
        "ambiguous": 2,
        "unknown": 1,
        "revised": 5,
        "dropped": 3,
    }


def test_case_insensitive_match_only_for_names_without_an_exact_match():
    # "Abc" is an exact synonym of gene XYZ, while "ABC" is another gene's current symbol: exact wins.
    table = GeneTable(["ABC", "XYZ"], ["protein-coding"] * 2, [[], ["Abc"]], [[], []], "hand-made")
    assert revise_symbols(["Abc", "abc"], table)[0] == ["XYZ", "ABC"]


def test_empty_and_missing_names_are_unknown(tiny_table):
    revised, report = revise_symbols(["", "  ", None, np.nan], tiny_table)
    assert revised == [None] * 4 and report["unknown"] == 4


# ------------------------------------------------------------------ the committed NCBI snapshot


def test_outdated_symbols_of_pbmc68k_reduced_are_revised(table):
    import scanpy as sc

    names = list(sc.datasets.pbmc68k_reduced().raw.var_names)
    revised, report = revise_symbols(names, table)
    mapping = dict(zip(names, revised, strict=True))
    assert mapping["IGJ"] == "JCHAIN"
    assert mapping["ATPIF1"] == "ATP5IF1"
    assert mapping["SEPT7"] == "SEPTIN7"
    assert mapping["H1FX"] == "H1-10"
    assert mapping["MT-ND3"] == "ND3"  # HGNC's mitochondrial name -> NCBI's symbol
    assert mapping["CD3E"] == "CD3E" and mapping["RP11-782C8.1"] is None
    assert all(table.is_current(s) for s in revised if s is not None)
    assert report["names"] == 765 and report["revised"] >= 50 and report["current"] + report["revised"] > 740


def test_current_symbol_wins_over_another_genes_synonym(table):
    # CAP2 is a current symbol and also a synonym of TMPRSS4 and SERPINB8.
    assert set(table.synonym_to_current["CAP2"]) >= {"TMPRSS4"}
    assert revise_symbols(["CAP2"], table)[0] == ["CAP2"]


def test_ambiguous_and_unknown_symbols_are_dropped(table):
    revised, report = revise_symbols(["A1B", "NOT-A-GENE-XYZ"], table)  # A1B: synonym of A1BG and SNTB1
    assert revised == [None, None]
    assert report["ambiguous"] == 1 and report["unknown"] == 1 and report["dropped"] == 2


def test_mitochondrial_hgnc_names_beat_a_pseudogene_alias(table):
    # MT-CO2 is also a synonym of the pseudogene MTCO2P12; as HGNC's name of COX2 it must map to COX2.
    assert revise_symbols(["MT-CO2", "MT-ND1", "MT-TF", "mt-nd1"], table)[0] == ["COX2", "ND1", "TRNF", "ND1"]


def test_ensembl_ids_map_to_symbols_with_versions_and_par_suffix(table):
    ids = ["ENSG00000132465", "ENSG00000132465.12", "ENSG00000198851.9_PAR_Y", "ENSMUSG00000000001"]
    revised, report = revise_symbols(ids, table)
    assert revised == ["JCHAIN", "JCHAIN", "CD3E", None]
    assert report["identifier_type"] == "ensembl" and report["ensembl"] == 3 and report["unknown"] == 1


def test_detect_identifier_type():
    assert detect_identifier_type(["ENSG00000132465.3", "ENSG00000198851", "CD3E"]) == "ensembl"
    assert detect_identifier_type(["CD3E", "JCHAIN", "ENSG00000198851"]) == "symbol"
    assert detect_identifier_type(["ENSMUSG00000000001"]) == "ensembl"
    assert detect_identifier_type([]) == "symbol"


def test_committed_table_is_compact_and_documented(table):
    data = ROOT / "data"
    size = sum(p.stat().st_size for p in data.iterdir() if p.is_file())
    assert size < 3e6
    assert "2022-Sep12" in table.source and "r-bioc-org.hs.eg.db" in table.source
    readme = (data / "README.md").read_text()
    assert "2022-Sep12" in readme and "3.16.0-1" in readme and "build_gene_table.py" in readme
    assert len(table) == 77614


def test_default_reference_is_the_sorted_protein_coding_genes(table):
    default = read_reference_genes(None)
    assert default == table.protein_coding()
    assert len(default) == 20598 and default == sorted(default)
    assert "JCHAIN" in default and "CD3E" in default and "XIST" not in default


# ------------------------------------------------------------------ NCBI's own gene_info file


def _write_gene_info(path: Path, rows, tax_ids=None) -> None:
    header = (
        "#tax_id\tGeneID\tSymbol\tLocusTag\tSynonyms\tdbXrefs\tchromosome\tmap_location\tdescription\t"
        "type_of_gene\tSymbol_from_nomenclature_authority\tFull_name_from_nomenclature_authority\t"
        "Nomenclature_status\tOther_designations\tModification_date\tFeature_type\n"
    )
    lines = [header]
    for i, (symbol, synonyms, xrefs, gene_type, authority) in enumerate(rows):
        tax = tax_ids[i] if tax_ids else "9606"
        lines.append(
            f"{tax}\t{i + 1}\t{symbol}\t-\t{synonyms}\t{xrefs}\t1\t-\tdesc\t{gene_type}\t{authority}\t-\tO\t-\t"
            f"2024011{i}\t-\n"
        )
    with gzip.open(path, "wt") as fh:
        fh.writelines(lines)


def test_gene_info_file_is_read(tmp_path):
    path = tmp_path / "Homo_sapiens.gene_info.gz"
    _write_gene_info(
        path,
        [
            ("JCHAIN", "IGCJ|IGJ", "MIM:147790|HGNC:HGNC:5713|Ensembl:ENSG00000132465", "protein-coding", "JCHAIN"),
            ("ND1", "MTND1", "Ensembl:ENSG00000198888", "protein-coding", "MT-ND1"),
            ("XIST", "-", "-", "ncRNA", "XIST"),
        ],
    )
    table = load_gene_table(str(path))
    revised, _ = revise_symbols(["IGJ", "ENSG00000132465.2", "MT-ND1", "XIST", "CD3E"], table)
    assert revised == ["JCHAIN", "JCHAIN", "ND1", "XIST", None]
    assert table.protein_coding() == ["JCHAIN", "ND1"]
    assert "Homo_sapiens.gene_info.gz" in table.source and "20240112" in table.source


def test_gene_info_errors(tmp_path):
    bad = tmp_path / "not_gene_info.tsv"
    bad.write_text("a\tb\n1\t2\n")
    with pytest.raises(ScbertError, match="lacks the gene_info columns"):
        load_gene_table(str(bad))
    mixed = tmp_path / "All.gene_info.gz"
    _write_gene_info(mixed, [("A", "-", "-", "ncRNA", "-"), ("B", "-", "-", "ncRNA", "-")], tax_ids=["9606", "10090"])
    with pytest.raises(ScbertError, match="2 species"):
        load_gene_table(str(mixed))
    with pytest.raises(ScbertError, match="does not exist"):
        load_gene_table(str(tmp_path / "missing.gene_info"))


# ------------------------------------------------------------------ reference gene lists


def test_reference_from_text_file(tmp_path):
    path = tmp_path / "ref.txt"
    path.write_text("# my reference\nCD3E\n\nIGJ\tanything after a tab is ignored\nNKG7\n")
    assert read_reference_genes(str(path)) == ["CD3E", "IGJ", "NKG7"]
    gz = tmp_path / "ref.txt.gz"
    with gzip.open(gz, "wt") as fh:
        fh.write("B\nA\n")
    assert read_reference_genes(str(gz)) == ["B", "A"]


def test_reference_from_h5ad_var_names(tmp_path):
    path = tmp_path / "panglao_like.h5ad"
    ad.AnnData(np.zeros((2, 3), dtype=np.float32), var=pd.DataFrame(index=["ZFP1", "A1BG", "IGJ"])).write_h5ad(path)
    assert read_reference_genes(str(path)) == ["ZFP1", "A1BG", "IGJ"]


def test_reference_from_checkpoint(tmp_path):
    path = tmp_path / "model.pth"
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "config": {"dim": 8}, "genes": ["B", "A"]}, path)
    assert read_reference_genes(str(path)) == ["B", "A"]
    torch.save({"model_state_dict": {"w": torch.zeros(1)}, "config": {"dim": 8}, "genes": None}, path)
    with pytest.raises(ScbertError, match="carries no gene list; pass the reference's gene list"):
        read_reference_genes(str(path))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(ScbertError, match="checkpoint"):
        read_reference_genes(str(junk))


def test_reference_errors(tmp_path):
    with pytest.raises(ScbertError, match="does not exist"):
        read_reference_genes(str(tmp_path / "nope.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(ScbertError, match="is empty"):
        read_reference_genes(str(empty))
    dup = tmp_path / "dup.txt"
    dup.write_text("A\nB\nA\n")
    with pytest.raises(ScbertError, match="more than once"):
        read_reference_genes(str(dup))
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(ScbertError, match="could not read"):
        read_reference_genes(str(bad))


# ------------------------------------------------------------------ the build script, on a hand-made snapshot


def _tiny_org_db(path: Path) -> None:
    con = sqlite3.connect(path)
    con.executescript(
        """
        CREATE TABLE metadata (name TEXT, value TEXT);
        CREATE TABLE genes (_id INTEGER, gene_id TEXT);
        CREATE TABLE gene_info (_id INTEGER, gene_name TEXT, symbol TEXT);
        CREATE TABLE genetype (_id INTEGER, gene_type TEXT);
        CREATE TABLE alias (_id INTEGER, alias_symbol TEXT);
        CREATE TABLE ensembl (_id INTEGER, ensembl_id TEXT);
        CREATE TABLE chromosomes (_id INTEGER, chromosome TEXT);
        INSERT INTO metadata VALUES ('EGSOURCEDATE', '2099-Jan01'), ('ORGANISM', 'Homo sapiens'), ('TAXID', '9606');
        INSERT INTO genes VALUES (1, '3512'), (2, '4537'), (3, '4558'), (4, '10');
        INSERT INTO gene_info VALUES (1, 'joining chain', 'JCHAIN'), (2, 'NADH 3', 'ND3'), (3, 'tRNA F', 'TRNF'),
            (4, 'NAT2', 'NAT2');
        INSERT INTO genetype VALUES (1, 'protein-coding'), (2, 'protein-coding'), (3, 'tRNA'), (4, 'protein-coding');
        INSERT INTO alias VALUES (1, 'IGJ'), (1, 'JCHAIN'), (1, 'IGCJ'), (2, 'MTND3'), (2, 'ND3'), (3, 'TRNF'),
            (4, 'AAC2'), (4, 'NAT2');
        INSERT INTO ensembl VALUES (1, 'ENSG00000132465'), (2, 'ENSG00000198840');
        INSERT INTO chromosomes VALUES (1, '4'), (2, 'MT'), (3, 'MT'), (4, '8');
        """
    )
    con.commit()
    con.close()


def test_build_script_writes_a_reproducible_table(tmp_path):
    sqlite_path = tmp_path / "org.Hs.eg.sqlite"
    _tiny_org_db(sqlite_path)
    out = tmp_path / "out"
    args = ["--sqlite", str(sqlite_path), "--package_version", "9.9-1", "--out_dir", str(out)]
    build_gene_table = _load_build_script()
    build_gene_table.main(args)
    first = (out / "ncbi_gene_human.tsv.gz").read_bytes()
    build_gene_table.main(args)
    assert (out / "ncbi_gene_human.tsv.gz").read_bytes() == first  # byte-for-byte reproducible
    lines = gzip.decompress(first).decode().splitlines()
    assert lines[0].startswith("# NCBI Gene (Homo sapiens, taxid 9606) snapshot 2099-Jan01")
    assert "9.9-1" in lines[0]
    assert lines[1:] == [
        "gene_id\tsymbol\ttype\tsynonyms\tensembl\tauthority_symbol",
        "10\tNAT2\tprotein-coding\tAAC2\t\t",
        "3512\tJCHAIN\tprotein-coding\tIGJ|IGCJ\tENSG00000132465\t",
        "4537\tND3\tprotein-coding\tMTND3\tENSG00000198840\tMT-ND3",
        "4558\tTRNF\ttRNA\t\t\tMT-TF",
    ]
    assert (out / "human_protein_coding_genes.txt").read_text() == "JCHAIN\nNAT2\nND3\n"
    # The committed loader reads what the script writes.
    table = genes._read_committed_table(str(out / "ncbi_gene_human.tsv.gz"))
    assert revise_symbols(["IGJ", "MT-ND3", "ENSG00000198840"], table)[0] == ["JCHAIN", "ND3", "ND3"]
