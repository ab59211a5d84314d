"""The minimum-mass representative of a ReLU network's scaling orbit.

Rescaling hidden neurons by ``exp(u)`` keeps a ReLU network's function (see
:func:`~pyro_symmetry.scaling.rescale`) but changes its mass. Laurent, Aldea and
Franchi (ICLR 2024) remove this continuous symmetry by choosing the rescaling of least
mass:

.. math::

    \\min_u \\; M(u) = \\sum_l \\sum_{ij} W_l[i, j]^2\\, e^{2 (u_l[i] - u_{l-1}[j])}
                     + \\sum_l \\sum_i b_l[i]^2\\, e^{2 u_l[i]}, \\qquad u_0 = u_L = 0.

``M`` is a sum of exponentials of affine functions of ``u``, hence convex; it is strictly
convex with a unique minimizer when every hidden neuron has a nonzero incoming and a
nonzero outgoing weight. At the minimizer every neuron is *balanced*: the squared mass
of its incoming row (and bias) equals that of its outgoing column,
``dM/du_i = 2 (in_i - out_i) = 0``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

import torch
from tqdm.auto import tqdm

from .._validation import check_params, check_real, check_spec
from ..groups import PermutationSpec, SpecError
from ._axes import SiteAxis, groups_with, reduce_squares, site_axes
from .rescaling import mass, mass_sites, scale_site

__all__ = ["MinMassResult", "min_mass"]

_DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 1e-5}
_CACHE_BYTES = 8 << 20  # coefficient bytes per sub-batch: fits a server CPU's L3 cache
_SOR_WARMUP = 4  # plain sweeps before the over-relaxation factor is set


class MinMassResult(NamedTuple):
    """Result of :func:`min_mass`.

    Attributes
    ----------
    params : dict ``site -> Tensor (*batch, *site_shape)``
        The minimum-mass representative ``rescale(params, spec, log_scales)``.
    log_scales : dict ``group -> Tensor (*batch, n)``
        The optimal log-scales ``u`` of every ``"scale"`` group (0 for dead neurons).
    mass_before, mass_after : Tensor ``(*batch,)``
        :func:`~pyro_symmetry.scaling.mass` of the input and of the result.
    residual : Tensor ``(*batch,)``
        Optimality residual: the largest relative imbalance
        ``|in_i - out_i| / (in_i + out_i) = |dM/du_i| / (2 (in_i + out_i))`` over the
        live neurons (0 at the exact minimizer).
    dead : dict ``group -> BoolTensor (*batch, n)``
        Neurons with no incoming or no outgoing mass: there the infimum is not
        attained (``u_i -> +-inf``); they are pinned at ``u_i = 0`` and reported here.
    iterations : int
        Sweeps of block coordinate descent performed (shared by the batch).
    converged : BoolTensor ``(*batch,)``
        ``residual <= tol``.
    """

    params: dict[str, torch.Tensor]
    log_scales: dict[str, torch.Tensor]
    mass_before: torch.Tensor
    mass_after: torch.Tensor
    residual: torch.Tensor
    dead: dict[str, torch.Tensor]
    iterations: int
    converged: torch.Tensor


class _Term(NamedTuple):
    """``sum_ij c[:, i, j] exp(2 (da u_a[i] + db u_b[j]))`` for a site that connects two groups."""

    c: torch.Tensor  # (B, n_a, n_b)
    a: str
    da: int
    b: str
    db: int


@dataclass
class _Problem:
    """The mass as a function of the log-scales, reduced to per-neuron coefficients."""

    groups: list[str]
    up: dict[str, torch.Tensor]  # (B, n): coefficients of exp(+2 u_i) from sites touched once
    down: dict[str, torch.Tensor]  # (B, n): coefficients of exp(-2 u_i)
    terms: list[_Term] = field(default_factory=list)
    log_up: dict[str, torch.Tensor] = field(default_factory=dict)
    log_down: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.refresh()

    def refresh(self) -> None:
        """Cache the logs of the unary coefficients (constant during the sweeps)."""
        self.log_up = {g: torch.log(v) for g, v in self.up.items()}
        self.log_down = {g: torch.log(v) for g, v in self.down.items()}

    def total(self) -> torch.Tensor:
        """The mass at ``u = 0``: ``(B,)``."""
        parts = [v.sum(-1) for v in (*self.up.values(), *self.down.values())]
        parts += [t.c.sum((-2, -1)) for t in self.terms]
        return functools.reduce(torch.add, parts)


def _build_problem(
    xs: Mapping[str, torch.Tensor],
    table: Mapping[str, tuple[int, list[SiteAxis]]],
    spec: PermutationSpec,
    groups: list[str],
    dtype: torch.dtype,
) -> _Problem:
    """Reduce the sites ``xs[site]`` ``(B, *site_shape)`` to the coefficients of the mass."""
    B = next(iter(xs.values())).shape[0]
    device = next(iter(xs.values())).device
    zeros = {g: torch.zeros(B, spec.groups[g].size, dtype=dtype, device=device) for g in groups}
    prob = _Problem(groups, zeros, {g: torch.zeros_like(v) for g, v in zeros.items()})
    for site, (nd, axes) in table.items():
        axes = sorted(axes, key=lambda a: a.axis)  # keep the site's memory order: fast matvecs
        r = reduce_squares(xs[site].to(dtype), nd, axes).contiguous()
        if len(axes) == 1:
            a = axes[0]
            (prob.up if a.direction > 0 else prob.down)[a.group] += r
        else:
            a, b = axes
            prob.terms.append(_Term(r, a.group, a.direction, b.group, b.direction))
    prob.refresh()
    return prob


def _check_table(table: Mapping[str, tuple[int, list[SiteAxis]]]) -> None:
    for site, (_, axes) in table.items():
        if len(axes) > 2:
            raise SpecError(f"site {site!r} is rescaled along {len(axes)} axes; min_mass supports at most two")
        if len(axes) == 2 and axes[0].group == axes[1].group:
            raise SpecError(
                f"group {axes[0].group!r} acts on two axes of site {site!r} (a recurrent or tied layer); "
                "min_mass needs each site to connect two different groups"
            )


def _log_matvec(c: torch.Tensor, s: torch.Tensor, transpose: bool) -> torch.Tensor:
    """``log sum_j c[:, i, j] exp(s[:, j])`` (or over ``i`` with ``transpose``), overflow-safe."""
    m = s.amax(-1, keepdim=True)
    v = torch.exp(s - m)
    # A row vector times a (transposed) matrix: several times faster on CPU than a
    # batched matrix times a column vector.
    r = torch.matmul(v.unsqueeze(-2), c if transpose else c.transpose(-1, -2)).squeeze(-2)
    return torch.log(r) + m


def _log_coefficients(prob: _Problem, u: dict[str, torch.Tensor], g: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(log P_i, log Q_i)`` with ``M = sum_i P_i e^{2 u_i} + Q_i e^{-2 u_i} + const`` in ``u_g``."""
    ups, downs = [prob.log_up[g]], [prob.log_down[g]]
    for t in prob.terms:
        if t.a == g:
            (ups if t.da > 0 else downs).append(_log_matvec(t.c, 2 * t.db * u[t.b], transpose=False))
        if t.b == g:
            (ups if t.db > 0 else downs).append(_log_matvec(t.c, 2 * t.da * u[t.a], transpose=True))
    return functools.reduce(torch.logaddexp, ups), functools.reduce(torch.logaddexp, downs)


def _colors(prob: _Problem) -> list[list[str]]:
    """Greedy coloring of the group interaction graph: groups of one color share no site,
    so their exact block updates are independent (red/black layers for a chain)."""
    adj: dict[str, set[str]] = {g: set() for g in prob.groups}
    for t in prob.terms:
        adj[t.a].add(t.b)
        adj[t.b].add(t.a)
    color: dict[str, int] = {}
    for g in prob.groups:
        used = {color[h] for h in adj[g] if h in color}
        color[g] = next(c for c in range(len(prob.groups) + 1) if c not in used)
    return [[g for g in prob.groups if color[g] == c] for c in range(max(color.values()) + 1)]


def _log_gap(log_p: torch.Tensor, log_q: torch.Tensor, u: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """``log in - log out = log P - log Q + 4 u`` per neuron (0 where dead).

    The relative imbalance is ``|in - out| / (in + out) = tanh(|gap| / 2)`` and the exact
    block minimizer is ``u - gap / 4``.
    """
    return torch.where(dead, torch.zeros((), dtype=u.dtype, device=u.device), log_p - log_q + 4 * u)


def _sor_factor(before: torch.Tensor, after: torch.Tensor, sweeps: int) -> torch.Tensor:
    """Over-relaxation factor from the contraction of plain sweeps (per sample).

    For red/black (consistently ordered) block relaxation whose plain sweeps contract
    the error by ``rho``, the optimal over-relaxation factor is
    ``2 / (1 + sqrt(1 - rho))`` (Young 1954). It stays below 2, where every relaxed
    neuron update still lowers the mass (each neuron's mass ``P e^{2u} + Q e^{-2u}`` is
    symmetric about its minimizer in ``u``).
    """
    rho = torch.where(before > 0, after / before, torch.zeros_like(after)).clamp(0.0, 1.0) ** (1.0 / sweeps)
    return 2.0 / (1.0 + torch.sqrt(1.0 - rho.clamp(max=0.99)))


def _solve(
    prob: _Problem, tol: float, max_iters: int, relax: bool
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor, int]:
    """Block coordinate descent on one sub-batch: ``(u, dead, residual, sweeps)``."""
    groups = prob.groups
    ref = prob.up[groups[0]]
    B = ref.shape[0]
    u = {g: torch.zeros_like(prob.up[g]) for g in groups}
    dead = {}
    for g in groups:  # no incoming or no outgoing mass, whatever the scales
        log_p, log_q = _log_coefficients(prob, u, g)
        dead[g] = ~(torch.isfinite(log_p) & torch.isfinite(log_q))
    colors = _colors(prob)
    omega = torch.full((B, 1), 0.25, dtype=ref.dtype, device=ref.device)  # relaxation / 4
    limit = 2 * math.atanh(min(tol, 0.5))  # imbalance <= tol  <=>  |gap| <= limit
    history: list[torch.Tensor] = []
    iterations = 0
    for iterations in range(1, max_iters + 1):
        worst = torch.zeros(B, dtype=ref.dtype, device=ref.device)
        for color in colors:
            for g in color:
                gap = _log_gap(*_log_coefficients(prob, u, g), u[g], dead[g])
                worst = torch.maximum(worst, gap.abs().amax(-1))
                u[g] = u[g] - omega * gap
        if bool((worst <= limit).all()):
            break
        if relax and iterations <= _SOR_WARMUP:
            history.append(worst)
            if iterations == _SOR_WARMUP:
                omega = 0.25 * _sor_factor(history[1], history[-1], _SOR_WARMUP - 2).unsqueeze(-1)
    worst = torch.zeros(B, dtype=ref.dtype, device=ref.device)
    for g in groups:
        worst = torch.maximum(worst, _log_gap(*_log_coefficients(prob, u, g), u[g], dead[g]).abs().amax(-1))
    return u, dead, torch.tanh(0.5 * worst), iterations


def _flatten_batch(x: torch.Tensor, nd: int, batch: torch.Size) -> torch.Tensor:
    """``(*batch_x, *event) -> (prod(batch), *event)``, a view when ``x`` has the full batch."""
    event = x.shape[x.dim() - nd :]
    return x.expand(tuple(batch) + tuple(event)).reshape((-1,) + tuple(event))


def min_mass(
    params: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    tol: float | None = None,
    max_iters: int = 10_000,
    sites: Sequence[str] | None = None,
    relax: bool = True,
    chunk_size: int | None = None,
    progress: bool = False,
) -> MinMassResult:
    """Minimum-mass representative of the scaling orbit of a ReLU network (batched).

    Solves, independently for every batch entry,

    .. math::

        u^\\star = \\arg\\min_u \\sum_{s} \\sum_{k} w_s[k]^2
                   \\exp\\Big(2 \\sum_{g \\text{ in}} u_g[k_g] - 2 \\sum_{g \\text{ out}} u_g[k_g]\\Big)

    over the log-scales of every group with ``activation_symmetry == "scale"``, i.e.
    ``sum_l sum_ij W_l[i,j]^2 exp(2(u_l[i] - u_{l-1}[j]))`` for an MLP, and returns
    ``rescale(params, spec, u*)``.

    **Biases are part of the mass.** A bias follows its neuron's incoming scale,
    ``b_l[i] -> e^{u_l[i]} b_l[i]``, and its square is counted (our reading of Laurent
    et al., whose mass is the squared norm of all parameters; with an isotropic
    Gaussian prior the minimum-mass point is then the most probable point of the
    orbit under the prior). The output bias, which no rescaling changes, is left out.
    Pass ``sites`` (e.g. only the weights) for another choice.

    Conv layers get one scale per channel (the kernel's squared entries are summed),
    a conv-to-linear flatten one scale per block of columns.

    **Algorithm.** Exact block coordinate descent: for one neuron, with its neighbours
    fixed, the mass is ``P e^{2u} + Q e^{-2u} + const``, minimized in closed form by
    ``u = log(Q / P) / 4`` (the neuron is balanced, ``in = out``). Groups that share no
    site (every other layer) are updated at once, so a sweep over a ReLU MLP is two
    batched matrix-vector products per layer; each sweep lowers the mass. Near the
    minimizer the coupling of a balanced neuron to one side is at most half its
    curvature, so for two hidden layers the error contracts by a factor of at most
    about 4 per sweep; deeper chains converge linearly but more slowly. This is the
    equi-normalization of Stock et al. (ICLR 2019) run to convergence. After four
    plain sweeps the steps are over-relaxed by Young's factor ``2 / (1 + sqrt(1 - rho))``
    estimated from the observed contraction ``rho`` (any factor in ``(0, 2)`` still lowers
    the mass, because each neuron's term ``P e^{2u} + Q e^{-2u}`` is symmetric about its
    minimizer). All quantities are kept in log space, so widely spread scales do not
    overflow. The batch is solved in cache-sized sub-batches, each to its own
    convergence; on 1000 samples of a 784-512-512-10 MLP this is 6-13 times faster than
    per-sample ``scipy`` L-BFGS-B on the formula and 1.5-2.5 times faster than a
    factored per-sample baseline (``benchmarks/min_mass.py``).

    Parameters
    ----------
    params : mapping ``site -> Tensor (*batch, *site_shape)``
        float32 or float64; the computation uses float64 if any input site is float64.
    spec : PermutationSpec
        Must have at least one ``"scale"`` group; other groups are left alone.
    tol : float, optional
        Stop when every live neuron's relative imbalance ``|in - out| / (in + out)``
        is below ``tol`` (default ``1e-10`` in float64, ``1e-5`` in float32).
    max_iters : int
        Maximum number of sweeps.
    sites : sequence of str, optional
        Sites whose squared entries make up the mass (default
        :func:`~pyro_symmetry.scaling.mass_sites`: every rescaled site).
    relax : bool
        Over-relax the sweeps (see Algorithm); ``False`` gives plain block coordinate
        descent. Both reach the same minimizer.
    chunk_size : int, optional
        Samples solved together; default: as many as keep the coefficient matrices
        within about 8 MB (a CPU cache), each sub-batch running to its own convergence.
    progress : bool
        Show a tqdm bar over the sub-batches.

    Returns
    -------
    MinMassResult
        ``(params, log_scales, mass_before, mass_after, residual, dead, iterations, converged)``.

    Raises
    ------
    SpecError
        If the spec has no ``"scale"`` group or a site is missing.

    Examples
    --------
    >>> model = ps.models.BayesianMLP(64, [32, 32], 10, activation="relu")
    >>> res = ps.min_mass(samples, model.spec)       # samples[site]: (1000, *shape)
    >>> excess = res.mass_before / res.mass_after - 1  # Laurent et al.: roughly 10-60 %

    References
    ----------
    Laurent, Aldea, Franchi (ICLR 2024), A Symmetry-Aware Exploration of Bayesian Neural
    Network Posteriors. Stock, Graham, Gribonval, Jégou (ICLR 2019), Equi-normalization
    of Neural Networks.
    """
    check_spec(spec)
    groups = groups_with(spec, "scale")
    if not groups:
        raise SpecError(
            "min_mass needs a group with a positively homogeneous activation (activation_symmetry='scale'); "
            f"the spec's groups are {{{', '.join(f'{k}: {g.activation_symmetry}' for k, g in spec.groups.items())}}}"
        )
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters < 0:
        raise ValueError(f"max_iters must be a non-negative int, got {max_iters!r}")
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if isinstance(sites, str):
        raise TypeError(f"sites must be a sequence of site names, got {sites!r}")
    table = site_axes(spec, groups)  # every site the rescaling changes
    # NaN/Inf weights would make every scale NaN without an error; integers cannot be rescaled.
    batch = check_params(params, spec, list(table))
    if math.prod(batch) == 0:
        raise ValueError(f"params has an empty batch shape {tuple(batch)}: there is nothing to rescale")
    sites = tuple(mass_sites(spec) if sites is None else sites)
    objective = {s: v for s, v in table.items() if s in sites}
    if not objective:
        raise SpecError(f"none of the mass sites {list(sites)} is rescaled by a 'scale' group ({list(table)})")
    _check_table(objective)
    constant = [s for s in sites if s not in table]  # counted in the mass, not changed by rescaling
    dtype = torch.float64 if any(params[s].dtype == torch.float64 for s in table) else torch.float32
    if tol is None:
        tol = _DEFAULT_TOL[dtype]
    else:
        tol = check_real("tol", tol, finite=False)
        if not tol > 0:
            raise ValueError(f"tol must be positive, got {tol}")

    batch = torch.broadcast_shapes(*(params[s].shape[: params[s].dim() - nd] for s, (nd, _) in table.items()))
    B = math.prod(batch)
    flat = {s: _flatten_batch(params[s], nd, batch) for s, (nd, _) in table.items()}
    out = {s: torch.empty_like(x, memory_format=torch.contiguous_format) for s, x in flat.items()}
    device = flat[next(iter(flat))].device
    u_all = {g: torch.zeros(B, spec.groups[g].size, dtype=dtype, device=device) for g in groups}
    dead_all = {g: torch.zeros(B, spec.groups[g].size, dtype=torch.bool, device=device) for g in groups}
    residual = torch.zeros(B, dtype=dtype, device=device)
    before = torch.zeros(B, dtype=dtype, device=device)
    after = torch.zeros(B, dtype=dtype, device=device)
    # Cache blocking: solve sub-batches whose coefficient matrices fit in cache one after
    # the other, so that every sweep reads them from cache rather than main memory, and
    # each sub-batch stops as soon as it has converged.
    per_sample = sum(
        math.prod(spec.groups[a.group].size for a in axes) for nd, axes in objective.values() if len(axes) == 2
    ) * (torch.finfo(dtype).bits // 8)
    chunk = chunk_size or (max(1, _CACHE_BYTES // per_sample) if per_sample else max(B, 1))
    iterations = 0
    for start in tqdm(range(0, B, chunk), desc="min_mass", disable=not progress, leave=False):
        sl = slice(start, min(start + chunk, B))
        xs = {s: x[sl] for s, x in flat.items()}
        prob = _build_problem({s: xs[s] for s in objective}, objective, spec, groups, dtype)
        u, dead, res, its = _solve(prob, tol, max_iters, relax)
        iterations = max(iterations, its)
        before[sl], residual[sl] = prob.total(), res
        for g in groups:
            u_all[g][sl], dead_all[g][sl] = u[g], dead[g]
        for s, (nd, axes) in table.items():
            scale_site(xs[s], nd, axes, u, out=out[s][sl])
            if s in objective:
                after[sl] += torch.linalg.vector_norm(out[s][sl].to(dtype), dim=list(range(1, nd + 1))).square()

    new = dict(params)
    new.update({s: o.reshape(tuple(batch) + tuple(o.shape[1:])) for s, o in out.items()})
    before, after = before.reshape(batch), after.reshape(batch)
    if constant:
        fixed = mass(params, spec, constant).to(dtype)
        before, after = before + fixed, after + fixed
    out_dtype = params[next(iter(table))].dtype
    return MinMassResult(
        params=new,
        log_scales={g: v.reshape(tuple(batch) + (-1,)).to(out_dtype) for g, v in u_all.items()},
        mass_before=before,
        mass_after=after,
        residual=residual.reshape(batch),
        dead={g: d.reshape(tuple(batch) + (-1,)) for g, d in dead_all.items()},
        iterations=iterations,
        converged=(residual <= tol).reshape(batch),
    )
