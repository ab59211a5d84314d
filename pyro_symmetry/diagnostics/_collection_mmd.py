"""MMD two-sample test between two checkpoint collections, streamed.

Three estimators of the same statistic as :func:`ps.diagnostics.mmd
<pyro_symmetry.diagnostics.mmd>` (unbiased ``MMD^2``, Gaussian / Laplace kernels on a
geometric bandwidth grid around the median distance, MMDAgg-style permutation test;
Gretton et al., JMLR 2012; Schrab et al., JMLR 2023), chosen by size:

* ``"memory"``: the pooled draws ``(n + m, D)`` fit in ``max_bytes``: they are loaded and
  passed to ``ps.diagnostics.mmd`` itself (identical results);
* ``"streamed"``: the ``(n + m)^2`` distance matrices fit: they are accumulated exactly over
  blocks of weights (each pass reads every memory-mapped file once; squared L2 distances and
  L1 distances are sums over coordinates), then the kernel statistics and the permutation
  test follow from them as in ``ps.diagnostics.mmd``;
* ``"random_features"``: beyond that, random Fourier features (Rahimi and Recht, NeurIPS
  2007): ``k(x, y) ~ (1/F) sum_f 2 cos(w_f.x + b_f) cos(w_f.y + b_f)`` with ``w_f`` Gaussian
  (Gaussian kernel) or Cauchy (Laplace kernel, a product of 1-d Laplace kernels); the
  unbiased statistic of the feature kernel costs ``O((n + m) F)`` and its permutation test
  ``O(B (n + m) F)``. ``stderr`` is the Monte Carlo standard error over the features (the
  statistic is a mean of ``F`` per-feature unbiased estimates whose expectation is the exact
  ``MMD^2``); the bandwidth grid uses the median distance of a random subsample.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch

from .._validation import check_int, check_real
from ..collections import Collection
from ..groups import SpecError
from ._collection_data import column_passes, usable_indices

__all__ = ["CollectionMMD", "mmd"]

KINDS = ("gaussian", "laplace")


class CollectionMMD(NamedTuple):
    """Result of :func:`mmd`: the fields of ``ps.diagnostics.MMDResult`` and the estimator.

    Attributes
    ----------
    mmd2, p_value, mmd2_grid, kernels, bandwidths, p_values, num_permutations, canonical
        As in :class:`~pyro_symmetry.diagnostics.MMDResult`.
    method : str
        ``"memory"``, ``"streamed"`` or ``"random_features"``.
    stderr : Tensor ``(K,)`` or None
        Standard error of ``mmd2_grid`` over the random features (``None`` when exact).
    num_features : int or None
    """

    mmd2: float
    p_value: float
    mmd2_grid: torch.Tensor
    kernels: tuple[str, ...]
    bandwidths: torch.Tensor
    p_values: torch.Tensor
    num_permutations: int
    canonical: str | None
    method: str
    stderr: torch.Tensor | None = None
    num_features: int | None = None


def _labels(n: int, m: int, num_permutations: int, seed: int) -> torch.Tensor:
    """``(1 + B, n + m)``: the observed labels, then ``B`` seeded relabellings (as ``ps.diagnostics.mmd``)."""
    gen = torch.Generator().manual_seed(seed)
    perms = torch.rand((num_permutations, n + m), generator=gen).argsort(-1) < n
    return torch.cat([(torch.arange(n + m) < n)[None], perms])


def _median(dist: torch.Tensor) -> torch.Tensor:
    """Median distance of distinct pairs (of the positive ones if most coincide; 1 if all do)."""
    i, j = torch.triu_indices(dist.shape[0], dist.shape[0], offset=1)
    pairs = dist[i, j]
    med = pairs.median()
    if med > 0:
        return med
    positive = pairs[pairs > 0]
    return positive.median() if positive.numel() else torch.ones((), dtype=dist.dtype)


def _grid(med: torch.Tensor, bandwidths: Any, num: int, ratio: float) -> torch.Tensor:
    if bandwidths is not None:
        grid = torch.as_tensor(bandwidths, dtype=torch.float64).reshape(-1)
        if not grid.numel() or not bool(((grid > 0) & torch.isfinite(grid)).all()):
            raise ValueError(f"bandwidths must be positive and finite (at least one), got {grid.tolist()}")
        return grid
    half = num // 2
    return med * ratio ** torch.arange(-half, num - half, dtype=torch.float64)


def _stats_exact(dist: torch.Tensor, kind: str, grid: torch.Tensor, labels: torch.Tensor, n: int, m: int):
    """Unbiased ``MMD^2`` ``(1 + B, K)`` of every labelling from a distance matrix."""
    out = []
    a = labels.to(dist.dtype)
    for bw in grid:
        scaled = dist / bw
        k0 = torch.exp(-(scaled**2)) if kind == "gaussian" else torch.exp(-scaled)
        k0.fill_diagonal_(0.0)
        ka = a @ k0
        kb = k0.sum(0, keepdim=True) - ka
        xx, xy, yy = (ka * a).sum(-1), (ka * (1.0 - a)).sum(-1), (kb * (1.0 - a)).sum(-1)
        out.append(xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m))
    return torch.stack(out, -1)


def _p_values(table: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Per-kernel p-values of the observed row and the min-p aggregated p-value (ties within 100 ulps)."""
    if not bool(torch.isfinite(table).all()):
        raise ValueError("the MMD statistics are not finite; check the checkpoints and bandwidths")
    tol = 100 * torch.finfo(table.dtype).eps * table.abs()
    counts = (table[None, :, :] >= (table - tol)[:, None, :]).sum(1)
    smallest = counts.min(-1).values
    return counts[0].to(table.dtype) / table.shape[0], float((smallest <= smallest[0]).sum()) / table.shape[0]


def _check_pair(x: Collection, y: Collection, sites: Sequence[str] | None) -> list[str]:
    if not (isinstance(x, Collection) and isinstance(y, Collection)):
        raise TypeError(f"x and y must be Collections, got {type(x).__name__} and {type(y).__name__}")
    sx, sy = x.signature, y.signature
    floating = [s for s in sx.shapes if sx.dtypes[s].is_floating_point]
    sites = floating if sites is None else list(sites)
    for s in sites:
        if s not in floating:
            raise SpecError(f"site {s!r} is not a floating-point site of x (have {floating})")
        if sy.shapes.get(s) != sx.shapes[s]:
            raise SpecError(f"site {s!r} has shape {sy.shapes.get(s)} in y but {sx.shapes[s]} in x")
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"MMD needs at least 2 checkpoints on each side, got {len(x)} and {len(y)}")
    return sites


def _in_memory(x: Collection, y: Collection, sites: list[str], kw: dict) -> CollectionMMD:
    from .kernel_mmd import mmd as exact

    def stack(c: Collection) -> dict[str, torch.Tensor]:
        cks = [c.load(i) for i in range(len(c))]
        if any(ck is None for ck in cks):
            raise ValueError(f"bad checkpoints in the collection: {c.errors}")
        return {s: torch.stack([ck.params[s] for ck in cks]) for s in sites}

    res = exact(stack(x), stack(y), **kw)
    return CollectionMMD(*res, method="memory")


def _accumulate(acc: dict[str, torch.Tensor], z: torch.Tensor) -> None:
    """Add one block of coordinates ``(N, b)`` to squared-L2 / L1 distance sums ``(N, N)``."""
    zb = z - z.mean(0)  # distances do not depend on a shift; centring avoids cancellation
    s = zb.abs().max()
    if not s > 0:
        return
    zb /= s
    for k, total in acc.items():
        d = torch.cdist(zb, zb, p=2.0 if k == "gaussian" else 1.0)
        total += d.square() * s**2 if k == "gaussian" else d * s


def _finish(acc: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.sqrt() if k == "gaussian" else v for k, v in acc.items()}


def _seed_of(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(":".join(map(str, parts)).encode()).digest()[:8], "little") >> 1


def _directions(kind: str, seed: int, start: int, stop: int, features: int, chunk: int = 256) -> torch.Tensor:
    """``(stop - start, F)`` spectral draws of flat coordinates ``[start, stop)``: N(0, 2) rows for
    the Gaussian kernel ``exp(-d^2 / l^2)``, standard Cauchy for the Laplace one (divided by ``l``
    later); drawn per fixed chunk of coordinates, so independent of how passes split them."""
    out = []
    for c in range(start // chunk, (stop - 1) // chunk + 1):
        gen = torch.Generator().manual_seed(_seed_of(seed, kind, c))
        if kind == "gaussian":
            w = torch.randn((chunk, features), generator=gen, dtype=torch.float64) * math.sqrt(2.0)
        else:
            u = torch.rand((chunk, features), generator=gen, dtype=torch.float64)
            w = torch.tan(math.pi * (u - 0.5))
        a, b = max(start, c * chunk) - c * chunk, min(stop, (c + 1) * chunk) - c * chunk
        out.append(w[a:b])
    return torch.cat(out)


def _rff_stats(proj: torch.Tensor, bias: torch.Tensor, grid: torch.Tensor, labels: torch.Tensor, n: int, m: int):
    """``(table (1 + B, K), stderr (K,))`` of the feature-kernel unbiased ``MMD^2``.

    With ``phi_f = sqrt(2) cos(w_f.x / l + b_f)`` (so ``E phi_f(x) phi_f(y) = k(x, y)``), the
    statistic is the mean over features of the per-feature unbiased estimates
    ``(Sx_f^2 - Qx_f) / (n (n - 1)) + (Sy_f^2 - Qy_f) / (m (m - 1)) - 2 Sx_f Sy_f / (n m)``
    (``S``: sums of ``phi_f`` over a sample, ``Q``: sums of ``phi_f^2``); ``stderr`` is their
    standard deviation over features of the observed labelling, over ``sqrt(F)``.
    """
    a = labels.to(torch.float64)
    rows, errs = [], []
    num_f = proj.shape[1]
    cx, cy, cxy = 1.0 / (n * (n - 1)), 1.0 / (m * (m - 1)), 2.0 / (n * m)
    for bw in grid:
        phi = math.sqrt(2.0) * torch.cos(proj / bw + bias)  # (N, F)
        sx = a @ phi  # (1 + B, F)
        sy = phi.sum(0) - sx
        sq = phi.square()
        norms = sq.sum(1)  # (N,)
        qx = a @ norms
        qy = norms.sum() - qx
        row = (cx * (sx.square().sum(-1) - qx) + cy * (sy.square().sum(-1) - qy) - cxy * (sx * sy).sum(-1)) / num_f
        rows.append(row)
        qx0 = a[0] @ sq  # (F,): per-feature sums of squares of the observed labelling
        per = cx * (sx[0].square() - qx0) + cy * (sy[0].square() - (sq.sum(0) - qx0)) - cxy * sx[0] * sy[0]
        errs.append(per.std() / math.sqrt(num_f))
    return torch.stack(rows, -1), torch.stack(errs)


def _streamed(x, y, sites, kinds, grid_args, labels, width, bar) -> tuple[torch.Tensor, list, list]:
    n, m = len(x), len(y)
    acc = {k: torch.zeros(n + m, n + m, dtype=torch.float64) for k in kinds}
    for _, z in column_passes([x, y], sites, width, lambda p, t: bar.update(1)):
        _accumulate(acc, torch.from_numpy(z))
    tables, names, bws = [], [], []
    for k, dist in _finish(acc).items():
        grid = _grid(_median(dist), *grid_args)
        tables.append(_stats_exact(dist, k, grid, labels, n, m))
        names += [k] * len(grid)
        bws.append(grid)
    return torch.cat(tables, -1), names, bws


def _random_features(x, y, sites, kinds, grid_args, labels, width, bar, seed, features, subsample):
    n, m = len(x), len(y)
    total = n + m
    sub = torch.randperm(total, generator=torch.Generator().manual_seed(_seed_of(seed, "subsample")))[:subsample]
    sub_acc = {k: torch.zeros(len(sub), len(sub), dtype=torch.float64) for k in kinds}
    proj = {k: torch.zeros(total, features, dtype=torch.float64) for k in kinds}
    sig = x.signature
    offsets, off = {}, 0
    for s in sites:
        offsets[s] = off
        off += math.prod(sig.shapes[s])
    for segments, z in column_passes([x, y], sites, width, lambda p, t: bar.update(1)):
        zt = torch.from_numpy(z)
        col = 0
        for s, a, b in segments:
            block = zt[:, col : col + b - a]
            for k in kinds:
                proj[k] += block @ _directions(k, seed, offsets[s] + a, offsets[s] + b, features)
            col += b - a
        _accumulate(sub_acc, zt[sub])
    tables, names, bws, errs = [], [], [], []
    for k, dist in _finish(sub_acc).items():
        grid = _grid(_median(dist), *grid_args)
        gen = torch.Generator().manual_seed(_seed_of(seed, "bias", k))
        bias = 2 * math.pi * torch.rand(features, generator=gen, dtype=torch.float64)
        table, err = _rff_stats(proj[k], bias, grid, labels, n, m)
        tables.append(table)
        errs.append(err)
        names += [k] * len(grid)
        bws.append(grid)
    return torch.cat(tables, -1), names, bws, torch.cat(errs)


def mmd(
    x: Collection,
    y: Collection,
    *,
    kernel: str = "gaussian",
    bandwidths: Sequence[float] | torch.Tensor | None = None,
    num_bandwidths: int = 5,
    bandwidth_ratio: float = 2.0,
    num_permutations: int = 500,
    seed: int = 0,
    sites: Sequence[str] | None = None,
    method: str = "auto",
    max_bytes: int = 512 << 20,
    num_features: int = 1024,
    median_subsample: int = 1000,
    progress: bool = False,
) -> CollectionMMD:
    """Unbiased ``MMD^2`` between two collections and its permutation-test p-value, streamed.

    Parameters
    ----------
    x, y : Collection
        Checkpoints of one network (the points; the means of Gaussian checkpoints); with
        ``on_error="skip"`` the bad ones are found first and left out. To
        compare modulo symmetry, canonicalize or align *both* first, to one reference
        computed from the pooled checkpoints (e.g. ``pooled.align("barycenter", out)``
        then split ``summary.collection(spec)``), which keeps the permutation test valid.
    kernel, bandwidths, num_bandwidths, bandwidth_ratio, num_permutations, seed
        As in :func:`ps.diagnostics.mmd <pyro_symmetry.diagnostics.mmd>`.
    sites : sequence of str, optional
        Sites compared (default: every floating-point site), flattened and concatenated.
    method : {"auto", "memory", "streamed", "random_features"}
        See the module docstring. ``"auto"``: ``"memory"`` when the pooled draws take at
        most ``max_bytes / 3``, else ``"streamed"`` when the distance and kernel matrices
        fit in ``max_bytes``, else random features.
    max_bytes : int
        Memory budget of the computation (the blocks of weights read per pass, the
        ``(n + m)^2`` matrices).
    num_features : int
        Random features ``F`` (``"random_features"``): the standard error shrinks as ``F^-1/2``.
    median_subsample : int
        Checkpoints whose pairwise distances set the bandwidth grid (``"random_features"``).
    progress : bool
        A progress bar over passes.

    Returns
    -------
    CollectionMMD
    """
    from tqdm.auto import tqdm

    kinds = KINDS if kernel == "both" else (kernel,)
    if kernel != "both" and kernel not in KINDS:
        raise ValueError(f"kernel must be 'gaussian', 'laplace' or 'both', got {kernel!r}")
    if method not in ("auto", "memory", "streamed", "random_features"):
        raise ValueError(f"method must be 'auto', 'memory', 'streamed' or 'random_features', got {method!r}")
    check_int("num_permutations", num_permutations, minimum=1)
    check_int("seed", seed)
    check_int("max_bytes", max_bytes, minimum=1)
    check_int("num_features", num_features, minimum=2)
    check_int("median_subsample", median_subsample, minimum=2)
    if bandwidths is None:
        check_int("num_bandwidths", num_bandwidths, minimum=1)
        check_real("bandwidth_ratio", bandwidth_ratio, positive=True)
    sites = _check_pair(x, y, sites)
    # on_error="skip": find the bad checkpoints first (one read of every file) and leave them out
    x, y = (c[usable_indices(c)] if c.on_error == "skip" else c for c in (x, y))
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"MMD needs at least 2 readable checkpoints on each side, got {len(x)} and {len(y)}")
    n, m = len(x), len(y)
    total, dim = n + m, sum(math.prod(x.signature.shapes[s]) for s in sites)
    if method == "auto":
        fits = total * dim * 8 * 3 <= max_bytes
        method = "memory" if fits else "streamed" if total**2 * 8 * (len(kinds) + 4) <= max_bytes else "random_features"
    kw = {"kernel": kernel, "bandwidths": bandwidths, "num_bandwidths": num_bandwidths,
          "bandwidth_ratio": bandwidth_ratio, "num_permutations": num_permutations, "seed": seed}  # fmt: skip
    if method == "memory":
        return _in_memory(x, y, sites, kw)
    labels = _labels(n, m, num_permutations, seed)
    grid_args = (bandwidths, num_bandwidths, bandwidth_ratio)
    width = max(1, (max_bytes // 2) // (total * 8 * 3))
    bar = tqdm(desc=f"MMD ({method})", unit="pass", disable=not progress)
    stderr, feats = None, None
    try:
        if method == "streamed":
            table, names, bws = _streamed(x, y, sites, kinds, grid_args, labels, width, bar)
        else:
            table, names, bws, stderr = _random_features(
                x, y, sites, kinds, grid_args, labels, width, bar, seed, num_features, median_subsample
            )
            feats = num_features
    finally:
        bar.close()
    pvals, p_agg = _p_values(table)
    centre = (len(names) // len(kinds)) // 2 if bandwidths is None else 0
    return CollectionMMD(
        mmd2=float(table[0, centre]),
        p_value=p_agg,
        mmd2_grid=table[0],
        kernels=tuple(names),
        bandwidths=torch.cat(bws),
        p_values=pvals,
        num_permutations=num_permutations,
        canonical=None,
        method=method,
        stderr=stderr,
        num_features=feats,
    )
