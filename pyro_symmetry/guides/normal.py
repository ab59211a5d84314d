"""Mean-field Normal guides whose density is the symmetrized posterior ``q_sym``."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal
from pyro.infer.autoguide.initialization import init_to_feasible
from torch.distributions import biject_to

from .._validation import check_int, check_real
from ..estimators import BaseDensity
from ..groups import PermutationSpec
from ._common import SymmetryTerm, find_spec, is_real

__all__ = ["AutoSymmetrizedMeanField", "AutoSymmetrizedNormal"]


class AutoSymmetrizedNormal(SymmetryTerm, AutoNormal):
    r"""An ``AutoNormal`` whose density is the symmetrized posterior
    ``q_sym(w) = (1/|G|) sum_g q(g^{-1} w)``.

    Each call draws ``w ~ q`` (reparameterized, exactly as ``AutoNormal``) and adds
    the factor ``log q_sym(w) - log q(w)`` (``pyro.factor(..., has_rsample=True)``),
    estimated by ``estimator`` with ``num_permutations = K`` terms. The guide's
    log-density is then ``log q_sym(w)``, so ``SVI(model, guide, optim, Trace_ELBO())``
    maximizes

    .. math::

        \mathrm{ELBO}(q) + I_K \le \mathrm{ELBO}(q) + I(g; w) = \mathrm{ELBO}(q_{sym})

    with no other change to user code. Sampling ``w ~ q`` is enough because the
    integrand ``log p(D, w) - log q_sym(w)`` is invariant for a G-invariant prior and
    likelihood, which the guide checks numerically at set-up (raising
    :class:`~pyro_symmetry.SpecError` naming the site otherwise).

    Parameters
    ----------
    model : callable
        A Pyro model; its ``.spec`` is used when ``spec`` is not given.
    spec : PermutationSpec, optional
    num_permutations : int
        ``K``, terms of the estimator including the identity (``K = 1``: plain AutoNormal).
    estimator : {"contrastive", "importance", "exact", "permanent", "auto"}
        ``"contrastive"`` (default): Gelberg et al.'s bound, cost ``O(K D)`` per draw,
        at most ``log K``. ``"importance"``: the equivariant Plackett-Luce bound,
        much tighter on wide layers, one sequential step per neuron (gradient:
        pathwise with the proposal held fixed, see
        :func:`~pyro_symmetry.estimators.importance.importance_log_ratio`).
        ``"exact"``/``"permanent"``: the exact ``log q_sym`` (small groups / one
        hidden layer). ``"auto"``: resolved at set-up as in
        :func:`~pyro_symmetry.mutual_information`.
    beta : float
        Inverse temperature of the importance proposal (``>= 0``).
    init_loc_fn, init_scale, create_plates
        As for ``AutoNormal`` (``init_scale`` a positive finite number).
    check_invariance : bool
        Check the model's prior and likelihood under two group elements (one moving
        every neuron, one random) at set-up.
    gradient : {"stl", "full"}
        How the correction is differentiated. ``"stl"`` (default): through ``w``
        only, with ``q``'s parameters held fixed inside it ("sticking the landing");
        the dropped part has expectation zero for the exact ``q_sym`` and is noise of
        size ``1/scale`` when ``q`` is invariant, as at ``AutoNormal``'s
        initialization, where it would derail Adam. ``"full"``: through ``w`` and
        the parameters (the reparameterization gradient of the finite-K estimate).
        See :class:`~pyro_symmetry.guides._common.SymmetryTerm`.

    Raises
    ------
    SpecError
        No spec; at set-up, a spec site that is not a real-valued latent site of the
        model or whose shape does not match (naming site, axis and size), a group too
        large for ``"exact"``/``"permanent"``, a prior whose event shape does not
        cover the site's shape (naming the site and the ``.to_event(n)`` to add), a
        model whose prior or likelihood is not invariant (naming the site); an
        unfitted guide asked for ``median``/``quantiles``/``sample_posterior``/
        ``symmetrized``. A set-up that fails is undone (no parameters left in the
        param store), so the next call sets up and checks again.
    ValueError, TypeError
        ``num_permutations`` not an int ``>= 1``, unknown ``estimator``/``gradient``,
        ``init_scale`` or ``beta`` out of range.

    Notes
    -----
    ``guide(...)``, ``median()``, ``quantiles()`` and ``Predictive(model, guide=guide)``
    describe ``q`` (one representative of the ``|G|`` equivalent modes; its
    predictive distribution equals that of ``q_sym``). Draws from ``q_sym`` itself:
    :meth:`sample_posterior` or ``Predictive(model, guide=guide.symmetrized())``.

    References
    ----------
    Gelberg, van der Ouderaa, van der Wilk, Gal (2024), Variational inference
    failures under model symmetries: permutation invariant posteriors for Bayesian
    neural networks, PMLR 251.

    Examples
    --------
    >>> model = ps.models.BayesianMLP(64, [32], 10)
    >>> guide = ps.AutoSymmetrizedNormal(model, num_permutations=8)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    >>> svi.step(x, y)
    >>> ps.mutual_information(guide, estimator="importance")
    """

    def __init__(
        self,
        model: Callable,
        spec: PermutationSpec | None = None,
        *,
        num_permutations: int = 8,
        estimator: str = "contrastive",
        beta: float = 1.0,
        init_loc_fn: Callable = init_to_feasible,
        init_scale: float = 0.1,
        create_plates: Callable | None = None,
        check_invariance: bool = True,
        gradient: str = "stl",
    ) -> None:
        spec = spec if spec is not None else find_spec(model)
        init_scale = check_real("init_scale", init_scale, positive=True)
        super().__init__(model, init_loc_fn=init_loc_fn, init_scale=init_scale, create_plates=create_plates)
        self._init_symmetry(spec, num_permutations, estimator, beta, check_invariance, gradient)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        with self._set_up_or_undo(self):
            super()._setup_prototype(*args, **kwargs)
            self._bind_symmetry(self.prototype_trace, self.model, args, kwargs)

    def symmetry_base(self, *args: Any, **kwargs: Any) -> BaseDensity:
        """``q`` on the spec's sites: ``site -> Normal(loc, scale).to_event(...)``."""
        self._check_fitted()
        q = {}
        for s in self.spec.sites:
            loc, scale = self._get_loc_and_scale(s)
            # Already checked by the draw of the same call: no second validation per step.
            q[s] = dist.Normal(loc, scale, validate_args=False).to_event(self._event_dims[s])
        return BaseDensity(q, self.spec, validate=False)

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return super().median(*args, **kwargs)

    def quantiles(self, quantiles: Any, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return super().quantiles(quantiles, *args, **kwargs)

    def _get_loc_and_scale(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.__dict__.get("_loc_scale_cache")
        if cache is None:
            return super()._get_loc_and_scale(name)
        if name not in cache:
            cache[name] = super()._get_loc_and_scale(name)
        return cache[name]

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        # One constrained (loc, scale) per site and call, shared by the draw and the factor.
        self.__dict__["_loc_scale_cache"] = {}
        try:
            result = super().forward(*args, **kwargs)
            self._add_symmetry_factor(self.symmetry_base(), {s: result[s] for s in self.spec.sites})
        finally:
            self.__dict__["_loc_scale_cache"] = None
        return result

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, symmetrized: bool = True) -> dict[str, torch.Tensor]:
        """Draws ``site -> (num_samples, *shape)`` from ``q_sym`` (a uniform ``g`` per
        draw) or, with ``symmetrized=False``, from ``q``."""
        self._check_fitted()
        num_samples = check_int("num_samples", num_samples, minimum=1)
        out = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            loc, scale = self._get_loc_and_scale(name)
            out[name] = biject_to(site["fn"].support)(dist.Normal(loc, scale).sample((num_samples,)))
        if symmetrized:
            ref = out[self.spec.sites[0]]
            perm = self.spec.sample((num_samples,), device=ref.device)
            out.update(self.spec.apply({s: out[s] for s in self.spec.sites}, perm))
        return out


class AutoSymmetrizedMeanField(AutoSymmetrizedNormal):
    r""":class:`AutoSymmetrizedNormal` with the Normal placed at the model's site,
    for :class:`~pyro.infer.TraceMeanField_ELBO`.

    ``AutoNormal`` samples an auxiliary Normal and puts a ``Delta`` at the model's
    site, so ``TraceMeanField_ELBO`` falls back to the Monte Carlo ``log q - log p``.
    Here a real-valued site is sampled as ``Normal(loc, scale).to_event(...)``
    directly, so the ELBO uses the analytic ``KL(q || p)`` against a Normal prior;
    the symmetry term ``log q_sym(w) - log q(w)`` is added as in the parent and the
    objective is unchanged in expectation:

    .. math::

        \mathrm{ELBO}(q) + I_K = E_q[\log p(D | w)] - KL(q \| p) + I_K,

    with lower-variance gradients (the KL part has none). Sites with constrained
    support are sampled as ``TransformedDistribution(Normal, biject_to(support))``
    (Monte Carlo KL for them).

    Examples
    --------
    >>> guide = ps.AutoSymmetrizedMeanField(model, num_permutations=8)
    >>> svi = pyro.infer.SVI(model, guide, optim, pyro.infer.TraceMeanField_ELBO())
    """

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self.__dict__["_loc_scale_cache"] = {}
        try:
            return self._forward(*args, **kwargs)
        finally:
            self.__dict__["_loc_scale_cache"] = None

    def _forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            self._setup_prototype(*args, **kwargs)
        plates = self._create_plates(*args, **kwargs)
        result = {}
        for name, site in self.prototype_trace.iter_stochastic_nodes():
            with ExitStack() as stack:
                for frame in site["cond_indep_stack"]:
                    if frame.vectorized:
                        stack.enter_context(plates[frame.name])
                loc, scale = self._get_loc_and_scale(name)
                fn = dist.Normal(loc, scale).to_event(self._event_dims[name])
                if not is_real(site["fn"].support):
                    transform = biject_to(site["fn"].support)
                    fn = dist.TransformedDistribution(fn, transform)
                    extra = site["fn"].event_dim - fn.event_dim
                    if extra > 0:
                        fn = fn.to_event(extra)
                result[name] = pyro.sample(name, fn)
        self._add_symmetry_factor(self.symmetry_base(), {s: result[s] for s in self.spec.sites})
        return result
