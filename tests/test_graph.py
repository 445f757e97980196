"""Sparse graph builders (recbole_mm.layers.graph) against independent dense references built in the test."""

import math

import pytest
import torch

from recbole_mm.layers.graph import (
    bipartite_adjacency,
    degree_sensitive_prune,
    knn_graph,
    row_normalize,
    sym_normalize,
    symmetrize,
)

torch.set_num_threads(1)

N, D, K = 37, 5, 4


def random_features(seed=0, n=N, d=D):
    """``[n, d]`` float64 features whose per-row k-th / (k+1)-th similarities are well separated (no ties)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=torch.float64)


def dense_cosine(x):
    """Dense float64 cosine similarity ``x x^T / (|x_a| |x_b|)``, NaN wherever a row is zero."""
    x = x.double()
    norms = x.norm(dim=1)
    return (x @ x.T) / (norms[:, None] * norms[None, :])  # 0 / 0 = NaN for zero rows


def dense_knn(x, k, self_loops=False):
    """``{row: {col: sim}}`` of the top-k valid candidates per row, by sorting each row in Python."""
    sim = dense_cosine(x)
    n = x.shape[0]
    result = {}
    for a in range(n):
        cands = [(float(sim[a, b]), b) for b in range(n)
                 if not math.isnan(float(sim[a, b])) and (self_loops or b != a)]
        cands.sort(key=lambda t: (-t[0], t[1]))
        result[a] = {b: s for s, b in cands[:k]}
    return result


def as_dict(adj):
    """``{row: {col: value}}`` for every row of a sparse matrix (empty rows included)."""
    adj = adj.coalesce()
    out = {r: {} for r in range(adj.shape[0])}
    for (r, c), v in zip(adj.indices().T.tolist(), adj.values().tolist()):
        out[r][c] = v
    return out


def assert_knn_matches(adj, ref, atol=1e-6):
    got = as_dict(adj)
    assert set(got) == set(ref)
    for row, nbrs in ref.items():
        assert set(got[row]) == set(nbrs), f"row {row}: {sorted(got[row])} != {sorted(nbrs)}"
        for col, val in nbrs.items():
            assert abs(got[row][col] - val) <= atol, (row, col, got[row][col], val)


def test_reference_case_has_no_ties():
    """The fixture is valid: every row's k-th and (k+1)-th similarities are clearly apart."""
    sim = dense_cosine(random_features())
    sim.fill_diagonal_(float("-inf"))
    top = torch.topk(sim, K + 1, dim=1).values
    assert float((top[:, K - 1] - top[:, K]).min()) > 1e-5


@pytest.mark.parametrize("chunk", [1, 7, 1000])
def test_knn_matches_dense_topk(chunk):
    x = random_features()
    adj = knn_graph(x, K, chunk_size=chunk)
    assert adj.is_sparse and adj.is_coalesced() and adj.dtype == torch.float32 and adj.shape == (N, N)
    assert adj.values().numel() == N * K
    assert not bool(torch.isnan(adj.values()).any())
    assert_knn_matches(adj, dense_knn(x, K))


def test_knn_float32_input_matches_dense():
    x = random_features(seed=1)
    assert_knn_matches(knn_graph(x.float(), K, chunk_size=5), dense_knn(x, K), atol=1e-5)


@pytest.mark.parametrize("binary", [False, True])
def test_knn_chunked_equals_unchunked_exactly(binary):
    x = random_features(seed=2).float()
    full = knn_graph(x, K, chunk_size=N, binary=binary)
    for chunk in (1, 7, 1000):
        part = knn_graph(x, K, chunk_size=chunk, binary=binary)
        assert torch.equal(part.indices(), full.indices())
        assert torch.equal(part.values(), full.values())


def test_knn_chunk_independent_across_gemm_blocks():
    """n = 150 spans three GEMM blocks and d = 384 is wide enough for BLAS results to depend on the row count
    (a plain ``features[chunk] @ features.T`` differs at the last bit between chunk sizes here)."""
    g = torch.Generator().manual_seed(14)
    x = torch.randn(150, 384, generator=g)
    full = knn_graph(x, 10, chunk_size=150)
    for chunk in (1, 7, 64, 100):
        part = knn_graph(x, 10, chunk_size=chunk)
        assert torch.equal(part.indices(), full.indices()) and torch.equal(part.values(), full.values()), chunk
    ref = dense_knn(x.double(), 10)
    got = as_dict(full)
    close = sum(set(got[r]) == set(ref[r]) for r in range(150))
    assert close >= 148  # float32 vs float64 may swap a near-tie at the boundary
    for r in range(150):
        for c in set(got[r]) & set(ref[r]):
            assert abs(got[r][c] - ref[r][c]) < 1e-5


def test_knn_binary_has_same_structure_and_unit_values():
    x = random_features(seed=3)
    adj = knn_graph(x, K, chunk_size=7, binary=True)
    ref = dense_knn(x, K)
    assert_knn_matches(adj, {r: {c: 1.0 for c in nbrs} for r, nbrs in ref.items()})


def test_knn_self_loops_count_among_k():
    x = random_features(seed=4)
    adj = knn_graph(x, K, chunk_size=7, self_loops=True)
    got = as_dict(adj)
    assert all(r in got[r] and abs(got[r][r] - 1.0) < 1e-6 for r in range(N))
    assert_knn_matches(adj, dense_knn(x, K, self_loops=True))


def test_knn_zero_rows_have_no_neighbours_and_no_nan():
    x = random_features(seed=5)
    zero = [3, 10, 36]
    x[zero] = 0.0
    for chunk in (1, 7, 1000):
        adj = knn_graph(x, K, chunk_size=chunk)
        vals = adj.values()
        assert bool(torch.isfinite(vals).all())
        rows, cols = adj.indices()
        for z in zero:
            assert not bool((rows == z).any()), f"zero row {z} has neighbours"
            assert not bool((cols == z).any()), f"zero row {z} is a neighbour"
        ref = dense_knn(x, K)  # NaN similarities (zero rows) are excluded by the reference
        assert all(len(ref[z]) == 0 for z in zero)
        assert_knn_matches(adj, ref)


def test_knn_all_zero_features_give_empty_graph():
    adj = knn_graph(torch.zeros(6, 3), 2, chunk_size=4)
    assert adj.shape == (6, 6) and adj.values().numel() == 0


@pytest.mark.parametrize("k", [5, 6, 50])
def test_knn_k_clipped_to_n_minus_one(k):
    n = 6
    x = random_features(seed=6, n=n, d=3)
    adj = knn_graph(x, k, chunk_size=4)
    got = as_dict(adj)
    assert all(set(got[r]) == set(range(n)) - {r} for r in range(n))
    assert_knn_matches(adj, dense_knn(x, n))  # the reference keeps every other row
    loops = as_dict(knn_graph(x, k, chunk_size=4, self_loops=True))
    assert all(len(loops[r]) == min(k, n) and r in loops[r] for r in range(n))


def test_knn_k_zero_and_tiny_inputs():
    assert knn_graph(random_features(n=5), 0).values().numel() == 0
    assert knn_graph(random_features(n=1), 3).values().numel() == 0
    assert knn_graph(torch.zeros(0, 4), 3).shape == (0, 0)


def test_knn_ties_go_to_lower_index():
    """Rows 1..4 are copies of row 0, so each row sees four candidates at similarity 1."""
    base = torch.tensor([[1.0, 0.0, 0.0]])
    x = torch.cat([base.repeat(5, 1), torch.tensor([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])])
    for chunk in (1, 3, 100):
        got = as_dict(knn_graph(x, 2, chunk_size=chunk))
        assert set(got[0]) == {1, 2}
        assert set(got[1]) == {0, 2}
        assert set(got[4]) == {0, 1}
        # row 5 ties at 0 with every other row: the two lowest indices
        assert set(got[5]) == {0, 1}
        assert got[5] == {0: 0.0, 1: 0.0}


def test_knn_rejects_bad_arguments():
    with pytest.raises(ValueError):
        knn_graph(torch.zeros(4), 2)
    with pytest.raises(ValueError):
        knn_graph(torch.ones(4, 2), -1)
    with pytest.raises(ValueError):
        knn_graph(torch.ones(4, 2), 2, chunk_size=0)


def random_sparse(n, seed, density=0.2, zero_rows=()):
    """A non-negative random dense matrix with the given rows (and nothing else) zeroed, plus its sparse form."""
    g = torch.Generator().manual_seed(seed)
    dense = torch.rand(n, n, generator=g, dtype=torch.float64)
    dense = dense * (torch.rand(n, n, generator=g) < density)
    for r in zero_rows:
        dense[r] = 0.0
    return dense, dense.float().to_sparse()


def test_symmetrize_equals_dense_max():
    dense, sparse = random_sparse(N, seed=7)
    out = symmetrize(sparse)
    assert out.is_sparse and out.is_coalesced()
    assert torch.allclose(out.to_dense().double(), torch.maximum(dense, dense.T), atol=1e-7)


def test_symmetrize_of_knn_graph_is_symmetric_union():
    x = random_features(seed=8).abs()  # non-negative similarities
    adj = knn_graph(x, K, chunk_size=7)
    dense = adj.to_dense()
    out = symmetrize(adj).to_dense()
    assert torch.equal(out, out.T)
    assert torch.equal(out, torch.maximum(dense, dense.T))


def test_symmetrize_keeps_one_sided_negative_entry():
    adj = torch.sparse_coo_tensor(torch.tensor([[0, 1], [1, 2]]), torch.tensor([-0.5, 0.25]), (3, 3),
                                  check_invariants=True)
    out = symmetrize(adj).to_dense()
    expect = torch.tensor([[0.0, -0.5, 0.0], [-0.5, 0.0, 0.25], [0.0, 0.25, 0.0]])
    assert torch.equal(out, expect)


def test_sym_normalize_equals_dense_formula_with_zero_degree_row():
    dense, sparse = random_sparse(N, seed=9, density=0.3, zero_rows=(0, 5))
    dense = dense + dense.T  # symmetric; rows 0 and 5 keep degree > 0 only through the transpose...
    dense[[0, 5]] = 0.0
    dense[:, [0, 5]] = 0.0  # ...so zero them on both sides: degree 0
    sparse = dense.float().to_sparse()
    out = sym_normalize(sparse)
    assert out.is_sparse and out.is_coalesced() and out.dtype == torch.float32
    expect = torch.zeros_like(dense)
    deg = [float(dense[r].sum()) for r in range(N)]
    assert deg[0] == 0.0 and deg[5] == 0.0
    for r in range(N):
        for c in range(N):
            if deg[r] > 0 and deg[c] > 0:
                expect[r, c] = dense[r, c] / math.sqrt(deg[r] * deg[c])
    got = out.to_dense().double()
    assert bool(torch.isfinite(got).all())
    assert torch.allclose(got, expect, atol=1e-6)
    assert float(got[0].abs().sum()) == 0.0 and float(got[:, 5].abs().sum()) == 0.0


def test_sym_normalize_non_symmetric_uses_row_sums_on_both_sides():
    dense, sparse = random_sparse(12, seed=10, density=0.5, zero_rows=(3,))
    deg = dense.sum(1)
    inv = torch.tensor([1.0 / math.sqrt(float(v)) if float(v) > 0 else 0.0 for v in deg], dtype=torch.float64)
    expect = inv[:, None] * dense * inv[None, :]
    assert torch.allclose(sym_normalize(sparse).to_dense().double(), expect, atol=1e-6)


def test_row_normalize_equals_dense_formula():
    dense, sparse = random_sparse(N, seed=11, density=0.3, zero_rows=(2, 20))
    out = row_normalize(sparse)
    expect = torch.zeros_like(dense)
    for r in range(N):
        s = float(dense[r].sum())
        if s > 0:
            expect[r] = dense[r] / s
    got = out.to_dense().double()
    assert bool(torch.isfinite(got).all())
    assert torch.allclose(got, expect, atol=1e-6)
    sums = got.sum(1)
    assert torch.allclose(sums[[r for r in range(N) if r not in (2, 20)]], torch.ones(N - 2, dtype=torch.float64),
                          atol=1e-6)
    assert float(sums[2]) == 0.0 and float(sums[20]) == 0.0


def test_row_normalize_rectangular():
    dense = torch.tensor([[1.0, 3.0, 0.0], [0.0, 0.0, 0.0]])
    assert torch.allclose(row_normalize(dense.to_sparse()).to_dense(), torch.tensor([[0.25, 0.75, 0.0], [0, 0, 0]]))


INTER_USERS = [0, 0, 1, 2, 2, 2, 4, 0]
INTER_ITEMS = [1, 3, 1, 0, 2, 3, 4, 1]  # (0, 1) appears twice; user 3 has no interaction


def dense_block(users, items, n_users, n_items):
    n = n_users + n_items
    a = torch.zeros(n, n, dtype=torch.float64)
    for u, i in zip(users, items):
        a[u, n_users + i] = 1.0
        a[n_users + i, u] = 1.0
    return a


def test_bipartite_adjacency_equals_dense_block_matrix():
    n_users, n_items = 5, 6
    u, i = torch.tensor(INTER_USERS), torch.tensor(INTER_ITEMS)
    raw = bipartite_adjacency(u, i, n_users, n_items, normalize=False)
    expect = dense_block(INTER_USERS, INTER_ITEMS, n_users, n_items)
    assert raw.is_sparse and raw.is_coalesced() and raw.shape == (11, 11)
    assert torch.equal(raw.to_dense().double(), expect)
    assert raw.values().numel() == 2 * 7  # 7 distinct interactions, both directions


def test_bipartite_adjacency_normalized():
    n_users, n_items = 5, 6
    norm = bipartite_adjacency(torch.tensor(INTER_USERS), torch.tensor(INTER_ITEMS), n_users, n_items)
    a = dense_block(INTER_USERS, INTER_ITEMS, n_users, n_items)
    deg = a.sum(1)
    expect = torch.zeros_like(a)
    for r in range(a.shape[0]):
        for c in range(a.shape[0]):
            if a[r, c]:
                expect[r, c] = 1.0 / math.sqrt(float(deg[r]) * float(deg[c]))
    got = norm.to_dense().double()
    assert torch.allclose(got, expect, atol=1e-7)
    assert float(got[3].abs().sum()) == 0.0  # user 3: degree 0, no NaN
    assert float(got[n_users + 5].abs().sum()) == 0.0  # item 5: never interacted
    assert abs(float(got[0, n_users + 1]) - 1.0 / math.sqrt(2 * 2)) < 1e-7  # duplicate counted once


def test_bipartite_adjacency_rejects_out_of_range():
    with pytest.raises(ValueError):
        bipartite_adjacency(torch.tensor([0, 5]), torch.tensor([0, 1]), 5, 3)
    with pytest.raises(ValueError):
        bipartite_adjacency(torch.tensor([0]), torch.tensor([3]), 5, 3)


def random_edges(seed, n_users=30, n_items=25, n_edges=200):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(n_users, (n_edges,), generator=g), torch.randint(n_items, (n_edges,), generator=g)


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.3, 0.55, 1.0])
def test_prune_keeps_rounded_count_of_distinct_original_edges(ratio):
    u, i = random_edges(seed=12)
    distinct = set(zip(u.tolist(), i.tolist()))
    assert len(distinct) < u.numel()  # the fixture has duplicates
    ku, ki = degree_sensitive_prune(u, i, 30, 25, ratio, generator=torch.Generator().manual_seed(0))
    kept = list(zip(ku.tolist(), ki.tolist()))
    assert len(kept) == round((1 - ratio) * len(distinct))
    assert len(set(kept)) == len(kept)
    assert set(kept) <= distinct


def test_prune_rounds_half_up():
    """5 distinct edges, ratio 0.5: 2.5 edges -> 3 kept (Python's round() would give 2)."""
    u, i = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([0, 0, 1, 1, 2])
    ku, _ = degree_sensitive_prune(u, i, 5, 3, 0.5, generator=torch.Generator().manual_seed(0))
    assert ku.numel() == 3


def test_prune_is_reproducible_with_seeded_generator():
    u, i = random_edges(seed=13)
    a = degree_sensitive_prune(u, i, 30, 25, 0.4, generator=torch.Generator().manual_seed(7))
    b = degree_sensitive_prune(u, i, 30, 25, 0.4, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    others = [degree_sensitive_prune(u, i, 30, 25, 0.4, generator=torch.Generator().manual_seed(s)) for s in (8, 9)]
    assert any(not (torch.equal(a[0], o[0]) and torch.equal(a[1], o[1])) for o in others)


def test_prune_prefers_low_degree_edges():
    """Edge (0, 0) joins two degree-1 nodes; users 1..5 x items 1..5 form a block of degree-5 nodes."""
    users = [0] + [u for u in range(1, 6) for _ in range(1, 6)]
    items = [0] + [i for _ in range(1, 6) for i in range(1, 6)]
    u, i = torch.tensor(users), torch.tensor(items)
    g = torch.Generator().manual_seed(1)
    draws = 300
    lone, block = 0, 0
    for _ in range(draws):
        ku, ki = degree_sensitive_prune(u, i, 6, 6, 0.5, generator=g)
        lone_kept = bool(((ku == 0) & (ki == 0)).any())
        lone += lone_kept
        block += ku.numel() - int(lone_kept)
    lone_rate = lone / draws
    block_rate = block / (draws * 25)
    # weights 1 vs 1/5; uniform sampling would give 13 / 26 = 0.5 for both
    assert lone_rate > 0.85, lone_rate
    assert block_rate < 0.5, block_rate


def test_prune_probability_is_inverse_sqrt_degree_product():
    """Keep 1 of 4 edges: the lone edge has weight 1, each of the three star edges 1 / sqrt(3 * 1).

    P(lone kept) = 1 / (1 + 3 / sqrt(3)) = 0.366; uniform would give 0.25, 1 / (deg_u deg_i) would give 0.5.
    """
    u, i = torch.tensor([0, 1, 1, 1]), torch.tensor([0, 1, 2, 3])
    g = torch.Generator().manual_seed(2)
    draws = 2000
    hits = 0
    for _ in range(draws):
        ku, ki = degree_sensitive_prune(u, i, 2, 4, 0.75, generator=g)
        assert ku.numel() == 1
        hits += int(ku[0]) == 0
    expect = 1.0 / (1.0 + 3.0 / math.sqrt(3.0))
    assert abs(hits / draws - expect) < 0.04, hits / draws


def test_prune_rejects_bad_ratio():
    with pytest.raises(ValueError):
        degree_sensitive_prune(torch.tensor([0]), torch.tensor([0]), 1, 1, 1.5)
