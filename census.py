"""Sample whole donors from the CELLxGENE Census (or a local SOMA copy laid out like it) into an .h5ad of raw counts.

    python census.py --census_version 2023-07-25 --out_path blood.h5ad                 # scLLM's query and size
    python census.py --uri /data/census_soma --max_cells 50000 --seed 1 --out_path blood_50k.h5ad

What it does (scLLM-pretrain's sampling):
1. open the Census: `cellxgene_census.open_soma(census_version=V)` or `open_soma(uri=PATH)`, a local collection laid
   out like the Census (`census_data/<organism>` experiment, measurement `RNA`, X layer `raw`,
   `var['feature_name']`), e.g. one written with `tiledbsoma.io.from_anndata`;
2. read `obs` under `--obs_value_filter` (default: primary, non-'na' suspension, normal, blood cells);
3. drop donors (`--sample_key`) with a single cell, shuffle the rest with `--seed`, and add whole donors while the
   total stays at most `--max_cells`; a donor that would overflow is skipped and the next one tried;
4. fetch the chosen cells with `cellxgene_census.get_anndata` and write them: X = raw counts (CSR float32), obs as
   the Census has it, var_names = `feature_name` (the original index kept as `var['feature_id']`),
   `uns['census_sample']` = {params, donors (in the order they were added), cells_per_donor}.

With `--out_format shards` step 4 streams instead: the chosen cells are fetched `--block_cells` at a time and each
block goes through preprocess.py's row-block path (`preprocess.preprocess_source`, its flags in
`--preprocess_flags`) into a shard folder, so memory is one block whatever `--max_cells` is:

    python census.py --uri /data/census_soma --max_cells 33000000 --out_format shards \
        --preprocess_flags "--ref panglao" --out_path blood_shards
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

import numpy as np
import pandas as pd

from utils import ScbertError, run_cli, str2bool

BLOOD_FILTER = (
    "is_primary_data == True and suspension_type != 'na' and disease == 'normal' and tissue_general in ['blood']"
)
UNS_KEY = "census_sample"


def sample_donors(cells_per_donor: pd.Series, max_cells: int, seed: int) -> list:
    """Donors to keep: single-cell donors dropped, the rest in a random order (`seed`), each added whole while the
    total stays <= max_cells (a donor that would overflow is skipped). Returns donor names in the order added."""
    counts = cells_per_donor[cells_per_donor > 1]
    names = np.array(sorted(counts.index, key=str), dtype=object)
    order = np.random.default_rng(seed).permutation(len(names))
    chosen, total = [], 0
    for name in names[order]:
        n = int(counts[name])
        if total + n <= max_cells:
            chosen.append(name)
            total += n
    return chosen


def open_census(census_version: str | None, uri: str | None):
    """The Census collection (a context manager); one sentence when it cannot be reached or read."""
    try:
        import cellxgene_census
    except ImportError as err:
        raise ScbertError("census.py needs the cellxgene-census package: install requirements.txt") from err
    if uri is not None and not os.path.exists(uri) and "://" not in uri:
        raise ScbertError(f"--uri {uri} does not exist: pass the folder of a local SOMA collection")
    try:
        if uri is not None:
            return cellxgene_census.open_soma(uri=uri)
        return cellxgene_census.open_soma(census_version=census_version)
    except Exception as err:  # network, TLS, unknown version and TileDB errors come in many types
        where = f"the SOMA collection at {uri}" if uri else f"Census version {census_version!r}"
        raise ScbertError(
            f"could not open {where} ({type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}); "
            f"check the network connection and the version name, or pass --uri to a local copy"
        ) from err


def experiment_of(census, organism: str):
    name = organism.strip().lower().replace(" ", "_")
    try:
        data = census["census_data"]
    except KeyError as err:
        raise ScbertError("the collection has no 'census_data': pass a collection laid out like the Census") from err
    if name not in data:
        raise ScbertError(f"the collection has no {name!r} experiment (it has {sorted(data.keys())}): check --organism")
    return data[name]


def read_obs(experiment, obs_value_filter: str, sample_key: str) -> pd.DataFrame:
    """The matching cells' soma_joinid and sample column."""
    columns = experiment.obs.schema.names
    if sample_key not in columns:
        raise ScbertError(f"--sample_key {sample_key!r} is not an obs column of the collection: pick one of {columns}")
    try:
        table = experiment.obs.read(value_filter=obs_value_filter, column_names=["soma_joinid", sample_key]).concat()
    except Exception as err:  # the filter parser raises its own types
        raise ScbertError(
            f"--obs_value_filter {obs_value_filter!r} could not be applied ({str(err).splitlines()[0][:200]}): check "
            f"its column names and quoting"
        ) from err
    return table.to_pandas()[["soma_joinid", sample_key]]


def census_counts(census, organism: str, experiment, joinids: np.ndarray, name: str):
    """The chosen cells as preprocess.py's `CountSource`: obs read once (cells in soma_joinid order), var from the
    first cell, and each block's raw counts fetched from the collection only when preprocessing reaches it."""
    from preprocess import CountSource

    joinids = np.sort(np.asarray(joinids, dtype=np.int64))
    obs = experiment.obs.read(coords=(joinids,)).concat().to_pandas().sort_values("soma_joinid")
    obs.index = pd.Index(obs["soma_joinid"].astype(str).to_numpy(), dtype=object)
    var = fetch_cells(census, organism, joinids[:1]).var

    def block(start: int, stop: int):
        part = fetch_cells(census, organism, joinids[start:stop])
        return part.X[part.obs_names.get_indexer(obs.index[start:stop])]

    return CountSource(len(joinids), obs, var, "X", block, checked=False, name=name)


def fetch_cells(census, organism: str, joinids: np.ndarray):
    """AnnData of raw counts for these cells (cellxgene_census.get_anndata), var_names = feature_name."""
    import anndata as ad
    import cellxgene_census
    import scipy.sparse as sp

    adata = cellxgene_census.get_anndata(
        census, organism=organism, measurement_name="RNA", X_name="raw", obs_coords=np.sort(joinids)
    )
    var = adata.var.copy()
    if "feature_id" not in var.columns:
        var["feature_id"] = var.index.astype(str)
    if "feature_name" in var.columns:
        var.index = pd.Index(var["feature_name"].astype(str), dtype=object)
    out = ad.AnnData(X=sp.csr_matrix(adata.X, dtype=np.float32), obs=adata.obs.copy(), var=var)
    if "soma_joinid" in out.obs:
        out.obs_names = pd.Index(out.obs["soma_joinid"].astype(str).to_numpy(), dtype=object)
    out.var_names_make_unique()
    return out


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        "Sample whole donors from the CELLxGENE Census into an .h5ad of raw counts", add_help=add_help
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--census_version", default=None, help="a Census release, e.g. 2023-07-25 (scLLM's)")
    source.add_argument("--uri", default=None, help="a local SOMA collection laid out like the Census instead")
    parser.add_argument("--organism", default="Homo sapiens", help="the experiment to query")
    parser.add_argument(
        "--obs_value_filter", default=BLOOD_FILTER, help="SOMA value filter on obs (default: scLLM's blood cells)"
    )
    parser.add_argument("--max_cells", type=int, default=300_000, help="at most this many cells (scLLM: 300,000)")
    parser.add_argument("--sample_key", default="donor_id", help="obs column whose groups are kept whole")
    parser.add_argument("--seed", type=int, default=0, help="seed of the donor order")
    parser.add_argument("--out_path", required=True, help="output .h5ad, or with --out_format shards a folder")
    parser.add_argument("--overwrite", type=str2bool, default=False, help="replace an existing --out_path")
    parser.add_argument("--out_format", choices=["h5ad", "shards"], default="h5ad",
                        help="h5ad: the chosen cells' raw counts, fetched at once (scLLM); shards: fetched "
                        "--block_cells cells at a time and preprocessed as preprocess.py does into a shard folder "
                        "(memory bounded by the block, for atlas-size queries) (default: %(default)s)")
    parser.add_argument("--preprocess_flags", default="",
                        help="with --out_format shards: preprocess.py's flags, quoted as one argument, e.g. "
                        "\"--ref panglao --min_genes 200\" (default: its defaults)")
    parser.add_argument("--block_cells", type=int, default=16384,
                        help="with --out_format shards: cells fetched and preprocessed at a time (default: "
                        "%(default)s)")
    return parser


def main(argv: Sequence[str] | None = None) -> dict:
    """Sample, fetch and write; returns {"cells", "donors", "out_path"}."""
    from preprocess import write_h5ad_atomic

    args = get_args_parser().parse_args(argv)
    shards = args.out_format == "shards"
    if shards:
        preprocess_argv = _preprocess_argv(args)
    elif not args.out_path.lower().endswith(".h5ad"):
        raise ScbertError(f"--out_path {args.out_path} must end in .h5ad")
    if os.path.exists(args.out_path) and not args.overwrite:
        raise ScbertError(f"{args.out_path} already exists: pass --overwrite True or choose another --out_path")
    if args.max_cells < 2:
        raise ScbertError(f"--max_cells {args.max_cells} is too small: pass at least 2 (scLLM: 300000)")
    with open_census(args.census_version, args.uri) as census:
        experiment = experiment_of(census, args.organism)
        obs = read_obs(experiment, args.obs_value_filter, args.sample_key)
        if obs.empty:
            raise ScbertError(f"no cell matches --obs_value_filter {args.obs_value_filter!r}: loosen the filter")
        per_donor = obs[args.sample_key].astype(str).value_counts()
        donors = sample_donors(per_donor, args.max_cells, args.seed)
        if not donors:
            raise ScbertError(
                f"no donor with 2 or more matching cells fits in --max_cells {args.max_cells} (smallest: "
                f"{int(per_donor[per_donor > 1].min()) if (per_donor > 1).any() else 'none'}): raise --max_cells"
            )
        keep = obs[args.sample_key].astype(str).isin(set(donors)).to_numpy()
        print(
            f"{len(obs)} matching cells from {len(per_donor)} donors; keeping {int(keep.sum())} cells of "
            f"{len(donors)} whole donors (at most {args.max_cells}); fetching counts",
            flush=True,
        )
        joinids = obs["soma_joinid"].to_numpy()[keep]
        if shards:
            from preprocess import preprocess_source

            where = args.uri if args.uri else f"version {args.census_version}"
            source = census_counts(census, args.organism, experiment, joinids, name=f"census:{where}")
            summary = preprocess_source(preprocess_argv, source, args.out_path)
            return {"cells": int(summary["cells_out"]), "donors": [str(d) for d in donors],
                    "out_path": args.out_path}
        adata = fetch_cells(census, args.organism, joinids)
    adata.uns[UNS_KEY] = {
        "params": {
            "census_version": args.census_version or "",
            "uri": os.path.abspath(args.uri) if args.uri and "://" not in args.uri else (args.uri or ""),
            "organism": args.organism,
            "obs_value_filter": args.obs_value_filter,
            "max_cells": int(args.max_cells),
            "sample_key": args.sample_key,
            "seed": int(args.seed),
        },
        "donors": [str(d) for d in donors],
        "cells_per_donor": [int(per_donor[d]) for d in donors],
    }
    write_h5ad_atomic(adata, args.out_path)
    print(f"wrote {args.out_path}: {adata.n_obs} cells x {adata.n_vars} genes, {len(donors)} donors")
    return {"cells": int(adata.n_obs), "donors": [str(d) for d in donors], "out_path": args.out_path}


def _preprocess_argv(args: argparse.Namespace) -> list[str]:
    """preprocess.py's flags for --out_format shards, checked before anything is fetched."""
    import shlex

    try:
        flags = shlex.split(args.preprocess_flags)
    except ValueError as err:
        raise ScbertError(f"--preprocess_flags {args.preprocess_flags!r} could not be split ({err}): quote it as "
                          "one argument, e.g. \"--ref panglao --min_genes 200\"") from err
    own = [f for f in flags if f.split("=")[0] in ("--data_path", "--out_path", "--out_format", "--overwrite",
                                                    "--block_cells")]
    if own:
        raise ScbertError(f"--preprocess_flags must not set {own[0]}: census.py sets it (pass it to census.py)")
    if args.block_cells < 1:
        raise ScbertError(f"--block_cells must be at least 1, got {args.block_cells}")
    return [*flags, "--out_format", "shards", "--overwrite", str(args.overwrite), "--block_cells",
            str(args.block_cells)]


if __name__ == "__main__":
    run_cli(main)
