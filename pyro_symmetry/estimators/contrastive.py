"""The K-sample contrastive bound of Gelberg et al. (2024, Thm 4.3)."""

from __future__ import annotations

import math

import torch

from ._base import BaseDensity

__all__ = ["contrastive_log_ratio"]


def contrastive_log_ratio(
    base: BaseDensity, value, num_permutations: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``log (1/K) (q(w) + sum_{j=1}^{K-1} q(g_j^{-1} w)) - log q(w)``, ``g_j ~ Uniform(G)``.

    Parameters
    ----------
    base : BaseDensity
    value : weights ``w`` ``(*batch, ...)``, meant as draws of ``q``
    num_permutations : int
        ``K``, the number of terms including the identity (``K = 1`` gives 0).
    generator : torch.Generator, optional

    Returns
    -------
    Tensor ``(*batch,)``
        An estimate of ``log q_sym(w) - log q(w)``. For ``w ~ q``,
        ``I_K = -E[...]`` is a lower bound on ``I(g; w)`` that is at most
        ``log K`` and increases to ``I`` as ``K`` grows (InfoNCE). The gradient is
        pathwise (the uniform ``g_j`` do not depend on any parameter).

    References
    ----------
    Gelberg, van der Ouderaa, van der Wilk, Gal (2024), Variational inference
    failures under model symmetries, PMLR 251, Thm 4.3.
    """
    K = int(num_permutations)
    ref = base.reference(value)
    batch = base.batch_shape_of(value)
    if K == 1:
        return ref.new_zeros(batch)
    log0 = base.log_kernel(value)
    perm = base.spec.sample((K - 1, *batch), generator=generator, device=ref.device)
    if generator is not None:
        perm = {k: p.to(ref.device) for k, p in perm.items()}
    logs = base.log_prob_acted(value, perm) - log0  # (K - 1, *batch)
    return torch.logsumexp(torch.cat([torch.zeros_like(logs[:1]), logs], 0), 0) - math.log(K)
