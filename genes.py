"""Gene identities: the NCBI Gene table, symbol revision, and the reference gene lists scBERT aligns data to.

scBERT reads a fixed, ordered list of genes; a data set's gene names must be revised to current NCBI symbols before
alignment, or outdated symbols (e.g. `IGJ`, now `JCHAIN`) silently become zero columns (SPEC section 1).

Revision rule (`revise_symbols`), applied to each name in turn:
1. an Ensembl gene id (`ENSG00000132465`, a version suffix `.12` or `_PAR_Y` ignored) -> the current symbol of the
   one NCBI gene that carries it; an id carried by genes with different symbols is ambiguous;
2. the current symbol of some gene -> itself (even if it is also a synonym of another gene: current wins);
3. a previous symbol or synonym of exactly one current symbol -> that symbol; of several -> ambiguous (dropped);
4. only for names that matched nothing exactly: steps 2 and 3 again, case-insensitively (`Cd3e` -> `CD3E`);
   this rescues spreadsheet-mangled case but also maps mouse symbols onto human ones, so it is counted separately;
5. anything else is unknown (dropped).

The committed table (`data/ncbi_gene_human.tsv.gz`) is an NCBI Gene snapshot built by `scripts/build_gene_table.py`
(see `data/README.md` for its date); `load_gene_table(path)` reads NCBI's own `*.gene_info(.gz)` instead.
"""

from __future__ import annotations

import csv
import functools
import gzip
import os
import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence

import pandas as pd

from utils import ScbertError

DATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
DEFAULT_TABLE = os.path.join(DATA_DIR, "ncbi_gene_human.tsv.gz")
DEFAULT_REFERENCE = os.path.join(DATA_DIR, "human_protein_coding_genes.txt")
# The published checkpoint's 16,906 genes in the order of its gene2vec rows and tokens (panglao_10000.h5ad's
# var_names; source and licence in data/README.md), checked against this sha256 of the names joined by "\n".
PANGLAO_REFERENCE = os.path.join(DATA_DIR, "panglao_16906_genes.txt")
PANGLAO_SHA256 = "4c09ba1912e184682fe5e7f32e2b443bdfb7883d0d0191551b38c6c2f155600f"
PANGLAO_GENES = 16906
REFERENCE_NAMES = {"panglao": PANGLAO_REFERENCE}
CHECKPOINT_SUFFIXES = (".pth", ".pt", ".ckpt")
TABLE_COLUMNS = ("gene_id", "symbol", "type", "synonyms", "ensembl", "authority_symbol")

# ENSG (human), ENSMUSG (mouse), ...: the species prefix, G for gene, 11 digits; GENCODE adds `.version`/`_PAR_Y`.
ENSEMBL_GENE_RE = re.compile(r"^(ENS[A-Z]*G\d{11})(?:\.\d+)?(?:_PAR_Y)?$")

# Status of one name after revision (see the module docstring).
CURRENT, SYNONYM, ENSEMBL, CASE, AMBIGUOUS, UNKNOWN = "current", "synonym", "ensembl", "case", "ambiguous", "unknown"
# A name that could not be revised, revised instead by the Ensembl id beside it (preprocess.py's --id_column).
BY_ID = "ensembl_column"


class GeneTable:
    """An NCBI Gene snapshot, indexed for revision.

    Attributes:
        source: where the table comes from (snapshot date included), recorded in preprocessed files.
        gene_type: current symbol -> NCBI gene type (`protein-coding`, `ncRNA`, `pseudo`, ...).
        synonym_to_current: previous symbol or synonym -> the distinct current symbols it names (sorted).
        ensembl_to_current: Ensembl gene id (unversioned) -> the distinct current symbols carrying it (sorted).
        authority_to_current: HGNC symbol where NCBI's differs (MT-ND3 for ND3) -> NCBI symbol; it outranks the
            synonyms of other genes (MT-CO2 is also an alias of the pseudogene MTCO2P12).
    """

    def __init__(
        self,
        symbols: Sequence[str],
        gene_types: Sequence[str],
        synonyms: Sequence[Iterable[str]],
        ensembl_ids: Sequence[Iterable[str]],
        source: str,
        authority_symbols: Sequence[str] | None = None,
    ) -> None:
        if not (len(symbols) == len(gene_types) == len(synonyms) == len(ensembl_ids)):
            raise ValueError("symbols, gene_types, synonyms and ensembl_ids must have one entry per gene")
        authority_symbols = [""] * len(symbols) if authority_symbols is None else authority_symbols
        self.source = source
        self.n_genes = len(symbols)
        self.gene_type: dict[str, str] = {}
        syn: dict[str, set[str]] = {}
        ens: dict[str, set[str]] = {}
        auth: dict[str, set[str]] = {}
        for symbol, gene_type, names, ids, hgnc in zip(
            symbols, gene_types, synonyms, ensembl_ids, authority_symbols, strict=True
        ):
            if hgnc and hgnc != symbol:
                auth.setdefault(hgnc, set()).add(symbol)
            # A few symbols name several NCBI records (e.g. HBD); protein-coding wins for the default list.
            if self.gene_type.get(symbol) != "protein-coding":
                self.gene_type[symbol] = gene_type
            for name in names:
                if name and name != symbol:
                    syn.setdefault(name, set()).add(symbol)
            for ens_id in ids:
                if ens_id:
                    ens.setdefault(ens_id, set()).add(symbol)
        self.synonym_to_current = {k: (next(iter(v)),) if len(v) == 1 else tuple(sorted(v)) for k, v in syn.items()}
        self.ensembl_to_current = {k: (next(iter(v)),) if len(v) == 1 else tuple(sorted(v)) for k, v in ens.items()}
        self.authority_to_current = {k: tuple(sorted(v)) for k, v in auth.items() if k not in self.gene_type}

    @functools.cached_property
    def _upper_current(self) -> dict[str, tuple[str, ...]]:
        upper: dict[str, set[str]] = defaultdict(set)
        for symbol in self.gene_type:
            upper[symbol.upper()].add(symbol)
        for name, targets in self.authority_to_current.items():
            upper[name.upper()].update(targets)
        return {k: tuple(sorted(v)) for k, v in upper.items()}

    @functools.cached_property
    def _upper_synonym(self) -> dict[str, tuple[str, ...]]:
        upper: dict[str, set[str]] = defaultdict(set)
        for name, targets in self.synonym_to_current.items():
            upper[name.upper()].update(targets)
        return {k: tuple(sorted(v)) for k, v in upper.items()}

    def __len__(self) -> int:
        return self.n_genes

    def __repr__(self) -> str:
        return f"GeneTable({self.n_genes} genes, {len(self.gene_type)} current symbols; {self.source})"

    def is_current(self, name: str) -> bool:
        return name in self.gene_type

    def protein_coding(self) -> list[str]:
        """Current symbols of protein-coding genes, sorted: the default reference list."""
        return sorted(s for s, t in self.gene_type.items() if t == "protein-coding")

    def classify(self, name: object) -> tuple[str | None, str]:
        """(current symbol or None, status) for one gene name or Ensembl id; see the module docstring."""
        if not isinstance(name, str) or not name.strip():
            return None, UNKNOWN
        name = name.strip()
        match = ENSEMBL_GENE_RE.match(name)
        if match:
            return _pick(self.ensembl_to_current.get(match.group(1)), ENSEMBL)
        if name in self.gene_type:
            return name, CURRENT
        if name in self.authority_to_current:
            return _pick(self.authority_to_current[name], SYNONYM)
        if name in self.synonym_to_current:
            return _pick(self.synonym_to_current[name], SYNONYM)
        upper = name.upper()
        if upper in self._upper_current:
            return _pick(self._upper_current[upper], CASE)
        return _pick(self._upper_synonym.get(upper), CASE)

    def classify_id(self, value: object) -> str | None:
        """The current symbol of the one gene carrying this Ensembl gene id, or None (not an id, unknown, or carried
        by genes with different symbols)."""
        if not isinstance(value, str):
            return None
        match = ENSEMBL_GENE_RE.match(value.strip())
        if not match:
            return None
        return _pick(self.ensembl_to_current.get(match.group(1)), ENSEMBL)[0]


def _pick(targets: tuple[str, ...] | None, status: str) -> tuple[str | None, str]:
    if not targets:
        return None, UNKNOWN
    if len(targets) > 1:
        return None, AMBIGUOUS
    return targets[0], status


def _split(text: str) -> list[str]:
    return [] if not text or text == "-" else text.split("|")


def _read_committed_table(path: str) -> GeneTable:
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        lines = fh.read().splitlines()
    source = lines[0][1:].strip() if lines and lines[0].startswith("#") else f"gene table {os.path.basename(path)}"
    body = lines[1:] if lines and lines[0].startswith("#") else lines
    if not body or body[0].split("\t") != list(TABLE_COLUMNS):
        raise ScbertError(f"{path} is not a gene table of this project; rebuild it with scripts/build_gene_table.py")
    rows = [line.split("\t") for line in body[1:]]
    return GeneTable(
        [r[1] for r in rows],
        [r[2] for r in rows],
        [r[3].split("|") if r[3] else () for r in rows],
        [r[4].split("|") if r[4] else () for r in rows],
        source,
        [r[5] for r in rows],
    )


def _read_ncbi_gene_info(path: str) -> GeneTable:
    """NCBI's `<Species>.gene_info(.gz)` (tab-separated, header `#tax_id GeneID Symbol ... Synonyms dbXrefs ...`)."""
    required = ["#tax_id", "Symbol", "Synonyms", "dbXrefs", "type_of_gene"]
    try:
        frame = pd.read_csv(
            path, sep="\t", dtype=str, keep_default_na=False, na_filter=False, quoting=csv.QUOTE_NONE, low_memory=False
        )
    except (OSError, ValueError, UnicodeDecodeError, EOFError, pd.errors.ParserError) as err:
        raise ScbertError(
            f"could not read {path} as an NCBI gene_info file ({err}); pass Homo_sapiens.gene_info(.gz)"
        ) from err
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ScbertError(
            f"{path} lacks the gene_info columns {missing}; pass NCBI's Homo_sapiens.gene_info(.gz) unchanged"
        )
    if frame.empty:
        raise ScbertError(f"{path} holds no genes; pass NCBI's Homo_sapiens.gene_info(.gz)")
    taxa = frame["#tax_id"].unique()
    if len(taxa) > 1:
        raise ScbertError(
            f"{path} holds genes of {len(taxa)} species; pass one species' file such as Homo_sapiens.gene_info.gz"
        )
    ensembl = [[x[len("Ensembl:") :] for x in _split(refs) if x.startswith("Ensembl:")] for refs in frame["dbXrefs"]]
    date = frame["Modification_date"].max() if "Modification_date" in frame.columns else "unknown"
    source = f"NCBI Gene file {os.path.basename(path)} (taxid {taxa[0]}, latest modification {date})"
    authority = frame.get("Symbol_from_nomenclature_authority")
    return GeneTable(
        frame["Symbol"].tolist(),
        frame["type_of_gene"].tolist(),
        [_split(s) for s in frame["Synonyms"]],
        ensembl,
        source,
        None if authority is None else [s if s != "-" else "" for s in authority],
    )


@functools.lru_cache(maxsize=4)
def _load_cached(path: str | None, mtime: float) -> GeneTable:
    if path is None:
        return _read_committed_table(DEFAULT_TABLE)
    return _read_ncbi_gene_info(path)


def load_gene_table(path: str | None = None) -> GeneTable:
    """The committed NCBI Gene snapshot (`path=None`), or NCBI's `Homo_sapiens.gene_info(.gz)` file at `path`."""
    if path is None:
        if not os.path.isfile(DEFAULT_TABLE):
            raise ScbertError(f"{DEFAULT_TABLE} is missing; restore it from git or run scripts/build_gene_table.py")
        return _load_cached(None, os.path.getmtime(DEFAULT_TABLE))
    if not os.path.isfile(path):
        raise ScbertError(f"gene table {path} does not exist; pass NCBI's Homo_sapiens.gene_info(.gz) or leave it out")
    if os.path.getsize(path) == 0:
        raise ScbertError(f"gene table {path} is empty; pass NCBI's Homo_sapiens.gene_info(.gz) or leave it out")
    return _load_cached(os.path.abspath(path), os.path.getmtime(path))


def detect_identifier_type(names: Iterable[object]) -> str:
    """ "ensembl" when most non-empty names are Ensembl gene ids (any species), else "symbol"."""
    total = ensembl = 0
    for name in names:
        if isinstance(name, str) and name.strip():
            total += 1
            ensembl += bool(ENSEMBL_GENE_RE.match(name.strip()))
    return "ensembl" if total and ensembl * 2 > total else "symbol"


def classify_symbols(names: Sequence[object], table: GeneTable | None = None) -> list[tuple[str | None, str]]:
    """(revised symbol or None, status) per name; status is one of current/synonym/ensembl/case/ambiguous/unknown."""
    table = load_gene_table() if table is None else table
    return [table.classify(name) for name in names]


def revision_report(names: Sequence[object], classified: Sequence[tuple[str | None, str]]) -> dict:
    """Counts of a revision: names, current, revised (= synonym + ensembl + case), each status, identifier type."""
    counts = Counter(status for _, status in classified)
    report = {"names": len(classified), "identifier_type": detect_identifier_type(names)}
    for status in (CURRENT, SYNONYM, ENSEMBL, CASE, AMBIGUOUS, UNKNOWN):
        report[status] = counts.get(status, 0)
    report["revised"] = report[SYNONYM] + report[ENSEMBL] + report[CASE]
    report["dropped"] = report[AMBIGUOUS] + report[UNKNOWN]
    return report


def revise_symbols(names: Sequence[str], table: GeneTable | None = None) -> tuple[list[str | None], dict]:
    """Revise gene symbols or Ensembl ids to current NCBI symbols.

    Returns the revised symbol per input name (None when unknown or ambiguous) and a report dict with the counts
    `names, current, synonym, ensembl, case, ambiguous, unknown, revised, dropped` and `identifier_type`.
    """
    classified = classify_symbols(names, table)
    return [symbol for symbol, _ in classified], revision_report(names, classified)


def _read_text_lines(path: str) -> list[str]:
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as fh:
            lines = fh.read().splitlines()
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise ScbertError(
            f"could not read {path} as a text file of gene symbols ({err}); pass one symbol per line, "
            f"an .h5ad or a checkpoint (.pth)"
        ) from err
    # A first column only, so a TSV with symbols first also works; '#' lines are comments.
    return [line.split("\t")[0].strip() for line in lines if line.strip() and not line.startswith("#")]


def _read_checkpoint_genes(path: str) -> list[str]:
    from performer_pytorch.checkpoint import load_checkpoint  # lazy: torch only when a checkpoint is passed

    try:
        checkpoint = load_checkpoint(path)
    except ScbertError:
        raise
    except Exception as err:  # the checkpoint reader's own error types: make them a user-facing error
        raise ScbertError(
            f"could not read the checkpoint {path} ({err}); pass a checkpoint written by this project"
        ) from err
    if checkpoint.genes is None and checkpoint.config.get("max_seq_len") == PANGLAO_GENES + 1:
        # A published (reference-format) checkpoint: its 16,907 tokens are the PanglaoDB genes in panglao order.
        return read_panglao_genes()
    if checkpoint.genes is None:
        raise ScbertError(
            f"checkpoint {path} carries no gene list; pass the reference's gene list (.h5ad or text file) instead"
        )
    return [str(g) for g in checkpoint.genes]


def _read_h5ad_var_names(path: str) -> list[str]:
    import anndata as ad

    try:
        # Backed mode reads obs/var only, so a large reference file (panglao_10000.h5ad) is not loaded whole.
        adata = ad.read_h5ad(path, backed="r")
    except Exception as err:  # h5py/anndata raise many types for a file that is not a valid h5ad
        raise ScbertError(
            f"could not read {path} as .h5ad ({err}); pass a valid .h5ad, a text file or a checkpoint"
        ) from err
    try:
        return [str(g) for g in adata.var_names]
    finally:
        adata.file.close()


def read_panglao_genes(path: str = PANGLAO_REFERENCE) -> list[str]:
    """The published checkpoint's 16,906 gene symbols in order, from the shipped list, its sha256 checked."""
    import hashlib

    if not os.path.isfile(path):
        raise ScbertError(f"{path} is missing; restore it from git (it ships with the project)")
    with open(path, encoding="utf-8") as fh:
        genes = fh.read().splitlines()
    digest = hashlib.sha256("\n".join(genes).encode("utf-8")).hexdigest()
    if digest != PANGLAO_SHA256 or len(genes) != PANGLAO_GENES:
        raise ScbertError(
            f"{path} is not the published gene list ({len(genes)} names, sha256 {digest[:12]}... instead of "
            f"{PANGLAO_GENES} names, {PANGLAO_SHA256[:12]}...); restore it from git"
        )
    return genes


def read_reference_genes(ref: str | None) -> list[str]:
    """The ordered reference gene list scBERT aligns data to.

    ref: a checkpoint (`.pth/.pt/.ckpt`, its stored genes), an `.h5ad` (its `var_names`, e.g. the published
    `panglao_10000.h5ad`), a text file (one symbol per line, `#` comments, optionally `.gz`), "panglao" for the
    shipped `data/panglao_16906_genes.txt` (the published checkpoint's genes, hash-checked; also what a published
    checkpoint without a gene list gives), or None for the shipped default `data/human_protein_coding_genes.txt`
    (protein-coding genes of the NCBI snapshot).
    """
    if ref is not None and str(ref).lower() in REFERENCE_NAMES and not os.path.exists(str(ref)):
        return read_panglao_genes(REFERENCE_NAMES[str(ref).lower()])
    path = DEFAULT_REFERENCE if ref is None else str(ref)
    if not os.path.exists(path):
        raise ScbertError(f"reference gene list {path} does not exist; pass a checkpoint, an .h5ad or a text file")
    if os.path.isdir(path):
        raise ScbertError(f"reference {path} is a folder; pass a checkpoint, an .h5ad or a text file of symbols")
    if os.path.getsize(path) == 0:
        raise ScbertError(f"reference gene list {path} is empty; pass a file listing the reference genes")
    lower = path.lower()
    if lower.endswith(CHECKPOINT_SUFFIXES):
        genes = _read_checkpoint_genes(path)
    elif lower.endswith(".h5ad"):
        genes = _read_h5ad_var_names(path)
    else:
        genes = _read_text_lines(path)
    if not genes:
        raise ScbertError(f"reference {path} lists no genes; pass a file listing the reference genes")
    duplicated = [g for g, n in Counter(genes).items() if n > 1]
    if duplicated:
        raise ScbertError(
            f"reference {path} lists {len(duplicated)} genes more than once (e.g. {duplicated[:3]}); "
            f"a reference gene list must be unique"
        )
    return genes
