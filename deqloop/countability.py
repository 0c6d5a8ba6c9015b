"""Countability of fixed points: how many distinct states a set of fixed points holds, and how
many inputs share each (single-linkage clusters at a relative distance), for the diagnose axis
input-dependence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy.sparse.csgraph import connected_components
from torch import Tensor


@dataclass(frozen=True)
class Countability:
    """Fixed points clustered by relative distance (single linkage), against the inputs they came from.

    labels:        (N,) cluster of each point, 0..n_distinct-1 in order of first appearance.
    n_points, n_inputs, n_distinct: points clustered, distinct inputs among them, clusters.
    cluster_sizes: points per cluster; inputs_per_cluster: distinct inputs per cluster.
    n_shared:      clusters reached from two or more inputs.
    tol, scale:    points closer than tol * scale are joined; scale is the median point norm.
    max_within:    largest distance between a point and its cluster's first point, over scale.
    min_between:   smallest distance between two clusters' first points, over scale (inf if < 2).
    """

    labels: Tensor
    n_points: int
    n_inputs: int
    n_distinct: int
    cluster_sizes: list[int]
    inputs_per_cluster: list[int]
    n_shared: int
    tol: float
    scale: float
    max_within: float
    min_between: float


def _pairwise(points: Tensor, chunk: int = 1024) -> Tensor:
    """(N, D) -> (N, N) Euclidean distances, a block of rows at a time (exact differences, no
    ||a||^2 - 2ab + ||b||^2 cancellation)."""
    rows = [torch.cdist(points[i: i + chunk], points, compute_mode="donot_use_mm_for_euclid_dist")
            for i in range(0, len(points), chunk)]
    return torch.cat(rows) if rows else points.new_zeros(0, 0)


def countability(points: Tensor, inputs: Tensor | None = None, *, tol: float = 1e-2) -> Countability:
    """Cluster fixed points (N, ...) and count distinct ones; `inputs` (N,) names the input of each.

    Two points are joined when their distance is below tol times the median norm of the points;
    clusters are the connected components of that graph, so the count does not depend on order.
    """
    return count_at(points, inputs, tols=(tol,))[0]


def count_at(points: Tensor, inputs: Tensor | None = None, *, tols=(1e-2,)) -> list[Countability]:
    """`countability` at several tolerances, from one matrix of pairwise distances."""
    n = points.shape[0]
    inputs = torch.arange(n) if inputs is None else inputs.reshape(-1).cpu()
    if n == 0:
        return [Countability(torch.zeros(0, dtype=torch.long), 0, 0, 0, [], [], 0, tol, 0.0, 0.0, math.inf)
                for tol in tols]
    flat = points.reshape(n, -1).double()
    scale = float(flat.norm(dim=1).median())
    scale = scale if scale > 0 else 1.0
    dist = (_pairwise(flat) / scale).cpu()  # (N, N)
    out = []
    for tol in tols:
        _, raw = connected_components((dist < tol).numpy(), directed=False)
        # Relabel in order of first appearance, so labels are reproducible and readable.
        order: dict[int, int] = {}
        labels = torch.tensor([order.setdefault(int(c), len(order)) for c in raw], dtype=torch.long)
        k = len(order)
        first = torch.from_numpy(np.unique(labels.numpy(), return_index=True)[1])  # (k,) first point of each
        sizes = torch.bincount(labels, minlength=k).tolist()
        per_cluster = [len(set(inputs[labels == c].tolist())) for c in range(k)]
        within = float(dist[first[labels], torch.arange(n)].max())
        between = dist[first][:, first] + torch.diag(torch.full((k,), math.inf, dtype=dist.dtype))
        out.append(Countability(
            labels=labels, n_points=n, n_inputs=len(set(inputs.tolist())), n_distinct=k, cluster_sizes=sizes,
            inputs_per_cluster=per_cluster, n_shared=sum(p > 1 for p in per_cluster), tol=tol, scale=scale,
            max_within=within, min_between=float(between.min()) if k > 1 else math.inf,
        ))
    return out
