"""Build the committed human gene table under data/ from an NCBI Gene snapshot (no R needed).

Source: Debian's `r-bioc-org.hs.eg.db` package, which ships NCBI Gene (Entrez Gene) for Homo sapiens as one SQLite
file (`org.Hs.eg.sqlite`). This script fetches the package with `apt-get download` (or takes a `.deb` / `.sqlite`
you already have), unpacks it with `dpkg -x`, reads the tables with Python's sqlite3 and writes:

- `data/ncbi_gene_human.tsv.gz`: one row per NCBI gene: gene_id, symbol, type, synonyms (previous symbols and
  aliases, `|`-separated, the current symbol left out), ensembl (`|`-separated), authority_symbol (HGNC's symbol
  where NCBI's differs: the 37 mitochondrial genes, MT-ND3 for ND3). The first line is a `#` comment naming the
  snapshot; `genes.load_gene_table()` reads it back as the table's `source`.
- `data/human_protein_coding_genes.txt`: the unique current symbols of protein-coding genes, sorted; the default
  reference gene list of `preprocess.py`.

Both files are written byte-for-byte reproducibly (gzip without a timestamp), so rebuilding from the same package
gives the same files.

    python scripts/build_gene_table.py                       # apt-get download into a temporary folder
    python scripts/build_gene_table.py --deb r-bioc-org.hs.eg.db_3.16.0-1_all.deb
    python scripts/build_gene_table.py --sqlite org.Hs.eg.sqlite --package_version "3.16.0-1"
"""

from __future__ import annotations

import argparse
import glob
import gzip
import io
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
from collections import defaultdict
from collections.abc import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from genes import TABLE_COLUMNS  # noqa: E402
from utils import ScbertError, atomic_write_bytes, run_cli  # noqa: E402

PACKAGE = "r-bioc-org.hs.eg.db"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TABLE_NAME = "ncbi_gene_human.tsv.gz"
PROTEIN_CODING_NAME = "human_protein_coding_genes.txt"
COLUMNS = TABLE_COLUMNS


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Build data/ncbi_gene_human.tsv.gz from Debian's r-bioc-org.hs.eg.db (NCBI Gene as SQLite)",
        add_help=add_help,
    )
    parser.add_argument("--deb", default=None, help="an already downloaded r-bioc-org.hs.eg.db .deb (else apt-get)")
    parser.add_argument("--sqlite", default=None, help="an already unpacked org.Hs.eg.sqlite (skips the .deb)")
    parser.add_argument(
        "--package_version", default=None, help="Debian version to record with --sqlite (read from the .deb otherwise)"
    )
    parser.add_argument("--out_dir", default=os.path.join(REPO_ROOT, "data"), help="where the files are written")
    return parser


def download_deb(folder: str) -> str:
    """`apt-get download` the package into `folder`; returns the .deb path."""
    try:
        subprocess.run(["apt-get", "download", PACKAGE], cwd=folder, check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        detail = getattr(err, "stderr", "") or str(err)
        raise ScbertError(
            f"apt-get download {PACKAGE} failed ({detail.strip()}); run `apt-get update` first or pass --deb/--sqlite"
        ) from err
    debs = glob.glob(os.path.join(folder, f"{PACKAGE}_*.deb"))
    if not debs:
        raise ScbertError(f"apt-get download left no {PACKAGE} .deb in {folder}; pass --deb or --sqlite instead")
    return debs[0]


def deb_version(deb: str) -> str:
    """The package version, from `dpkg-deb --field` (falls back to the file name)."""
    try:
        out = subprocess.run(["dpkg-deb", "--field", deb, "Version"], check=True, capture_output=True, text=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        match = re.search(r"_([^_]+)_[^_]+\.deb$", os.path.basename(deb))
        return match.group(1) if match else "unknown"


def unpack_sqlite(deb: str, folder: str) -> str:
    """`dpkg -x` the .deb into `folder`; returns the path of org.Hs.eg.sqlite inside."""
    try:
        subprocess.run(["dpkg", "-x", deb, folder], check=True, capture_output=True, text=True)
    except (OSError, subprocess.CalledProcessError) as err:
        raise ScbertError(f"could not unpack {deb} with dpkg -x ({err}); pass --sqlite with the unpacked file") from err
    found = glob.glob(os.path.join(folder, "**", "org.Hs.eg.sqlite"), recursive=True)
    if not found:
        raise ScbertError(f"{deb} holds no org.Hs.eg.sqlite; is it the {PACKAGE} package?")
    return found[0]


def read_snapshot(sqlite_path: str) -> tuple[list[tuple[str, ...]], dict[str, str]]:
    """Rows (gene_id, symbol, type, synonyms, ensembl) sorted by numeric gene id, and the metadata table."""
    con = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    try:
        meta = dict(con.execute("SELECT name, value FROM metadata").fetchall())
        genes = con.execute(
            "SELECT g._id, g.gene_id, i.symbol, t.gene_type FROM genes g "
            "JOIN gene_info i ON i._id = g._id JOIN genetype t ON t._id = g._id"
        ).fetchall()
        aliases: dict[int, list[str]] = defaultdict(list)
        for key, alias in con.execute("SELECT _id, alias_symbol FROM alias ORDER BY rowid"):
            aliases[key].append(alias)
        ensembl: dict[int, list[str]] = defaultdict(list)
        for key, ens in con.execute("SELECT _id, ensembl_id FROM ensembl ORDER BY rowid"):
            ensembl[key].append(ens)
        mito = {key for (key,) in con.execute("SELECT _id FROM chromosomes WHERE chromosome = 'MT'")}
    finally:
        con.close()

    current = {symbol for _, _, symbol, _ in genes}
    authority = {}
    for key, _, symbol, _ in genes:
        if key in mito:
            hgnc = mitochondrial_hgnc_symbol(symbol, aliases.get(key, []))
            if hgnc and hgnc not in current:
                authority[key] = hgnc

    rows = []
    for key, gene_id, symbol, gene_type in genes:
        # The alias table lists the current symbol too; it is a column of its own here.
        synonyms = list(dict.fromkeys(a for a in aliases.get(key, []) if a != symbol))
        ens = list(dict.fromkeys(ensembl.get(key, [])))
        for text in (symbol, *synonyms):
            if "\t" in text or "|" in text:
                raise ScbertError(f"symbol {text!r} of gene {gene_id} holds a tab or '|', which the table format uses")
        rows.append((str(gene_id), symbol, gene_type, "|".join(synonyms), "|".join(ens), authority.get(key, "")))
    rows.sort(key=lambda row: int(row[0]))
    return rows, meta


def mitochondrial_hgnc_symbol(symbol: str, synonyms: Sequence[str]) -> str | None:
    """HGNC's `MT-` name of a mitochondrial gene, which NCBI lists under a bare symbol (ND3 for MT-ND3).

    The SQLite snapshot lacks NCBI's `Symbol_from_nomenclature_authority` column, so the name is rebuilt from the
    `MT...` synonym NCBI keeps (MTND3 -> MT-ND3, MTTC -> MT-TC) or, for tRNAs without one, from the symbol
    (TRNF -> MT-TF). 10x references and most count matrices use the `MT-` names.
    """
    for name in synonyms:
        if re.fullmatch(r"MT[A-Z][A-Z0-9]*", name) and name != symbol:
            return f"MT-{name[2:]}"
    if re.fullmatch(r"TRN[A-Z][0-9]?", symbol):
        return f"MT-T{symbol[3:]}"
    return None


def table_bytes(rows: Sequence[tuple[str, ...]], header_comment: str) -> bytes:
    """The gzip'd TSV, without a timestamp in the gzip header so rebuilding gives identical bytes."""
    text = io.StringIO()
    text.write(f"# {header_comment}\n")
    text.write("\t".join(COLUMNS) + "\n")
    for row in rows:
        text.write("\t".join(row) + "\n")
    return gzip.compress(text.getvalue().encode("utf-8"), compresslevel=9, mtime=0)


def protein_coding_symbols(rows: Sequence[tuple[str, ...]]) -> list[str]:
    """Unique current symbols of protein-coding genes, sorted (the default reference order)."""
    return sorted({row[1] for row in rows if row[2] == "protein-coding"})


def build(sqlite_path: str, package_version: str, out_dir: str) -> dict[str, str]:
    """Write the two data files; returns their paths and the snapshot date."""
    rows, meta = read_snapshot(sqlite_path)
    date = meta.get("EGSOURCEDATE", "unknown date")
    organism = meta.get("ORGANISM", "Homo sapiens")
    comment = (
        f"NCBI Gene ({organism}, taxid {meta.get('TAXID', '9606')}) snapshot {date}, "
        f"Ensembl ids as NCBI Gene maps them; "
        f"from Debian {PACKAGE} {package_version}; built by scripts/build_gene_table.py"
    )
    table_path = os.path.join(out_dir, TABLE_NAME)
    atomic_write_bytes(table_path, table_bytes(rows, comment))
    coding = protein_coding_symbols(rows)
    coding_path = os.path.join(out_dir, PROTEIN_CODING_NAME)
    atomic_write_bytes(coding_path, ("\n".join(coding) + "\n").encode("utf-8"))
    print(f"{len(rows)} genes ({len(coding)} protein-coding symbols), NCBI Gene snapshot {date}")
    print(f"wrote {table_path} ({os.path.getsize(table_path) / 1e6:.2f} MB) and {coding_path}")
    return {"table": table_path, "protein_coding": coding_path, "date": date}


def main(argv: Sequence[str] | None = None) -> dict[str, str]:
    args = get_args_parser().parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.sqlite:
            if not os.path.isfile(args.sqlite):
                raise ScbertError(f"--sqlite {args.sqlite} does not exist; pass the unpacked org.Hs.eg.sqlite")
            return build(args.sqlite, args.package_version or "unknown version", args.out_dir)
        deb = args.deb or download_deb(tmp)
        if not os.path.isfile(deb):
            raise ScbertError(f"--deb {deb} does not exist; pass the downloaded {PACKAGE} .deb or leave it out")
        return build(unpack_sqlite(deb, tmp), args.package_version or deb_version(deb), args.out_dir)


if __name__ == "__main__":
    run_cli(main)
