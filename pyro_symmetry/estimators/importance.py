"""Importance-proposal bound with an equivariant Plackett-Luce proposal (SPEC estimator 4).

Uniform contrastive elements almost never land on a mode of ``q(g^{-1} w)`` that
overlaps ``w``, so the contrastive bound is capped at ``log K``. Here the
contrastive elements are drawn from a normalized proposal ``pi(g | w)`` that is
**equivariant** (``pi(h g | h w) = pi(g | w)``) and concentrates where
``q(g^{-1} w)`` is large; the identity is kept as ``g_0``::

    log q_sym(w)  <~  log (1/K) sum_{j=0}^{K-1} q(g_j^{-1} w) / (|G| pi(g_j | w)).

For ``w ~ q`` the right side is, in expectation, an *upper* bound on
``E log q_sym(w)`` (it is the bound "one exact posterior sample of ``g`` plus
``K - 1`` proposal samples"; with ``w ~ q`` the identity is such a sample only
because the proposal is equivariant), so ``I_K = E[log q(w) - ...]`` is a lower
bound on ``I(g; w)`` that tends to ``I`` as ``K`` grows.

The proposal, per neuron group in spec order: visit the neurons of ``w`` in an
order fixed by ``w`` itself (decreasing best factor log-density), and let each pick
an unused neuron ``j`` of ``q`` (and a sign, for odd activations) with probability
proportional to ``exp(beta * log q_j(w_i))``. ``pi`` is a product of softmaxes,
known exactly. Later groups are scored on sites whose other axes belong to groups
already drawn, with those axes aligned by the drawn elements. Every choice depends
on ``w`` only through the neurons' contents, never their labels: hence equivariance.

**What is vectorized.** Each neuron's pick depends on the picks before it (each
row chooses among the columns left, with its own weights: an assignment, not one
Plackett-Luce ranking of items, so Gumbel-top-k does not apply), so the ``n`` steps
of a group stay a loop. Everything else is one tensor operation over all ``K``
elements and draws at once: the scores (one batched matrix product per site), the
visit order, and each step, which is an inverse-CDF draw for all rows together from
one uniform per row and step (``N x n`` uniforms instead of ``N x n x n`` Gumbels).
The loop (:mod:`._assign`) runs on float64 copies, compiled with numba when the
``fast`` extra is installed and in NumPy otherwise (the same draws bit for bit), with the
probabilities of each row normalized once (``exp(score - row max)``, in torch); a step
whose open options all underflow sends the group to a log-domain rerun that renormalizes
at every step. The log-density of a given
assignment is one masked log-sum-exp over the columns still open at each step
(:func:`proposal_log_prob`), vectorized over steps.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.utils.checkpoint

from ..groups import decode_signed, encode_signed
from . import _base
from ._assign import steps as _steps
from ._base import BaseDensity, Marginals
from .factors import neuron_log_factors

__all__ = ["importance_log_ratio", "plackett_luce_proposal", "proposal_log_prob"]

#: A step whose open probability mass (relative to the row's best option) is below this
#: sends the group to the log-domain rerun.
_TINY = 1e-250


def _site_plan(spec, group: str, drawn: set[str]) -> tuple[list[str], list[str]]:
    """The sites that score a group: those it acts on once whose other groups are all
    drawn, split into ``static`` ones (no other group) and ``moved`` ones, which the drawn
    elements align first (``spec.action(site).apply``)."""
    static, moved = [], []
    for site in spec.sites:
        action = spec.action(site)
        others = set(action.groups) - {group}
        if len(action.spans_of(group)) == 1 and others <= drawn:
            (moved if others else static).append(site)
    return static, moved


def _detached_marginals(base: BaseDensity) -> Marginals:
    marg = base.marginals()
    return Marginals(
        {k: v.detach() for k, v in marg.loc.items()},
        {k: v.detach() for k, v in marg.scale.items()},
        None if marg.log_weights is None else marg.log_weights.detach(),
        marg.exact,
    )


def _width(spec, sites: list[str]) -> int:
    """Coordinates of ``sites`` (per draw): the cost of scoring them, up to the group size."""
    return sum(math.prod(spec.shapes[s]) for s in sites)


# ---------------------------------------------------------------------- one group
def _scores(spec, sites, marg, group: str, drawn: dict, dtype=None) -> torch.Tensor:
    """``A[i, s, j]``, ``(R, n, S, n)``: per draw (``R = nbc``) when no scoring site has an
    axis of a drawn group, else per element and draw (``R = kc * nbc``, those axes aligned by
    the drawn elements ``(kc, nbc, n)`` first). ``sites`` are ``(nbc, *shape)``.
    """
    static, moved = _site_plan(spec, group, set(drawn))
    nbc = next(iter(sites.values())).shape[0]
    skip = [g for g in spec.groups if g not in drawn]
    aligned = {site: spec.action(site).apply(sites[site], drawn, skip=skip) for site in moved}
    kc = next(iter(drawn.values())).shape[0] if drawn else 1
    if not aligned:
        a = neuron_log_factors({k: sites[k] for k in static} or sites, marg, spec, group, sites=static, dtype=dtype)
    elif marg.log_weights is not None or 4 * _width(spec, static) <= _width(spec, moved):
        # A mixture sums its sites inside each component; otherwise the static sites join the
        # aligned ones (one set of products instead of two) when repeating them per element
        # adds at most a quarter to the products. The rule must not depend on kc: the result
        # may not depend on how the elements are chunked.
        values = {**{k: sites[k].expand(kc, *sites[k].shape) for k in static}, **aligned}
        a = neuron_log_factors(values, marg, spec, group, sites=list(values), dtype=dtype)
    else:  # the static sites once per draw, the aligned ones per element
        a = neuron_log_factors(aligned, marg, spec, group, sites=list(aligned), dtype=dtype)
        if static:
            a = a + neuron_log_factors({k: sites[k] for k in static}, marg, spec, group, sites=static, dtype=dtype)
    return a.reshape(-1, *a.shape[-3:]) if a.dim() > 4 else a.reshape(nbc, *a.shape[-3:])


def _visit(a: torch.Tensor, beta: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Visit order ``(R, n)``, the float64 scores ``beta * A`` in visit order, step-major
    ``(n, R, O)`` (contiguous), with options ``s * n + j`` counted in *relative* sign, the
    flips ``(R, n)`` and the row maxima ``(n, R, 1)``.

    A neuron's canonical sign (that of its best option) is its sign 0, so a negated
    neuron sees the same option order and draws the same choice from the same uniform:
    equivariant path by path.
    """
    R, n, S, _ = a.shape
    flat = a.reshape(R * n, S * n)
    best, order = flat.amax(-1).reshape(R, n).sort(-1, descending=True)  # fixed by the neurons' contents
    rows = (order + n * torch.arange(R, device=a.device).unsqueeze(-1)).t().reshape(-1)  # step-major
    V = flat.index_select(0, rows).to(torch.float64).reshape(n, R, S * n)
    top = best.t().to(torch.float64).unsqueeze(-1)  # the best option keeps its place under the flip
    if beta != 1.0:
        if beta:
            V.mul_(beta)
        else:  # uniform: -inf scores must not become NaN
            V.zero_()
        top = top * beta if beta >= 0 else V.amax(-1, keepdim=True)  # beta * max = max(beta *) for beta >= 0
    if S == 1:
        return order, V, None, top
    flipped = V.argmax(-1) >= n  # (n, R)
    V = torch.where(flipped.unsqueeze(-1), V.roll(n, -1), V)
    return order, V, flipped.t(), top


def _prepare(V: torch.Tensor, top: torch.Tensor, group: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Host copies of ``V`` ``(n, R, O)`` and its row maxima ``top`` ``(n, R, 1)``, and
    ``exp(V - top)`` (the fast pass of :func:`_steps`), once per group: the sampler runs on
    the CPU. Non-finite scores are refused."""
    tn = top.cpu().numpy()
    if not np.isfinite(tn).all():
        raise ValueError(
            f"the importance proposal's scores for group {group!r} are not finite (weights or q's "
            "parameters out of the floating-point range?)"
        )
    Vn = V.cpu().numpy()
    E = np.subtract(Vn, tn)
    return Vn, tn, np.exp(E, out=E)


def _draw(
    prepared, u: torch.Tensor, forced: torch.Tensor | None, kc: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Options ``(N, n)`` (visit order, relative sign) and ``log pi`` ``(N,)`` of one group
    from :func:`_prepare`'d step-major scores ``(n, R, O)`` (see :func:`_steps`). With
    ``forced`` (the identity's options ``(nbc, n)``) the first ``nbc`` rows take them (their
    uniforms unused) and only their ``log pi`` is computed, along the same loop."""
    Vn, tn, E = prepared
    n, R, O = Vn.shape
    N = u.shape[0]
    un = u.detach().t().contiguous().cpu().numpy()
    given = None if forced is None else forced.t().contiguous().cpu().numpy()
    chosen, norm = _steps(E, un, kc, given, stable=False)
    if norm.min() < _TINY:
        chosen, log_norm = _steps(np.ascontiguousarray(Vn), un, kc, given, stable=True)
    else:
        log_norm = tn.reshape(n, 1, R) + np.log(norm).reshape(n, N // R, R)
    # rows r = k * R + b read the scores of row b
    picked = np.take_along_axis(Vn.reshape(n, 1, R, O), chosen.reshape(n, N // R, R, 1), -1)
    log_pi = (picked.reshape(n, N) - log_norm.reshape(n, N)).sum(0)
    return torch.from_numpy(chosen.T.copy()).to(device), torch.from_numpy(log_pi).to(device)


def _assignment_log_prob(V: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """``log pi`` ``(N,)`` of given options ``(N, n)`` (visit order): at step ``t`` the
    options of the columns picked at steps ``>= t`` are open (a masked log-sum-exp)."""
    N, n, O = V.shape
    col = chosen % n
    rank = torch.empty_like(col).scatter_(1, col, torch.arange(n, device=V.device).expand(N, n))
    closed = rank.repeat(1, O // n).unsqueeze(1) < torch.arange(n, device=V.device).view(1, n, 1)
    picked = V.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(V.masked_fill(closed, float("-inf")), -1)).sum(-1)


def _to_element(order: torch.Tensor, chosen: torch.Tensor, flipped: torch.Tensor | None) -> torch.Tensor:
    """Signed index ``p`` ``(N, n)`` with ``(p . w)[j] = +-w[p[j]]`` from the options."""
    n = order.shape[-1]
    if flipped is None:
        return torch.empty_like(chosen).scatter_(1, chosen, order)
    absolute = (chosen + n * flipped) % (2 * n)
    return torch.empty_like(chosen).scatter_(1, absolute % n, encode_signed(order, absolute >= n))


def _from_element(p: torch.Tensor, order: torch.Tensor, flipped: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`_to_element`: the options (visit order, relative sign) of ``p``."""
    n = order.shape[-1]
    src, neg = decode_signed(p)
    target = torch.arange(n, device=p.device).expand_as(src) + n * neg
    choice = torch.empty_like(src).scatter_(1, src, target)  # option of each w-neuron
    absolute = choice.gather(1, order)
    return absolute if flipped is None else (absolute + n * flipped) % (2 * n)


def _expand(x: torch.Tensor | None, kc: int) -> torch.Tensor | None:
    """Rows ``(nbc, ...)`` shared by ``kc`` elements -> ``(kc * nbc, ...)`` (element-major)."""
    return None if x is None else x.unsqueeze(0).expand(kc, *x.shape).reshape(-1, *x.shape[1:])


def _block(base, sites, marg, kc: int, beta: float, u=None, forced: bool = False, given=None, cache=None):
    """Draw (``u``) or score (``given``) the elements of one block of ``kc`` elements and
    ``nbc`` draws. Returns elements ``(kc, nbc, n)`` per group and ``log pi`` ``(kc, nbc)``.

    The first group is scored per draw, once for all ``kc`` elements (and, through
    ``cache``, for all blocks of the same draws); later groups per element and draw."""
    spec = base.spec
    nbc = next(iter(sites.values())).shape[0]
    drawn: dict[str, torch.Tensor] = {}
    log_pi = 0.0
    for g, group in spec.groups.items():
        n = group.size
        if not drawn and cache is not None and g in cache:
            order, V, flipped, prepared = cache[g]
        else:
            a = _scores(spec, sites, marg, g, drawn)
            order, V, flipped, top = _visit(a, beta)
            if a.dtype != torch.float64 and not bool(torch.isfinite(top).all()):  # float32 overflow
                a = _scores(spec, sites, marg, g, drawn, dtype=torch.float64)
                order, V, flipped, top = _visit(a, beta)
            prepared = _prepare(V, top, g) if given is None else None
            if not drawn and cache is not None:
                cache[g] = order, V, flipped, prepared
        if order.shape[0] != kc * nbc:  # per draw: the same for every element
            order, flipped = _expand(order, kc), _expand(flipped, kc)
        if given is None:
            ident = None
            if forced:  # the identity's options: neuron order[t] keeps its place and sign
                ident = order[:nbc] if flipped is None else order[:nbc] + n * flipped[:nbc]
            chosen, lp = _draw(prepared, u[g].reshape(kc * nbc, n), ident, kc, V.device)
        else:
            chosen = _from_element(given[g].reshape(kc * nbc, n), order, flipped)
            Vr = V.transpose(0, 1)
            lp = _assignment_log_prob(_expand(Vr, kc) if Vr.shape[0] != kc * nbc else Vr, chosen)
        drawn[g] = _to_element(order, chosen, flipped).reshape(kc, nbc, n)
        log_pi = log_pi + lp.reshape(kc, nbc)
    return drawn, log_pi


def _block_costs(base: BaseDensity, itemsize: int) -> tuple[int, int]:
    """Bytes per element-and-draw row of a block (its permuted copy, the later groups'
    aligned copies and scores, the loop's buffers) and per draw (the first group's scores,
    shared by the draw's elements)."""
    sizes = [(g.size, 2 if g.signed else 1) for g in base.spec.groups.values()]
    first = sizes[0][0] ** 2 * sizes[0][1] * (itemsize + 40) if sizes else 0
    later = max((n * n * S * (itemsize + 40) for n, S in sizes[1:]), default=0)
    loop = max((n * S * 48 for n, S in sizes), default=0)
    return base.row_bytes(itemsize) + later + loop, first


def _blocks(base: BaseDensity, K: int, nb: int, itemsize: int):
    """``(k_lo, k_hi, b_lo, b_hi)`` rectangles of elements x draws that fit in
    :data:`~pyro_symmetry.estimators._base.CHUNK_BYTES` (whole draws when ``K`` rows fit)."""
    row, draw = _block_costs(base, itemsize)
    budget = _base.CHUNK_BYTES
    if K * row + draw <= budget:
        per = max(1, budget // (K * row + draw))
        for b in range(0, nb, per):
            yield 0, K, b, min(nb, b + per)
    else:
        rows = max(1, (budget - draw) // row)
        for b in range(nb):
            for k in range(0, K, rows):
                yield k, min(K, k + rows), b, b + 1


def _uniforms(spec, K: int, nb: int, generator, device) -> dict[str, torch.Tensor]:
    """One uniform in ``(0, 1]`` per element, draw and neuron, drawn before any chunking so
    that the result does not depend on the chunk sizes."""
    dev = generator.device if generator is not None else device
    return {
        g: (1.0 - torch.rand((K, nb, n), generator=generator, device=dev, dtype=torch.float64)).to(device)
        for g, n in spec.sizes.items()
    }


def _iter_blocks(base: BaseDensity, value, batch: torch.Size, K: int, nb: int, ref: torch.Tensor):
    """:func:`_blocks` with the block's draws ``site -> (nbc, *shape)`` (detached) and a
    cache of the first group's scores shared by the blocks of the same draws."""
    key, sites, cache = None, None, None
    for k0, k1, b0, b1 in _blocks(base, K, nb, ref.element_size()):
        if (b0, b1) != key:
            with torch.no_grad():
                sites = {k: v.detach() for k, v in base.sites(base.take_range(value, b0, b1, batch)).items()}
            key, cache = (b0, b1), {}
        yield k0, k1, b0, b1, sites, cache


def _assemble(parts: list, K: int, nb: int) -> torch.Tensor:
    """The ``(K, nb)`` tensor from its blocks ``(k0, k1, b0, b1, (k1 - k0, b1 - b0))``
    (one block: itself, no copy)."""
    if len(parts) == 1:
        return parts[0][-1]
    if all(p[1] - p[0] == K for p in parts):  # whole draws, in order
        return torch.cat([p[-1] for p in parts], 1)
    # single draws split over elements, in order
    return torch.stack([torch.cat([p[-1] for p in parts if p[2] == b], 0)[:, 0] for b in range(nb)], 1)


def _setup(base: BaseDensity, value):
    batch = base.batch_shape_of(value)
    ref = base.reference(value)
    return batch, max(1, batch.numel()), ref


@torch.no_grad()
def plackett_luce_proposal(
    base: BaseDensity,
    value,
    num_permutations: int,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Draw ``K - 1`` elements from the equivariant proposal, plus the identity.

    Parameters
    ----------
    base : BaseDensity
        ``q``; its Normal marginals score the proposal (exact factors for a
        mean-field ``q``, per-component factors for a mixture of diagonal Normals,
        the diagonal marginals otherwise: any choice keeps the bound valid).
    value : weights ``w`` ``(*batch, ...)``
    num_permutations : int
        ``K``.
    beta : float
        Inverse temperature of the softmaxes (``0``: uniform, recovers the
        contrastive bound).
    generator : torch.Generator, optional

    Returns
    -------
    perm : dict ``group -> LongTensor (K, *batch, n)``
        Elements ``p_k = g_k^{-1}`` (evaluate ``q(p_k . w)``); ``p_0`` is the identity.
    log_pi : Tensor ``(K, *batch)``, float64
        ``log pi(g_k | w)``, including ``k = 0``.
    """
    K = int(num_permutations)
    batch, nb, ref = _setup(base, value)
    u = _uniforms(base.spec, K, nb, generator, ref.device)
    marg = _detached_marginals(base)
    perms = {g: torch.empty(K, nb, n, dtype=torch.long, device=ref.device) for g, n in base.spec.sizes.items()}
    log_pi = torch.empty(K, nb, dtype=torch.float64, device=ref.device)
    for k0, k1, b0, b1, sites, cache in _iter_blocks(base, value, batch, K, nb, ref):
        ub = {g: x[k0:k1, b0:b1] for g, x in u.items()}
        p, lp = _block(base, sites, marg, k1 - k0, beta, u=ub, forced=k0 == 0, cache=cache)
        for g in perms:
            perms[g][k0:k1, b0:b1] = p[g]
        log_pi[k0:k1, b0:b1] = lp
    return {g: p.reshape(K, *batch, -1) for g, p in perms.items()}, log_pi.reshape(K, *batch)


@torch.no_grad()
def proposal_log_prob(base: BaseDensity, value, perm, beta: float = 1.0) -> torch.Tensor:
    """``log pi(g | w)`` of given elements under the proposal of :func:`plackett_luce_proposal`.

    Parameters
    ----------
    base : BaseDensity
    value : weights ``w`` ``(*batch, ...)``
    perm : dict ``group -> LongTensor (E, *batch, n)``
        Elements ``p = g^{-1}`` in the convention of :func:`plackett_luce_proposal`.
    beta : float

    Returns
    -------
    Tensor ``(E, *batch)``, float64. Summed over all of ``G`` its exponential is one
    (the proposal is normalized), and it is equivariant:
    ``proposal_log_prob(h . w, p h^{-1}) == proposal_log_prob(w, p)``.
    """
    batch, nb, ref = _setup(base, value)
    E = next(iter(perm.values())).shape[0]
    given = {g: p.expand(E, *batch, p.shape[-1]).reshape(E, nb, -1) for g, p in perm.items()}
    marg = _detached_marginals(base)
    out = torch.empty(E, nb, dtype=torch.float64, device=ref.device)
    for k0, k1, b0, b1, sites, cache in _iter_blocks(base, value, batch, E, nb, ref):
        gb = {g: x[k0:k1, b0:b1] for g, x in given.items()}
        out[k0:k1, b0:b1] = _block(base, sites, marg, k1 - k0, beta, given=gb, cache=cache)[1]
    return out.reshape(E, *batch)


def importance_log_ratio(
    base: BaseDensity,
    value,
    num_permutations: int,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
    progress=None,
) -> torch.Tensor:
    """Importance-proposal estimate of ``log q_sym(w) - log q(w)``.

    Parameters
    ----------
    base : BaseDensity
    value : weights ``w`` ``(*batch, ...)``, meant as draws of ``q``
    num_permutations : int
        ``K`` terms: the identity and ``K - 1`` proposal draws.
    beta : float
        Inverse temperature of the Plackett-Luce proposal.
    generator : torch.Generator, optional
    progress : callable, optional
        Called with the number of draws finished after each chunk.

    Returns
    -------
    Tensor ``(*batch,)``: ``log (1/K) sum_k q(g_k^{-1} w) / (|G| pi(g_k | w)) - log q(w)``.

    Notes
    -----
    **Memory.** Elements and draws are processed in rectangles that fit in
    :data:`~pyro_symmetry.estimators._base.CHUNK_BYTES` (all uniforms are drawn first,
    so the result does not depend on the chunking); under autograd each rectangle's
    permuted copies are recomputed in the backward pass instead of kept.

    **Gradient.** The proposal is drawn and scored without gradient (``log pi``
    detached), and the estimate is differentiated pathwise through
    ``log q(g_k^{-1} w)`` with the drawn ``g_k`` held fixed. That gradient is
    ``sum_k wbar_k grad log q(g_k^{-1} w)`` with self-normalized importance
    weights ``wbar_k``: the self-normalized importance-sampling estimate of the
    pathwise gradient of ``log q_sym(w)`` itself, consistent as ``K`` grows. The
    score-function term of the proposal (whose law depends on the parameters) is
    left out, so this is not the exact gradient of the finite-``K`` bound.
    """
    K = int(num_permutations)
    batch, nb, ref = _setup(base, value)
    with torch.no_grad():
        u = _uniforms(base.spec, K, nb, generator, ref.device)
        marg = _detached_marginals(base)
    grad = len(list(_blocks(base, K, nb, ref.element_size()))) > 1 and base.needs_grad(value)
    tensors = base.moving_tensors(value)
    logs, log_pi = [], []
    for k0, k1, b0, b1, sites, cache in _iter_blocks(base, value, batch, K, nb, ref):
        with torch.no_grad():
            ub = {g: x[k0:k1, b0:b1] for g, x in u.items()}
            perm, lp = _block(base, sites, marg, k1 - k0, beta, ub, k0 == 0, cache=cache)

        def piece(*_, b0=b0, b1=b1, perm=perm):
            return base.log_prob_acted(base.take_range(value, b0, b1, batch), perm)

        if grad:  # keep no permuted copies for the backward pass: recompute them there
            piece_logs = torch.utils.checkpoint.checkpoint(
                piece, *tensors, use_reentrant=False, preserve_rng_state=False
            )
        else:
            piece_logs = piece()
        logs.append((k0, k1, b0, b1, piece_logs))
        log_pi.append((k0, k1, b0, b1, lp))
        if progress is not None and k1 == K:
            progress(b1 - b0)
    logs, log_pi = _assemble(logs, K, nb), _assemble(log_pi, K, nb)
    weights = logs - logs[:1] - log_pi.to(logs.dtype) - base.spec.log_order
    return (torch.logsumexp(weights, 0) - math.log(K)).reshape(batch)
