"""Per-cell quantile binning against cells worked out by hand."""

import numpy as np
import pytest
import scipy.sparse as sp

from binning import bin_cells, looks_binned
from utils import ScbertError


def test_distinct_values_hand_worked():
    # Cell 0: non-zeros 1, 2, 3 with 5 bins -> 4 edges at quantiles 0, 1/3, 2/3, 1 = [1, 5/3, 7/3, 3].
    #   1: one edge <= 1 and it equals 1 -> right 0, left 1 -> 1;  2: 2 edges below, none equal -> 2;
    #   3: 3 edges below, the last equal -> 4.  Zeros stay 0.
    # Cell 1: 1..5 (all non-zero) with 6 bins would be [1..5]; with 5 bins edges [1, 2.333, 3.667, 5]:
    #   1 -> 1, 2 -> 1, 3 -> 2, 4 -> 3, 5 -> 4.
    x = sp.csr_matrix(np.array([[0, 1, 0, 2, 3], [1, 2, 3, 4, 5]], dtype=np.float32))
    bins, edges = bin_cells(x, n_bins=5, seed=0)
    assert bins.toarray().tolist() == [[0, 1, 0, 2, 4], [1, 1, 2, 3, 4]]
    np.testing.assert_allclose(edges[0], [1, 5 / 3, 7 / 3, 3], rtol=1e-6)
    np.testing.assert_allclose(edges[1], [1, 7 / 3, 11 / 3, 5], rtol=1e-6)
    assert bins.dtype == np.int8 and edges.shape == (2, 4)


def test_all_non_zero_cell_uses_every_bin_once():
    # Five distinct values and 6 bins: the edges are the values themselves, so value k lands in bin k.
    x = sp.csr_matrix(np.array([[10.0, 0.5, 7.0, 3.0, 1.0]]))
    bins, _ = bin_cells(x, n_bins=6)
    assert bins.toarray().tolist() == [[5, 1, 4, 3, 2]]


def test_ties_spread_between_their_edges_and_are_seeded():
    # Cell [2, 2, 2, 2, 9] with 5 bins: edges [2, 2, 2, 9]; a 2 has 0 edges below and 3 equal -> uniform on 1..3;
    # 9 has 3 edges below and one equal -> 4.
    x = sp.csr_matrix(np.tile(np.array([[2.0, 2.0, 2.0, 2.0, 9.0]]), (400, 1)))
    bins, _ = bin_cells(x, n_bins=5, seed=3)
    dense = bins.toarray()
    assert (dense[:, 4] == 4).all()
    tied = dense[:, :4].ravel()
    assert set(np.unique(tied)) == {1, 2, 3}
    counts = np.bincount(tied, minlength=4)[1:]
    assert counts.min() > 400 * 4 / 3 * 0.8  # about a third each
    again, _ = bin_cells(x, n_bins=5, seed=3)
    other, _ = bin_cells(x, n_bins=5, seed=4)
    assert (again.toarray() == dense).all() and (other.toarray() != dense).any()


def test_all_equal_cell_spreads_over_every_bin():
    # One value repeated: every edge equals it -> uniform on 1..n_bins-1.
    x = sp.csr_matrix(np.full((1, 2000), 4.0))
    bins, _ = bin_cells(x, n_bins=11, seed=0)
    assert set(np.unique(bins.data)) == set(range(1, 11))


def test_bins_unchanged_by_per_cell_scaling_and_log1p():
    rng = np.random.default_rng(0)
    counts = sp.random(30, 200, density=0.3, random_state=1, data_rvs=lambda n: rng.integers(1, 1000, n)).tocsr()
    counts.data = counts.data.astype(np.float64) + rng.random(counts.nnz)  # no ties
    scaled = sp.diags(1e4 / np.asarray(counts.sum(axis=1)).ravel()) @ counts
    scaled = sp.csr_matrix(scaled)
    scaled.data = np.log1p(scaled.data)
    a, _ = bin_cells(counts, n_bins=51)
    b, _ = bin_cells(scaled, n_bins=51)
    assert (a.toarray() == b.toarray()).all()
    assert a.data.min() == 1 and a.data.max() == 50


def test_empty_cell_refused():
    x = sp.csr_matrix(np.array([[1.0, 2.0], [0.0, 0.0]]))
    with pytest.raises(ScbertError, match="no non-zero value"):
        bin_cells(x, n_bins=5)


def test_binned_input_refused():
    rng = np.random.default_rng(0)
    counts = sp.random(20, 300, density=0.5, random_state=0, data_rvs=lambda n: rng.integers(1, 500, n)).tocsr()
    bins, _ = bin_cells(counts, n_bins=51)
    assert looks_binned(bins, 51) and not looks_binned(counts, 51)
    with pytest.raises(ScbertError, match="already bins"):
        bin_cells(bins.astype(np.float32), n_bins=51)
