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
"""

from __future__ import annotations

import math

import torch

from ..groups import encode_signed
from ._base import BaseDensity
from .factors import neuron_log_factors

__all__ = ["importance_log_ratio", "plackett_luce_proposal"]


def _usable_sites(spec, group: str, drawn: set[str]) -> list[str]:
    """Sites the group acts on once whose other axes all belong to drawn groups."""
    out = []
    for site in spec.sites:
        _, moves = spec.site_moves(site)
        mine = [g for _, _, g in moves if g == group]
        others = {g for _, _, g in moves if g != group}
        if len(mine) == 1 and others <= drawn:
            out.append(site)
    return out


def _sample_assignment(
    scores: torch.Tensor, num_forced: int, beta: float, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequential Plackett-Luce assignment of ``w``'s neurons to ``q``'s neurons.

    ``scores`` is ``(N, n, S, n)`` (``A[i, s, j]``); rows ``< num_forced`` take the
    identity (its probability is what the bound needs). Returns the chosen option
    per ``w``-neuron ``(N, n)`` (option ``s * n + j``) and ``log pi`` ``(N,)``.
    """
    N, n, S, _ = scores.shape
    O = S * n
    flat = scores.reshape(N, n, O)
    order = flat.amax(-1).argsort(-1, descending=True)  # visit order, fixed by the contents
    visit = beta * flat.gather(1, order.unsqueeze(-1).expand(N, n, O))  # rows in visit order
    device = scores.device if generator is None else generator.device
    u = torch.rand((N, n, O), generator=generator, device=device, dtype=scores.dtype)
    gumbel = -torch.log(-torch.log(u.to(scores.device).clamp(1e-20, 1.0 - 1e-7)))
    if S == 2:
        # A neuron's canonical sign (that of its best option) indexes the noise by relative
        # sign, so a negated neuron draws the same choice: equivariant path by path.
        flipped = visit.argmax(-1) >= n
        gumbel = torch.where(flipped.unsqueeze(-1), gumbel.roll(n, -1), gumbel)
    rows = torch.arange(N, device=scores.device)
    forced = rows < num_forced
    used = torch.zeros(N, n, dtype=torch.bool, device=scores.device)
    chosen = torch.empty(N, n, dtype=torch.long, device=scores.device)
    # One step per neuron: each pick depends on the previous ones (a sequential law).
    for t in range(n):
        s = visit[:, t].masked_fill(used.repeat(1, S), float("-inf"))
        o = torch.where(forced, order[:, t], (s + gumbel[:, t]).argmax(-1))
        used[rows, o % n] = True
        chosen[:, t] = o
    # log pi in one pass: at step t the options of q-neurons picked at steps >= t are open.
    rank = torch.empty_like(chosen).scatter_(1, chosen % n, torch.arange(n, device=scores.device).expand(N, n))
    steps = torch.arange(n, device=scores.device).view(1, n, 1)
    closed = (rank.repeat(1, S).unsqueeze(1) < steps).expand(N, n, O)
    log_pi = (
        visit.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        - torch.logsumexp(visit.masked_fill(closed, float("-inf")), -1)
    ).sum(-1)
    choice = torch.empty_like(chosen).scatter_(1, order, chosen)
    return choice, log_pi


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
    log_pi : Tensor ``(K, *batch)``
        ``log pi(g_k | w)``, including ``k = 0``.
    """
    spec = base.spec
    K = int(num_permutations)
    batch = base.batch_shape_of(value)
    sites = {k: v.detach() for k, v in base.sites(value).items()}
    ref = next(iter(sites.values()))
    marg = base.marginals()
    marg = type(marg)(
        {k: v.detach() for k, v in marg.loc.items()},
        {k: v.detach() for k, v in marg.scale.items()},
        None if marg.log_weights is None else marg.log_weights.detach(),
        marg.exact,
    )
    nb = max(1, batch.numel())
    drawn: dict[str, torch.Tensor] = {}
    log_pi = ref.new_zeros(K, *batch)
    for g, group in spec.groups.items():
        n = group.size
        usable = _usable_sites(spec, g, set(drawn))
        if drawn:
            partial = {k: drawn.get(k, torch.arange(spec.sizes[k], device=ref.device)) for k in spec.groups}
            aligned = spec.apply(sites, partial)  # (K, *batch, ...)
        else:
            aligned = sites
        a = neuron_log_factors({k: aligned[k] for k in usable} or aligned, marg, spec, g, sites=usable)
        a = a.expand(K, *batch, *a.shape[-3:]).reshape(K * nb, n, a.shape[-2], n)
        choice, lp = _sample_assignment(a, nb, beta, generator)
        target = choice % n
        neg = choice >= n
        src = torch.arange(n, device=ref.device).expand_as(choice)
        p = torch.empty_like(choice).scatter_(-1, target, encode_signed(src, neg))
        drawn[g] = p.reshape(K, *batch, n)
        log_pi = log_pi + lp.reshape(K, *batch)
    return drawn, log_pi


def importance_log_ratio(
    base: BaseDensity,
    value,
    num_permutations: int,
    beta: float = 1.0,
    generator: torch.Generator | None = None,
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

    Returns
    -------
    Tensor ``(*batch,)``: ``log (1/K) sum_k q(g_k^{-1} w) / (|G| pi(g_k | w)) - log q(w)``.

    Notes
    -----
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
    perm, log_pi = plackett_luce_proposal(base, value, K, beta, generator)
    logs = base.log_prob_acted(value, perm)  # (K, *batch); k = 0 is log q(w)
    weights = logs - logs[:1] - log_pi.to(logs.dtype) - base.spec.log_order
    return torch.logsumexp(weights, 0) - math.log(K)
