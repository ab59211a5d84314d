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

    Notes
    -----
    The ``(K - 1) x batch`` permuted copies are evaluated in chunks by
    :meth:`BaseDensity.log_prob_acted` (recomputed in the backward pass under autograd):
    memory does not grow with ``K`` or the batch.

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
    perm = _uniform_elements(base, K - 1, batch, generator, ref.device)
    logs = base.log_prob_acted(value, perm) - log0  # (K - 1, *batch)
    return torch.logsumexp(torch.cat([torch.zeros_like(logs[:1]), logs], 0), 0) - math.log(K)


def _uniform_elements(
    base: BaseDensity, count: int, batch: torch.Size, generator: torch.Generator | None, device: torch.device
) -> dict[str, torch.Tensor]:
    """``count`` uniform elements per batch entry, ``group -> (count, *batch, *unit)``.

    Under ``torch.jit`` tracing (``JitTrace_ELBO``) the sizes in ``batch`` are 0-dim
    tensors, which ``spec.sample`` refuses as batch sizes: the elements are drawn for the
    ``batch.numel()`` rows (an int, recorded as a constant) and reshaped to the traced
    sizes, so the trace fails loudly rather than broadcasting if a later call's batch
    differs. The same numbers as ``spec.sample((count, *batch))`` (rows in the same order).
    """
    perm = base.spec.sample((count, batch.numel()), generator=generator, device=device)
    return {k: p.to(device).reshape(count, *batch, *p.shape[2:]) for k, p in perm.items()}
