"""Maximum mean discrepancy between two sample sets, with and without symmetry removal.

For kernel ``k`` and samples ``x_1..x_n ~ P``, ``y_1..y_m ~ Q`` the unbiased
estimate of ``MMD^2(P, Q)`` (Gretton et al., 2012) is

.. math::

    \\widehat{MMD}^2_u = \\frac{1}{n(n-1)} \\sum_{i \\ne j} k(x_i, x_j)
        + \\frac{1}{m(m-1)} \\sum_{i \\ne j} k(y_i, y_j)
        - \\frac{2}{nm} \\sum_{i, j} k(x_i, y_j).

Kernels are Gaussian ``exp(-||x - y||_2^2 / l^2)`` and Laplace
``exp(-||x - y||_1 / l)`` with bandwidths ``l`` on a geometric grid around the
median inter-sample distance of the pooled sample, as in MMDAgg (Schrab et al.,
JMLR 2023). The test aggregates the grid by the permutation-calibrated minimum
p-value: each permutation of the pooled labels gives one statistic per kernel,
per-kernel p-values are ranks within the permutation distribution, and the
smallest of them is compared with its own permutation distribution, so the
aggregated test has exact level without choosing a bandwidth.

Weight-space symmetries make two samples from the *same* posterior up to a
relabelling of neurons look different. ``symmetry_aware=True`` first maps every
sample to a canonical form (alignment to a common reference, or sorting neurons by
an incoming weight as Laurent et al., ICLR 2024, do; plus minimum-mass scaling
for ReLU networks); the canonicalizing map depends on the pooled sample only
symmetrically, so the permutation test stays valid.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

import torch

from .._validation import check_finite, check_int, check_real, check_spec
from ..collections import Collection
from ..groups import PermutationSpec, SpecError
from ..scaling import canonicalize
from ._inputs import sample_set

__all__ = ["KERNELS", "MMDResult", "canonical_form", "mmd", "mmd2_unbiased"]

KERNELS = ("gaussian", "laplace")


@dataclass(frozen=True, repr=False)
class MMDResult:
    """Result of :func:`mmd`.

    Attributes
    ----------
    mmd2 : float
        Unbiased ``MMD^2`` of the first kernel at the median-distance bandwidth (the
        centre of the default grid), or at the first of explicit ``bandwidths``.
    p_value : float
        Permutation p-value of the test aggregated over all kernels/bandwidths.
    mmd2_grid : Tensor ``(K,)``
        Unbiased ``MMD^2`` for every (kernel, bandwidth).
    kernels : tuple of str, length K
    bandwidths : Tensor ``(K,)``
    p_values : Tensor ``(K,)``
        Per-kernel permutation p-values (not corrected for the grid).
    num_permutations : int
    canonical : str or None
        The canonical form used (``"align"``, ``"sort"``, with ``"+scaling"``), or None.
    """

    mmd2: float
    p_value: float
    mmd2_grid: torch.Tensor
    kernels: tuple[str, ...]
    bandwidths: torch.Tensor
    p_values: torch.Tensor
    num_permutations: int
    canonical: str | None = None

    def __iter__(self) -> Iterator[Any]:
        # the fields in order, so ``CollectionMMD(*res, ...)`` and old tuple unpacking keep working
        return iter(tuple(getattr(self, f.name) for f in fields(self)))

    def __repr__(self) -> str:
        return (
            f"MMDResult(mmd2={self.mmd2:.4g}, p_value={self.p_value:.4g}, kernels={len(self.kernels)}, "
            f"num_permutations={self.num_permutations}, canonical={self.canonical!r})"
        )


def _as_matrix(x: Any, name: str, keys: Sequence[str] | None = None) -> tuple[torch.Tensor, list[str] | None]:
    """``(n, d)`` from a tensor ``(n,)``/``(n, d)`` or a sample dict ``site -> (n, *shape)``."""
    if isinstance(x, Mapping):
        if not x:
            raise ValueError(f"{name} is an empty mapping")
        keys = list(x) if keys is None else list(keys)
        if set(keys) != set(x):
            raise SpecError(f"{name} has sites {sorted(x)}, expected {sorted(keys)}")
        vals = [torch.as_tensor(x[k]) for k in keys]
        sizes = {v.shape[0] if v.dim() else -1 for v in vals}
        if len(sizes) != 1 or -1 in sizes:
            raise SpecError(f"every site of {name} needs the same leading sample dim; got sizes {sorted(sizes)}")
        for k, v in zip(keys, vals):
            check_finite(f"{name}[{k!r}]", v)
        n = sizes.pop()
        return torch.cat([v.reshape(n, -1) for v in vals], -1), keys
    if keys is not None:
        raise TypeError(f"{name} must be a sample dict like the other argument, got {type(x).__name__}")
    if not torch.is_tensor(x):
        raise TypeError(f"{name} must be a tensor (n, d) or a mapping site -> (n, *shape), got {type(x).__name__}")
    if x.dim() == 1:
        x = x[:, None]
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape (n,) or (n, d), got {tuple(x.shape)}")
    check_finite(name, x)
    return x, None


def _check_samples(x: Any, y: Any) -> None:
    """Two sample dicts must have the same sites with the same per-sample shapes."""
    if isinstance(x, Mapping) and isinstance(y, Mapping):
        if set(x) != set(y):
            raise SpecError(f"x and y have different sites: {sorted(set(x) ^ set(y))}")
        for k in x:
            sx, sy = tuple(torch.as_tensor(x[k]).shape[1:]), tuple(torch.as_tensor(y[k]).shape[1:])
            if sx != sy:
                raise SpecError(f"site {k!r}: x has per-sample shape {sx} but y has {sy}")


def _standardize(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``((z - mean) / scale, scale)`` with entries in ``[-1, 1]`` (``scale = 1`` if all rows agree).

    Both kernels depend on ``z`` only through differences, so centring changes nothing
    but round-off: ``torch.cdist`` computes ``|a|^2 + |b|^2 - 2ab``, which loses every
    digit of a small spread around a large mean (draws of ``N(1e8, 1)`` gave a wrong
    statistic and p-value). Scaling keeps squared distances finite for entries up to
    ``1e308`` and non-zero for entries down to the smallest normal number.
    """
    top = z.abs().max()
    if not top > 0:
        return z, torch.ones((), dtype=z.dtype, device=z.device)
    z = z / top
    z = z - z.mean(0)
    spread = z.abs().max()
    if not spread > 0:
        return torch.zeros_like(z), torch.ones((), dtype=z.dtype, device=z.device)
    return z / spread, top * spread


def _pairwise(z: torch.Tensor, kind: str) -> torch.Tensor:
    """``(N, N)`` L2 (Gaussian) or L1 (Laplace) distances of standardized rows."""
    return torch.cdist(z, z, p=2.0 if kind == "gaussian" else 1.0)


def _median_distance(dist: torch.Tensor) -> torch.Tensor | None:
    """Median distance between *distinct* samples (pairs ``i < j``: the zero self-distances
    on the diagonal are left out). ``torch.median``: the lower of the two middle values for
    an even number of pairs. When more than half of the pairs coincide (repeated draws,
    point estimates) the median of the non-zero distances; None if every sample is equal."""
    i, j = torch.triu_indices(dist.shape[0], dist.shape[0], offset=1, device=dist.device)
    pairs = dist[i, j]
    med = pairs.median()
    if med > 0:
        return med
    positive = pairs[pairs > 0]
    return positive.median() if positive.numel() else None


def _permutation_labels(n: int, m: int, num_permutations: int, seed: int, device: Any) -> torch.Tensor:
    """``(1 + B, n + m)`` bool, True for the samples labelled x: the observed labels first,
    then ``B`` uniform random relabellings (seeded)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    perms = torch.rand((num_permutations, n + m), generator=gen, device=device).argsort(-1) < n
    return torch.cat([(torch.arange(n + m, device=device) < n)[None], perms])


def _kernel(dist: torch.Tensor, kind: str, bandwidth: torch.Tensor) -> torch.Tensor:
    """Kernel matrices ``(*bandwidth.shape, N, N)`` for a distance matrix ``(N, N)``."""
    scaled = dist / bandwidth.reshape(bandwidth.shape + (1, 1))
    return torch.exp(-(scaled**2)) if kind == "gaussian" else torch.exp(-scaled)


def _mmd2_labels(kmat: torch.Tensor, labels: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Unbiased ``MMD^2`` ``(*K, B)`` for kernel matrices ``(*K, N, N)`` and every row of
    ``labels`` ``(B, N)`` (True: sample x)."""
    k0 = kmat - torch.diag_embed(torch.diagonal(kmat, dim1=-2, dim2=-1))
    a = labels.to(kmat.dtype)
    ka = a @ k0  # (*K, B, N): row sums of k0 over the x's
    kb = k0.sum(-2, keepdim=True) - ka  # over the y's ((1 - a) @ k0, k0 symmetric)
    xx, xy = (ka * a).sum(-1), (ka * (1.0 - a)).sum(-1)
    yy = (kb * (1.0 - a)).sum(-1)
    return xx / (n * (n - 1)) + yy / (m * (m - 1)) - 2.0 * xy / (n * m)


def mmd2_unbiased(
    x: torch.Tensor, y: torch.Tensor, kernel: str = "gaussian", bandwidth: float | torch.Tensor = 1.0
) -> torch.Tensor:
    """Unbiased ``MMD^2`` of two samples ``(n, d)``, ``(m, d)`` for one kernel and bandwidth."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    _check_samples(x, y)
    x, keys = _as_matrix(x, "x")
    y, _ = _as_matrix(y, "y", keys)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {x.shape[0]} and {y.shape[0]}")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x has dimension {x.shape[1]} but y has {y.shape[1]}")
    z, scale = _standardize(torch.cat([x, y.to(x.device)]).to(torch.float64))
    labels = (torch.arange(z.shape[0], device=z.device) < x.shape[0])[None]
    bw = torch.as_tensor(bandwidth, dtype=z.dtype, device=z.device)
    if not bool(((bw > 0) & torch.isfinite(bw)).all()):
        raise ValueError(f"bandwidth must be positive and finite, got {bw.tolist()}")
    return _mmd2_labels(_kernel(_pairwise(z, kernel), kernel, bw / scale), labels, x.shape[0], y.shape[0])[0]


def canonical_form(
    samples: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    method: str = "align",
    reference: Any = None,
    scaling: bool | None = None,
    **kwargs: Any,
) -> tuple[dict[str, torch.Tensor], str]:
    """Map every sample ``site -> (n, *shape)`` to a canonical representative of its orbit.

    A thin wrapper of :func:`pyro_symmetry.canonicalize` that picks the defaults a
    two-sample comparison needs.

    Parameters
    ----------
    samples : mapping ``site -> Tensor (n, *site_shape)``
    spec : PermutationSpec
    method : {"align", "sort"}
        ``"align"``: align every sample to ``reference`` by weight matching
        (default reference: the barycenter of the samples, refined until no
        permutation changes, so no sample is privileged); ``"sort"``: sort each
        group's neurons by a key of their incoming weights (Laurent et al.).
    reference : mapping, optional
    scaling : bool, optional
        First remove the activations' continuous/sign symmetries (minimum-mass
        rescaling for ReLU groups, a sign convention for odd ones). Default: when
        the spec has such groups.
    **kwargs : passed to :func:`pyro_symmetry.canonicalize` (e.g. ``sort_key``).

    Returns
    -------
    (dict, str) : the canonical samples and a label of the canonical form used.
    """
    if method not in ("align", "sort"):
        raise ValueError(f"canonical must be 'align' or 'sort', got {method!r}")
    if scaling is None:
        scaling = any(g.signed or g.scalable for g in spec.groups.values())
    if method == "align" and reference is None:
        reference = "barycenter"
    out = canonicalize(dict(samples), spec, scaling=bool(scaling), permutation=method, reference=reference, **kwargs)
    return dict(out.params), method + ("+scaling" if scaling else "")


def _grid(
    dist: torch.Tensor,
    kind: str,
    bandwidths: Any,
    num_bandwidths: int,
    ratio: float,
    scale: torch.Tensor,
) -> torch.Tensor:
    """Bandwidths ``(K,)`` in the units of ``dist`` (standardized samples, see :func:`_standardize`)."""
    if bandwidths is not None:
        grid = torch.as_tensor(bandwidths, dtype=dist.dtype, device=dist.device).reshape(-1)
        if not grid.numel() or not bool(((grid > 0) & torch.isfinite(grid)).all()):
            raise ValueError(f"bandwidths must be positive and finite (at least one), got {grid.tolist()}")
        return grid / scale
    med = _median_distance(dist)
    if med is None:  # every sample equal: every kernel value is 1 at any bandwidth, MMD^2 = 0
        med = torch.ones((), dtype=dist.dtype, device=dist.device)
    half = num_bandwidths // 2
    return med * ratio ** torch.arange(-half, num_bandwidths - half, dtype=dist.dtype, device=dist.device)


def mmd(
    x: Any,
    y: Any,
    *,
    kernel: str = "gaussian",
    bandwidths: Sequence[float] | torch.Tensor | None = None,
    num_bandwidths: int = 5,
    bandwidth_ratio: float = 2.0,
    num_permutations: int = 500,
    seed: int = 0,
    symmetry_aware: bool = False,
    spec: PermutationSpec | None = None,
    canonical: str = "align",
    reference: Any = None,
    scaling: bool | None = None,
    **collection_options: Any,
) -> MMDResult:
    """Unbiased ``MMD^2`` between two sample sets and its permutation-test p-value.

    Two :class:`~pyro_symmetry.collections.Collection` s (checkpoints read lazily) are
    compared by the streamed estimators of :func:`ps.diagnostics.collections.mmd
    <pyro_symmetry.diagnostics.collections.mmd>` (in memory when the pooled draws fit, else
    exact distances accumulated over blocks of weights, else random features), which equal
    this function's result on collections that fit.

    Parameters
    ----------
    x, y : Tensor ``(n, d)``/``(m, d)`` (or ``(n,)``), sample dicts ``site -> (n, *shape)``, or draws
        (an ArviZ ``DataTree``/``InferenceData``, also loaded from netCDF, a Pyro ``MCMC``,
        :class:`RunDraws`; chains pooled)
    kernel : {"gaussian", "laplace", "both"}
    bandwidths : sequence of float, optional
        Explicit bandwidths (used for every kernel). Default: the geometric grid
        ``median * ratio^j``, ``j = -(num_bandwidths // 2) .. num_bandwidths // 2``,
        around the median distance between distinct samples of the pooled sample
        (pairs ``i < j``, L2 for Gaussian, L1 for Laplace; the lower middle value for an
        even number of pairs). When more than half of the pairs coincide (repeated draws)
        the median of the non-zero distances; when every sample is equal, every kernel
        value is 1 and ``MMD^2 = 0``, ``p = 1``.
    num_bandwidths : int
    bandwidth_ratio : float
    num_permutations : int
        Permutations of the pooled labels; the p-value is
        ``(1 + #{perm stat >= observed}) / (1 + num_permutations)``, statistics within
        100 ulps of the observed one counting as ties (as ``scipy.stats.permutation_test``).
    seed : int
    symmetry_aware : bool
        Compare canonical forms (see :func:`canonical_form`); needs sample dicts and ``spec``.
    spec : PermutationSpec
    canonical : {"align", "sort"}
    reference : mapping, optional
        Reference for ``canonical="align"`` (default: barycenter of the pooled samples).
    scaling : bool, optional
        Remove scaling (ReLU: minimum mass) and sign symmetries first (default: when
        the spec has them).
    **collection_options
        Collections only: ``method``, ``max_bytes``, ``num_features``,
        ``median_subsample``, ``sites``, ``progress`` of
        :func:`ps.diagnostics.collections.mmd <pyro_symmetry.diagnostics.collections.mmd>`.

    Returns
    -------
    MMDResult
        (:class:`~pyro_symmetry.diagnostics.collections.CollectionMMD` for collections: the
        same fields, plus the estimator used and its standard error.)

    Notes
    -----
    Distances are computed on the pooled samples centred and divided by their largest
    absolute entry (both kernels see only differences, and the default bandwidths scale
    with the samples), so samples around a large mean or of extreme magnitude (1e-200,
    1e200) give the same test as standardized ones. A non-finite statistic raises
    ``ValueError`` instead of producing a p-value.

    Examples
    --------
    >>> res = ps.diagnostics.mmd(samples_run0, samples_run1, spec=model.spec, symmetry_aware=True)
    >>> res.mmd2, res.p_value

    References
    ----------
    Gretton et al., A kernel two-sample test, JMLR 2012; Schrab et al., MMD
    aggregated two-sample test, JMLR 2023; Laurent, Aldea, Franchi, ICLR 2024.
    """
    shared = {"kernel": kernel, "bandwidths": bandwidths, "num_bandwidths": num_bandwidths,
              "bandwidth_ratio": bandwidth_ratio, "num_permutations": num_permutations, "seed": seed}  # fmt: skip
    if isinstance(x, Collection) or isinstance(y, Collection):
        return _collection_mmd(x, y, symmetry_aware, shared, collection_options)
    if collection_options:
        raise TypeError(
            f"mmd() got unexpected keyword arguments {sorted(collection_options)} "
            "(method, max_bytes, num_features, median_subsample, sites and progress apply to Collections only)"
        )
    kinds = KERNELS if kernel == "both" else (kernel,)
    if kernel != "both" and kernel not in KERNELS:
        raise ValueError(f"kernel must be 'gaussian', 'laplace' or 'both', got {kernel!r}")
    if isinstance(num_permutations, bool) or not isinstance(num_permutations, int) or num_permutations < 1:
        raise ValueError(f"num_permutations must be a positive int, got {num_permutations!r}")
    check_int("seed", seed)
    if bandwidths is None:
        check_int("num_bandwidths", num_bandwidths, minimum=1)
        check_real("bandwidth_ratio", bandwidth_ratio, positive=True)
    x, y = sample_set(x, "x"), sample_set(y, "y")
    _check_samples(x, y)
    label = None
    if symmetry_aware:
        if spec is None:
            raise SpecError("symmetry_aware=True needs the spec of the network")
        check_spec(spec)
        if not (isinstance(x, Mapping) and isinstance(y, Mapping)):
            raise TypeError("symmetry_aware=True needs x and y as sample dicts site -> (n, *shape)")
        n = next(iter(x.values())).shape[0]
        pooled = {k: torch.cat([torch.as_tensor(x[k]), torch.as_tensor(y[k])]) for k in x}
        canon, label = canonical_form(pooled, spec, method=canonical, reference=reference, scaling=scaling)
        x, y = {k: v[:n] for k, v in canon.items() if k in x}, {k: v[n:] for k, v in canon.items() if k in x}
    xm, keys = _as_matrix(x, "x")
    ym, _ = _as_matrix(y, "y", keys)
    n, m = xm.shape[0], ym.shape[0]
    if n < 2 or m < 2:
        raise ValueError(f"MMD needs at least 2 samples on each side, got {n} and {m}")
    if xm.shape[1] != ym.shape[1]:
        raise ValueError(f"x has dimension {xm.shape[1]} but y has {ym.shape[1]}")
    z, scale = _standardize(torch.cat([xm, ym.to(xm.device)]).to(torch.float64))
    dev = z.device
    labels = _permutation_labels(n, m, num_permutations, seed, dev)
    stats, names, bws = [], [], []
    for kind in kinds:
        dist = _pairwise(z, kind)  # in units of `scale`
        grid = _grid(dist, kind, bandwidths, num_bandwidths, bandwidth_ratio, scale)
        # All bandwidths of a kernel at once, in chunks of at most ~2^24 kernel entries.
        chunk = max(1, (1 << 24) // dist.numel())
        for part in grid.split(chunk):
            stats.extend(_mmd2_labels(_kernel(dist, kind, part), labels, n, m).unbind(0))
        names.extend([kind] * len(grid))
        bws.extend((grid * scale).unbind(0))
    table = torch.stack(stats, -1)  # (1 + B, K)
    if not bool(torch.isfinite(table).all()):  # never let a NaN statistic become a p-value
        raise ValueError(
            "the MMD statistics are not finite (non-finite kernel values); check the samples and bandwidths"
        )
    # Per-kernel p-value of every row: its rank in that kernel's permutation distribution.
    # Statistics equal up to round-off (x and y swapped in a relabelling) count as ties, as
    # in scipy.stats.permutation_test: ">=" within 100 ulps of the row's value.
    tol = 100 * torch.finfo(table.dtype).eps * table.abs()
    counts = (table[None, :, :] >= (table - tol)[:, None, :]).sum(1)  # (1 + B, K)
    pvals = counts.to(z.dtype) / table.shape[0]
    smallest = counts.min(-1).values  # the smallest p-value of each row, times (1 + B)
    p_agg = float((smallest <= smallest[0]).sum()) / table.shape[0]
    centre = (len(bws) // len(kinds)) // 2 if bandwidths is None else 0
    return MMDResult(
        mmd2=float(table[0, centre]),
        p_value=p_agg,
        mmd2_grid=table[0],
        kernels=tuple(names),
        bandwidths=torch.stack(bws),
        p_values=pvals[0],
        num_permutations=num_permutations,
        canonical=label,
    )


def _collection_mmd(x: Any, y: Any, symmetry_aware: bool, shared: dict, options: dict) -> Any:
    """``mmd`` of two Collections: :func:`pyro_symmetry.diagnostics.collections.mmd`."""
    from ._collection_mmd import mmd as streamed_mmd

    if not (isinstance(x, Collection) and isinstance(y, Collection)):
        raise TypeError(
            f"x and y must both be Collections (or both in-memory samples), got {type(x).__name__} and "
            f"{type(y).__name__}"
        )
    if symmetry_aware:
        raise ValueError(
            "symmetry_aware=True computes canonical forms in memory; for Collections write them out of core "
            "first, for both with one reference: pooled = ps.collections.from_files(files_x + files_y, spec); "
            "out = pooled.align('barycenter', out_dir).collection(spec); then mmd(out[:n], out[n:])"
        )
    allowed = {"method", "max_bytes", "num_features", "median_subsample", "sites", "progress"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"mmd() got unexpected keyword arguments {unknown} (for Collections: {sorted(allowed)})")
    return streamed_mmd(x, y, **shared, **options)
