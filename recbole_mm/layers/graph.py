"""Sparse graph builders for general (user-item graph) multimodal recommenders (specs/models.md §7a, §8).

Reference: Xiangnan He, Kuan Deng, Xiang Wang, Yan Li, Yongdong Zhang, Meng Wang. "LightGCN: Simplifying and
    Powering Graph Convolution Network for Recommendation." SIGIR 2020 (the bipartite adjacency).
Reference: Jinghao Zhang, Yanqiao Zhu, Qiang Liu, Shu Wu, Shuhui Wang, Liang Wang. "Mining Latent Structures
    for Multimedia Recommendation" (LATTICE). ACM MM 2021 (item-item kNN graphs from modality features).
Reference: Xin Zhou, Zhiqi Shen. "A Tale of Two Graphs: Freezing and Denoising Graph Structures for
    Multimodal Recommendation" (FREEDOM). ACM MM 2023 (frozen kNN graph, degree-sensitive edge pruning).
Reference: Weixin Chen, Li Chen, Yongxin Ni, Yuhan Zhao, Fajie Yuan, Yongfeng Zhang. "FMMRec: Fairness-aware
    Multimodal Recommendation." arXiv 2310.17373 (user-user kNN graphs, symmetric normalisation).
Reference: https://github.com/enoche/MMRec and https://github.com/WeixinChen98/FMMRec (behaviour only; no code
    is taken from them).

Every function is pure (no state, no randomness except through an explicit ``generator``) and returns
coalesced ``torch.sparse_coo_tensor`` matrices in float32. ``knn_graph`` never builds an ``n x n`` dense
matrix: it selects neighbours ``chunk_size`` rows at a time, and computes similarities in GEMMs of a fixed
``GEMM_ROWS`` rows (each block computed once), so its memory is ``O((chunk_size + GEMM_ROWS) * n + n * k)``.

Pieces:

- ``knn_graph``: per row, the ``k`` most cosine-similar other rows (LATTICE / FREEDOM item-item graphs,
  FMMRec user-user graphs). Values are the similarities, or 1.0 with ``binary=True``.
- ``symmetrize``: ``max(A, A^T)`` on the stored entries (an undirected kNN graph).
- ``sym_normalize``: ``D^{-1/2} A D^{-1/2}``; ``row_normalize``: ``D^{-1} A`` (D = row sums).
- ``bipartite_adjacency``: LightGCN's ``[[0, R], [R^T, 0]]``, optionally symmetric-normalised.
- ``degree_sensitive_prune``: FREEDOM's edge pruning of the user-item graph.

NOTE: choices that are ours, not taken from the papers:

- Ties in ``knn_graph`` are broken in favour of the lower column index (explicitly, not by ``torch.topk``'s
  internal order), so the result does not depend on ``chunk_size`` or on the topk kernel.
- ``knn_graph`` is bit-identical for every ``chunk_size`` on a given device / BLAS / thread count: a BLAS GEMM
  result depends on the matrix shape (MKL differs at the last bit between M = 1, 2, 7 and 64 rows), so the
  similarities always come from fixed-shape ``GEMM_ROWS``-row GEMMs aligned on global row blocks.
- A row of zeros (zero norm) has no cosine similarity to anything: it gets no neighbours and is nobody's
  neighbour; a row with fewer than ``k`` valid candidates keeps fewer than ``k`` entries.
- ``self_loops=True`` makes a row its own candidate (as in the LATTICE / FREEDOM code, where the row itself
  counts among the ``k``); ``k`` is then clipped to ``n`` instead of ``n - 1``.
- A selected neighbour whose similarity is exactly 0 is stored as an explicit 0 (the kNN structure is kept).
- ``sym_normalize`` / ``row_normalize`` give a zero scale to rows whose degree is ``<= eps`` (0 or negative):
  no inf / NaN, those rows (and, for ``sym_normalize``, their columns) become zero.
- ``degree_sensitive_prune`` de-duplicates the edges first (degrees count distinct edges), keeps
  ``round_half_up((1 - ratio) * E)`` of the E distinct edges (FREEDOM's code truncates with ``int``), and
  samples with Gumbel-top-k keys, which has the distribution of successive draws without replacement
  proportional to the weights (``torch.multinomial(..., replacement=False)``) but no 2^24 category limit.
"""

from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch

GEMM_ROWS = 64  # rows per similarity GEMM in knn_graph (fixed, so results do not depend on chunk_size)

__all__ = [
    "knn_graph",
    "symmetrize",
    "sym_normalize",
    "row_normalize",
    "bipartite_adjacency",
    "degree_sensitive_prune",
]


def _coo(rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor, n_rows: int, n_cols: int) -> torch.Tensor:
    """Coalesced float32 COO matrix ``[n_rows, n_cols]`` (duplicate positions are summed)."""
    indices = torch.stack([rows.long(), cols.long()]) if rows.numel() else torch.zeros(2, 0, dtype=torch.long,
                                                                                       device=rows.device)
    return torch.sparse_coo_tensor(indices, values.float(), (n_rows, n_cols), check_invariants=False).coalesce()


def bipartite_counts(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int) -> torch.Tensor:
    """The ``[n_users, n_items]`` interaction matrix (a repeated pair counts twice), sparse."""
    return _coo(users, items, torch.ones(users.numel(), device=users.device), n_users, n_items)


def _check_square(adj: torch.Tensor) -> torch.Tensor:
    """``adj`` as a coalesced sparse COO matrix; raises unless it is 2-D and square."""
    if adj.dim() != 2 or adj.shape[0] != adj.shape[1]:
        raise ValueError(f"expected a square 2-D matrix, got shape {tuple(adj.shape)}")
    if not adj.is_sparse:
        adj = adj.to_sparse()
    return adj.coalesce()


def _similarity_block(feats: torch.Tensor, block: int) -> torch.Tensor:
    """Rows ``[block * GEMM_ROWS, (block + 1) * GEMM_ROWS)`` of ``feats @ feats.T``, from one GEMM of fixed shape.

    The rows are copied into a fresh zero-padded ``[GEMM_ROWS, d]`` buffer, so every call has the same shape and
    alignment and a row always sits at the same position: BLAS results (which depend on the matrix shape, e.g.
    MKL's M = 1 path) are then the same whatever ``chunk_size`` is.
    """
    start = block * GEMM_ROWS
    rows = feats[start:start + GEMM_ROWS]
    buf = torch.zeros(GEMM_ROWS, feats.shape[1], dtype=feats.dtype, device=feats.device)
    buf[:rows.shape[0]] = rows
    return (buf @ feats.T)[:rows.shape[0]]


def knn_graph(features: torch.Tensor, k: int, chunk_size: int = 1024, self_loops: bool = False,
              binary: bool = False) -> torch.Tensor:
    """Top-``k`` cosine-similarity graph of the rows of ``features`` as a sparse ``[n, n]`` matrix.

    Args:
        features: ``[n, d]`` row vectors (any float dtype; half precision is promoted to float32).
        k: neighbours per row; clipped to ``n - 1`` (``n`` with ``self_loops``) without error.
        chunk_size: rows whose neighbours are selected at a time (against all ``n`` rows).
        self_loops: whether a row may be its own neighbour (it then counts among the ``k``).
        binary: store 1.0 instead of the similarity.

    Returns:
        Coalesced float32 COO ``[n, n]``: row ``i`` holds its (at most) ``k`` neighbours. Ties at the k-th value
        go to the lower column index. Zero rows have no neighbours and are no row's neighbour.
    """
    if features.dim() != 2:
        raise ValueError(f"features must be [n, d], got shape {tuple(features.shape)}")
    if int(k) < 0 or int(chunk_size) < 1:
        raise ValueError(f"need k >= 0 and chunk_size >= 1, got k={k}, chunk_size={chunk_size}")
    n, device = features.shape[0], features.device
    dtype = features.dtype if features.dtype in (torch.float32, torch.float64) else torch.float32
    feats = features.to(dtype)
    norms = feats.norm(dim=1)
    valid = norms > 0
    feats = torch.where(valid[:, None], feats / torch.where(valid, norms, torch.ones_like(norms))[:, None],
                        torch.zeros((), dtype=dtype, device=device))
    k_eff = min(int(k), n if self_loops else n - 1) if n else 0
    rows_out, cols_out, vals_out = [], [], []
    if k_eff > 0:
        neg_inf = torch.tensor(float("-inf"), dtype=dtype, device=device)
        cache: Dict[int, torch.Tensor] = {}
        for start in range(0, n, int(chunk_size)):
            stop = min(start + int(chunk_size), n)
            first, last = start // GEMM_ROWS, (stop - 1) // GEMM_ROWS
            for block in [b for b in cache if b < first]:
                del cache[block]
            for block in range(first, last + 1):
                if block not in cache:
                    cache[block] = _similarity_block(feats, block)
            sim = torch.cat([cache[b] for b in range(first, last + 1)])
            sim = sim[start - first * GEMM_ROWS:stop - first * GEMM_ROWS]  # [c, n]
            # invalid candidates: zero columns, and the row itself unless self_loops
            sim = torch.where(valid[None, :], sim, neg_inf)
            if not self_loops:
                local = torch.arange(stop - start, device=device)
                sim[local, local + start] = neg_inf
            kth = torch.topk(sim, k_eff, dim=1).values[:, -1:]  # [c, 1], the k-th largest value per row
            above = sim > kth
            tied = sim == kth
            # fill the remaining slots with the tied columns in increasing index order
            slots = k_eff - above.sum(1, keepdim=True)
            take = above | (tied & (tied.cumsum(1, dtype=torch.int32) <= slots))
            take &= sim > neg_inf
            take &= valid[start:stop, None]
            r, c = take.nonzero(as_tuple=True)
            rows_out.append(r + start)
            cols_out.append(c)
            vals_out.append(sim[r, c])
    if rows_out:
        rows, cols, vals = torch.cat(rows_out), torch.cat(cols_out), torch.cat(vals_out)
    else:
        rows = cols = torch.zeros(0, dtype=torch.long, device=device)
        vals = torch.zeros(0, dtype=dtype, device=device)
    if binary:
        vals = torch.ones_like(vals)
    return _coo(rows, cols, vals, n, n)


def symmetrize(adj: torch.Tensor) -> torch.Tensor:
    """``max(A, A^T)`` over the stored entries: an entry stored in only one direction keeps its value.

    For non-negative values this equals the dense ``torch.maximum(A, A.T)``.
    """
    adj = _check_square(adj)
    n = adj.shape[0]
    idx, val = adj.indices(), adj.values()
    rows = torch.cat([idx[0], idx[1]])
    cols = torch.cat([idx[1], idx[0]])
    vals = torch.cat([val, val])
    key = rows * n + cols
    uniq, inverse = torch.unique(key, return_inverse=True)
    out = torch.full((uniq.numel(),), float("-inf"), dtype=vals.dtype, device=vals.device)
    out = out.scatter_reduce(0, inverse, vals, reduce="amax", include_self=True)
    return _coo(uniq // n, uniq % n, out, n, n)


def _degree_scale(adj: torch.Tensor, eps: float, power: float) -> torch.Tensor:
    """``deg ** power`` per row (dense ``[n]``), 0 where the row sum is ``<= eps``."""
    n = adj.shape[0]
    deg = torch.zeros(n, dtype=torch.float64, device=adj.device)
    deg.index_add_(0, adj.indices()[0], adj.values().double())
    ok = deg > eps
    return torch.where(ok, torch.where(ok, deg, torch.ones_like(deg)).pow(power), torch.zeros_like(deg))


def sym_normalize(adj: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``D^{-1/2} A D^{-1/2}`` with ``D`` the row sums of ``A``; rows with degree ``<= eps`` get scale 0."""
    adj = _check_square(adj)
    scale = _degree_scale(adj, eps, -0.5)
    r, c = adj.indices()
    vals = adj.values().double() * scale[r] * scale[c]
    return _coo(r, c, vals, *adj.shape)


def row_normalize(adj: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``D^{-1} A`` (each row divided by its sum); rows with sum ``<= eps`` get scale 0. Any 2-D shape."""
    if adj.dim() != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {tuple(adj.shape)}")
    adj = (adj if adj.is_sparse else adj.to_sparse()).coalesce()
    n_rows = adj.shape[0]
    deg = torch.zeros(n_rows, dtype=torch.float64, device=adj.device)
    deg.index_add_(0, adj.indices()[0], adj.values().double())
    ok = deg > eps
    scale = torch.where(ok, 1.0 / torch.where(ok, deg, torch.ones_like(deg)), torch.zeros_like(deg))
    r, c = adj.indices()
    return _coo(r, c, adj.values().double() * scale[r], *adj.shape)


def _unique_edges(users: torch.Tensor, items: torch.Tensor, n_users: int,
                  n_items: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Distinct ``(user, item)`` pairs sorted by user then item; validates shapes and ranges."""
    users, items = users.reshape(-1).long(), items.reshape(-1).long()
    if users.numel() != items.numel():
        raise ValueError(f"users and items differ in length: {users.numel()} vs {items.numel()}")
    if users.numel() and (users.min() < 0 or users.max() >= n_users or items.min() < 0 or items.max() >= n_items):
        raise ValueError(f"interaction ids out of range for n_users={n_users}, n_items={n_items}")
    key = torch.unique(users * n_items + items)
    return key // n_items, key % n_items


def bipartite_adjacency(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int,
                        normalize: bool = True) -> torch.Tensor:
    """LightGCN's ``(n_users + n_items)`` square matrix ``[[0, R], [R^T, 0]]``.

    Args:
        users, items: interaction index tensors of equal length (items 0-based; duplicates counted once).
        n_users, n_items: matrix sizes.
        normalize: apply ``sym_normalize`` (``D^{-1/2} A D^{-1/2}``).

    Returns:
        Coalesced float32 COO ``[n_users + n_items, n_users + n_items]``; item ``i`` is node ``n_users + i``.
    """
    u, i = _unique_edges(users, items, n_users, n_items)
    n = n_users + n_items
    rows = torch.cat([u, i + n_users])
    cols = torch.cat([i + n_users, u])
    adj = _coo(rows, cols, torch.ones(rows.numel(), device=rows.device), n, n)
    return sym_normalize(adj) if normalize else adj


def degree_sensitive_prune(users: torch.Tensor, items: torch.Tensor, n_users: int, n_items: int, ratio: float,
                           generator: Optional[torch.Generator] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """FREEDOM's degree-sensitive edge pruning: keep ``(1 - ratio)`` of the distinct user-item edges.

    Edges are drawn without replacement with probability proportional to ``1 / sqrt(deg_u * deg_i)``, so edges
    between low-degree nodes survive more often.

    Args:
        users, items: interaction index tensors (duplicates are merged first).
        n_users, n_items: id ranges (for validation).
        ratio: fraction of edges to drop, in ``[0, 1]``.
        generator: random source (its device is used for the draw); same generator state -> same result.

    Returns:
        ``(users, items)`` of the ``round_half_up((1 - ratio) * E)`` kept edges, sorted by user then item.
    """
    if not 0.0 <= float(ratio) <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    u, i = _unique_edges(users, items, n_users, n_items)
    n_edges = u.numel()
    n_keep = min(n_edges, int(math.floor((1.0 - float(ratio)) * n_edges + 0.5)))
    if n_keep == n_edges:
        return u, i
    deg_u = torch.bincount(u, minlength=n_users).double()
    deg_i = torch.bincount(i, minlength=n_items).double()
    log_w = -0.5 * (deg_u[u].log() + deg_i[i].log())
    draw_device = generator.device if generator is not None else u.device
    uniform = torch.rand(n_edges, generator=generator, dtype=torch.float64, device=draw_device).to(u.device)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float64).tiny)))
    keep = torch.topk(log_w + gumbel, n_keep).indices.sort().values
    return u[keep], i[keep]
