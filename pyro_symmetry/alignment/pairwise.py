"""Aligning one posterior to another up to weight-space symmetry (the public pairwise API)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._validation import check_spec
from ..groups import PermutationSpec
from .activations import activation_matching
from .core import coordinate_descent
from .inputs import (
    act_on,
    bind_spec,
    check_dtypes,
    check_method,
    check_options,
    check_sites,
    read_posterior,
    rest_distance,
    sq_norm,
)

__all__ = ["AlignmentResult", "align"]


@dataclass(frozen=True)
class AlignmentResult:
    """Result of :func:`align`.

    Attributes
    ----------
    permutation : dict ``group -> LongTensor (n,)``
        The element ``g`` with ``aligned = g.q1`` (signed encoding for sign-flip
        groups: ``p[i] < 0`` takes neuron ``~p[i]`` negated).
    aligned : mapping
        ``g.q1`` in ``q1``'s form: a mapping of ``(loc, scale)`` pairs (also for a
        guide) or of point tensors. Sites the spec does not touch are copied.
    objective : list of float
        The cost ``C`` (squared W2 or Euclidean distance between ``q0`` and ``g.q1``
        over all sites the two share) at the start of the descent (after the
        initialization) and after each sweep; never increasing.
    converged : bool
        Whether the last sweep changed no group (a coordinate-wise optimum).
    sweeps : int
        Number of sweeps run (``len(objective) == sweeps + 1``).
    """

    permutation: dict[str, torch.Tensor]
    aligned: dict[str, Any]
    objective: list[float]
    converged: bool
    sweeps: int

    def __repr__(self) -> str:
        start, end = self.objective[0], self.objective[-1]
        return (
            f"AlignmentResult(groups={len(self.permutation)}, objective {start:.6g} -> {end:.6g}, "
            f"converged={self.converged}, sweeps={self.sweeps})"
        )


def align(
    q0: Any,
    q1: Any,
    spec: PermutationSpec,
    *,
    method: str = "wasserstein",
    max_sweeps: int = 100,
    seed: int | None = None,
    signs: bool = True,
    init: str | Mapping[str, torch.Tensor] = "greedy",
    compute_dtype: torch.dtype | None = None,
    progress: bool = False,
    data: Any = None,
    module: torch.nn.Module | None = None,
) -> AlignmentResult:
    """Align posterior ``q1`` to ``q0`` up to the weight-space symmetry ``spec``.

    Minimizes over ``g`` in the (signed) permutation group

    .. math::

        C(g) = \\|\\mu_0 - g.\\mu_1\\|^2 + \\|\\sigma_0 - g.\\sigma_1\\|^2
        \\quad (\\text{wasserstein}), \\qquad \\|w_0 - g.w_1\\|^2 \\quad (\\text{weights})

    by coordinate descent over the neuron groups (Rossi, Singh, Hannagan, NeurIPS
    2023; Ainsworth, Hayase, Srinivasa, Git Re-Basin, ICLR 2023): each group's
    similarity is summed over every ``(site, axis)`` it touches (conv kernels,
    biases, norm parameters and buffers included) and solved with
    :func:`scipy.optimize.linear_sum_assignment`; groups are swept in a seeded
    random order until a sweep changes nothing (or ``max_sweeps``). Sign-flip groups
    (odd activations) match with signed permutations, the best sign per neuron pair
    in closed form. A step is taken only if it lowers ``C``, so the objective never
    increases. ``q1 = h.q0`` is recovered exactly (``g = h^{-1}``) when the rows of
    each layer are distinct.

    Parameters
    ----------
    q0, q1 : posterior
        Fitted ``AutoNormal``/``AutoDiagonalNormal`` guides, mappings
        ``site -> (loc, scale)``, or mappings ``site -> tensor`` (points, e.g.
        ``dict(net.named_parameters())``), each site of its unbatched shape. Both have
        the same sites, with the same shapes, on one device; tensors that require grad
        are read as values (detached).
    spec : PermutationSpec
    method : {"wasserstein", "weights", "activations"}
        ``"wasserstein"`` uses means and standard deviations (both posteriors
        Gaussian); ``"weights"`` the means or points only; ``"activations"`` matches each
        group's neurons by the correlation of their activations on ``data`` (Git Re-Basin's
        activation matching; Entezari et al. 2022), the networks at their means or points
        (see :mod:`~pyro_symmetry.alignment.activations`; ``init``, ``max_sweeps``, ``seed``
        and ``compute_dtype`` do not apply, and ``objective`` is the weight-space distance
        before and after).
    max_sweeps : int
    seed : int, optional
        Seeds the order in which groups are visited.
    signs : bool
        Use the sign-flip symmetry of odd activations (``False``: plain permutations).
    init : {"greedy", "identity"} or mapping ``group -> LongTensor (n,)``
        ``"greedy"`` matches groups input-to-output on their incoming weights first
        (equivariant: ``align(q0, h.q1)`` gives ``g h^{-1}``); a descent from it that ends
        above the identity's cost is redone from the identity, so the result is never
        worse than not aligning (that case alone is not equivariant). ``"identity"``
        starts where Git Re-Basin does.
    compute_dtype : torch.dtype, optional
        dtype of the similarity products (default float32, float64 for float64 inputs);
        assignment scores, acceptance tests and the objective are summed in float64, and
        the objective is computed from the inputs (differences in float32, or float64
        for float64 inputs). A coarser compute dtype (float16, bfloat16) only proposes
        steps: each is taken only if the cost, computed from the inputs, drops.
    progress : bool
        Show a progress bar over sweeps.
    data : Tensor, tuple of forward arguments, or iterable of batches, optional
        Inputs for ``method="activations"``.
    module : nn.Module, optional
        The network for ``method="activations"`` (default: ``q0`` when it is one); the spec's
        site names must be its parameter names (a spec from ``from_module``).

    Returns
    -------
    AlignmentResult
        ``permutation`` (``group -> (n,)``), ``aligned`` (``g.q1`` in ``q1``'s form),
        ``objective``, ``converged``, ``sweeps``.

    Notes
    -----
    Not differentiable: the search over a discrete group has no gradient, and
    ``aligned`` is detached even when ``q1``'s tensors require grad. To carry a
    gradient through the aligned weights, apply the result yourself:
    ``spec.apply(params1, res.permutation)`` is differentiable in ``params1``.

    Examples
    --------
    >>> res = ps.align(guide0, guide1, model.spec)
    >>> res.aligned["fc1.weight"]          # (loc, scale) of g.q1
    >>> res.objective[0] >= res.objective[-1]
    True
    """
    check_options(max_sweeps, seed, compute_dtype, signs)
    if method == "activations":
        return _by_activations(q0, q1, spec, data, module, signs)
    if data is not None or module is not None:
        raise ValueError(f"data= and module= are for method='activations', not method={method!r}")
    f0, mu0, sd0 = read_posterior(q0, "q0")
    f1, mu1, sd1, transforms1 = read_posterior(q1, "q1", transforms=True)
    check_method(method, {"q0": f0, "q1": f1})
    check_spec(spec)
    check_sites({"q0": mu0, "q1": mu1}, spec.sites)
    floating = [*spec.sites, *(k for k in mu0 if k not in spec.sites and mu0[k].is_floating_point())]
    check_dtypes(floating, {"q0": mu0, "q1": mu1}, {"q0": sd0, "q1": sd1})
    spec = bind_spec(spec, {k: tuple(v.shape) for k, v in mu0.items()}, signs, "q0")
    wass = method == "wasserstein"
    ref = {s: (mu0[s], sd0[s] if wass else None) for s in spec.sites}
    tgt = {s: (mu1[s].unsqueeze(0), sd1[s].unsqueeze(0) if wass else None) for s in spec.sites}
    if isinstance(init, Mapping):
        init = {k: torch.as_tensor(v) for k, v in init.items()}
    sol = coordinate_descent(
        spec, ref, tgt, max_sweeps=max_sweeps, seed=seed, init=init, compute_dtype=compute_dtype, progress=progress
    )
    # Sites no group touches add a constant, so that the objective is the whole distance.
    rest = [s for s in mu0 if s not in spec.sites]
    tail1 = {s: mu1[s].unsqueeze(0) for s in rest}
    tail_sd1 = {s: sd1[s].unsqueeze(0) for s in rest} if wass else None
    offset = float(rest_distance(rest, mu0, sd0 if wass else None, tail1, tail_sd1)[0])
    perm = {g: p[0] for g, p in sol.perm.items()}
    aligned = act_on(spec, f1, mu1, sd1, perm, transforms1)
    return AlignmentResult(
        permutation=perm,
        aligned=aligned,
        objective=[float(v) + offset for v in sol.objective[0]],
        converged=bool(sol.converged[0]),
        sweeps=sol.sweeps,
    )


def _by_activations(q0: Any, q1: Any, spec: PermutationSpec, data: Any, module: Any, signs: bool) -> AlignmentResult:
    """:func:`align` with ``method="activations"``."""
    if data is None:
        raise ValueError("method='activations' needs data= (inputs on which the activations are compared)")
    if module is None and isinstance(q0, torch.nn.Module) and not hasattr(q0, "prototype_trace"):
        module = q0
    if not isinstance(module, torch.nn.Module):
        raise TypeError("method='activations' needs the network: pass q0 as the nn.Module, or module=")
    check_spec(spec)
    f0, mu0, _ = read_posterior(q0, "q0")
    f1, mu1, sd1, transforms1 = read_posterior(q1, "q1", transforms=True)
    check_sites({"q0": mu0, "q1": mu1}, spec.sites)
    floating = [k for k in mu0 if mu0[k].is_floating_point()]
    check_dtypes(floating, {"q0": mu0, "q1": mu1})
    spec = bind_spec(spec, {k: tuple(v.shape) for k, v in mu0.items()}, signs, "q0")
    perm = activation_matching(spec, module, mu0, mu1, data)
    moved = spec.apply(mu1, perm)

    def distance(mu: dict) -> float:
        return float(sum(sq_norm((mu0[k] - mu[k]).unsqueeze(0))[0] for k in floating))

    aligned = act_on(spec, f1, mu1, sd1, perm, transforms1)
    return AlignmentResult(perm, aligned, [distance(mu1), distance(moved)], True, 1)
