"""Symmetrize Pyro's flat-vector guides, and a mixture-of-diagonal-Normals base guide."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous
from pyro.infer.autoguide.initialization import init_to_median
from pyro.nn import PyroParam
from pyro.poutine.messenger import Messenger
from torch.distributions import biject_to

from .._validation import check_int, check_real
from ..distributions._mixture import StableMixtureOfDiagNormals
from ..estimators import BaseDensity
from ..groups import FlatLayout, PermutationSpec, SpecError, apply_flat, flat_permutation
from ._common import SymmetryTerm, find_spec

__all__ = ["AutoMixtureOfDiagNormals", "Symmetrize"]


class _LatentRecorder(Messenger):
    """Record the value of one (auxiliary) sample site."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name, self.value = name, None

    def _postprocess_message(self, msg: dict) -> None:
        if msg["type"] == "sample" and msg["name"] == self.name:
            self.value = msg["value"]


class Symmetrize(SymmetryTerm, torch.nn.Module):
    r"""The symmetrized version of a flat-vector ``AutoContinuous`` guide.

    Wraps ``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``,
    ``AutoMultivariateNormal``, :class:`AutoMixtureOfDiagNormals` (a C-component
    mixture base), or any ``AutoContinuous`` whose posterior has a ``log_prob``.
    Each call runs the guide (``z ~ q`` over the flat latent) and adds the factor
    ``log q_sym(z) - log q(z)``, with the group acting on ``z`` as one signed index
    vector (:func:`~pyro_symmetry.flat_permutation`). ``Trace_ELBO`` then optimizes
    ``ELBO(q) + I_K``; for a ``C``-component mixture ``q_sym`` has ``C |G|``
    components and the same identity holds.

    Parameters
    ----------
    guide : AutoContinuous
    spec : PermutationSpec, optional
        Defaults to the model's ``.spec``.
    num_permutations, estimator, beta, check_invariance, gradient
        As for :class:`~pyro_symmetry.AutoSymmetrizedNormal`. ``"permanent"`` needs
        a diagonal Normal (``AutoDiagonalNormal``); ``"importance"`` scores its
        proposal with the diagonal marginals of ``q`` (or per-component factors of
        a mixture), which keeps the bound valid.

    Notes
    -----
    The wrapped guide's parameters keep their names (the param store is shared),
    and ``median``/``quantiles``/``get_posterior`` are the wrapped guide's: they
    describe ``q``.

    Examples
    --------
    >>> guide = ps.Symmetrize(AutoDiagonalNormal(model), model.spec, num_permutations=8)
    >>> guide = ps.Symmetrize(ps.AutoMixtureOfDiagNormals(model, num_components=3))
    >>> svi = pyro.infer.SVI(model, guide, optim, pyro.infer.Trace_ELBO())
    """

    def __init__(
        self,
        guide: AutoContinuous,
        spec: PermutationSpec | None = None,
        *,
        num_permutations: int = 8,
        estimator: str = "contrastive",
        beta: float = 1.0,
        check_invariance: bool = True,
        gradient: str = "stl",
    ) -> None:
        if not isinstance(guide, AutoContinuous):
            raise TypeError(
                f"Symmetrize wraps a flat-vector AutoContinuous guide (AutoDiagonalNormal, ...), got "
                f"{type(guide).__name__}; for AutoNormal use ps.AutoSymmetrizedNormal"
            )
        super().__init__()
        self.guide = guide
        self._init_symmetry(
            spec if spec is not None else find_spec(guide.model),
            num_permutations,
            estimator,
            beta,
            check_invariance,
            gradient,
        )
        self.layout: FlatLayout | None = None

    @property
    def _pyro_name(self) -> str:
        return f"Symmetrize_{self.guide._pyro_name}"

    @property
    def model(self) -> Any:
        return self.guide.model

    @property
    def prototype_trace(self) -> Any:
        return self.guide.prototype_trace

    def _check_fitted(self) -> None:
        if self.layout is None or self.guide.prototype_trace is None:
            raise SpecError(
                f"Symmetrize({type(self.guide).__name__}) is not fitted: run an SVI step (or call it once) first"
            )

    def symmetry_base(self, *args: Any, **kwargs: Any) -> BaseDensity:
        """``q`` over the flat latent with its layout."""
        self._check_fitted()
        return BaseDensity(self.guide.get_posterior(*args, **kwargs), self.spec, self.layout, validate=False)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        recorder = _LatentRecorder(f"_{self.guide._pyro_name}_latent")
        if self.layout is None:
            with self._set_up_or_undo(self.guide):
                with recorder:
                    result = self.guide(*args, **kwargs)
                self.layout = FlatLayout.from_guide(self.guide)
                self._bind_symmetry(self.guide.prototype_trace, self.guide.model, args, kwargs)
        else:
            with recorder:
                result = self.guide(*args, **kwargs)
        if recorder.value is None:
            raise SpecError(f"{type(self.guide).__name__} did not sample its flat latent site")
        self._add_symmetry_factor(self.symmetry_base(*args, **kwargs), recorder.value)
        return result

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        self._check_fitted()
        return self.guide.median(*args, **kwargs)

    def quantiles(self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any) -> dict:
        self._check_fitted()
        return self.guide.quantiles(quantiles, *args, **kwargs)

    def get_posterior(self, *args: Any, **kwargs: Any) -> Any:
        self._check_fitted()
        return self.guide.get_posterior(*args, **kwargs)

    @torch.no_grad()
    def sample_posterior(self, num_samples: int, *args: Any, symmetrized: bool = True, **kwargs: Any) -> dict:
        """Draws ``site -> (num_samples, *shape)`` from ``q_sym`` (or ``q``)."""
        self._check_fitted()
        num_samples = check_int("num_samples", num_samples, minimum=1)
        z = self.guide.get_posterior(*args, **kwargs).sample((num_samples,))
        if symmetrized:
            perm = self.spec.sample((num_samples,), device=z.device)
            z = apply_flat(z, flat_permutation(self.spec, perm, self.layout))
        return {site["name"]: biject_to(site["fn"].support)(value) for site, value in self.guide._unpack_latent(z)}


class AutoMixtureOfDiagNormals(AutoContinuous):
    r"""A ``C``-component mixture of diagonal Normals over the flat latent vector.

    .. math::

        q(z) = \sum_{c=1}^C \pi_c \, N(z \mid \mu_c, \mathrm{diag}\, \sigma_c^2)

    using :class:`~pyro_symmetry.distributions._mixture.StableMixtureOfDiagNormals`:
    Pyro's ``MixtureOfDiagNormals`` (reparameterized draws with implicit gradients),
    its gradients computed in log space so that they stay finite for high-dimensional
    latents. Meant as the base of :class:`Symmetrize`, whose symmetrized posterior
    then has ``C |G|`` components.

    Parameters
    ----------
    model : callable
    num_components : int
        ``C``.
    init_loc_fn : callable
        Per-site initialization of the component means (before jitter).
    init_scale : float
        Initial standard deviations, and the scale of the jitter that separates the
        components' initial means (a positive finite number).

    Raises
    ------
    ValueError, TypeError
        ``num_components`` not an int ``>= 1``, ``init_scale`` not positive and finite.
    SpecError
        ``get_posterior``/``median``/``quantiles`` before the guide is set up.

    Notes
    -----
    ``median()`` and ``quantiles()`` describe the heaviest component.
    """

    scale_constraint = constraints.softplus_positive

    def __init__(
        self, model: Any, num_components: int = 2, *, init_loc_fn: Any = init_to_median, init_scale: float = 0.1
    ) -> None:
        num_components = check_int("num_components", num_components, minimum=1)
        init_scale = check_real("init_scale", init_scale, positive=True)
        self.num_components, self._init_scale = num_components, init_scale
        super().__init__(model, init_loc_fn=init_loc_fn)
        self.spec = find_spec(model)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        super()._setup_prototype(*args, **kwargs)
        loc = self._init_loc()
        C = self.num_components
        jitter = torch.randn(C, loc.numel(), dtype=loc.dtype, device=loc.device) * self._init_scale
        self.locs = PyroParam(loc + jitter)
        self.scales = PyroParam(torch.full_like(jitter, self._init_scale), self.scale_constraint)
        self.logits = PyroParam(torch.zeros(C, dtype=loc.dtype, device=loc.device))

    def _check_fitted(self) -> None:
        if self.prototype_trace is None:
            raise SpecError(f"{type(self).__name__} is not fitted: run an SVI step (or call it once) first")

    def get_posterior(self, *args: Any, **kwargs: Any) -> StableMixtureOfDiagNormals:
        self._check_fitted()
        return StableMixtureOfDiagNormals(self.locs, self.scales, self.logits)

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        c = int(self.logits.argmax())
        return self.locs[c], self.scales[c]
