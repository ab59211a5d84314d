"""Symmetrize Pyro's flat-vector guides, and a mixture-of-diagonal-Normals base guide."""

from __future__ import annotations

import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from pyro.distributions import constraints
from pyro.infer.autoguide import AutoContinuous, AutoGuide
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


class Symmetrize(SymmetryTerm, AutoGuide):
    r"""The symmetrized version of a flat-vector ``AutoContinuous`` guide: an ``AutoGuide``.

    Wraps ``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``,
    ``AutoMultivariateNormal``, :class:`AutoMixtureOfDiagNormals` (a C-component
    mixture base), or any ``AutoContinuous`` whose posterior has a ``log_prob``.
    Each call runs the guide (``z ~ q`` over the flat latent) and adds the factor
    ``log q_sym(z) - log q(z)``, with the group acting on ``z`` as one signed index
    vector (:func:`~pyro_symmetry.flat_permutation`). ``Trace_ELBO`` then optimizes
    ``ELBO(q) + I_K``; for a ``C``-component mixture ``q_sym`` has ``C |G|``
    components and the same identity holds.

    As a :class:`pyro.infer.autoguide.AutoGuide` it has ``call()`` (for
    ``torch.jit.trace_module``), ``median``, ``quantiles`` and ``get_posterior``, works
    as a part of an ``AutoGuideList`` (``Symmetrize(AutoDiagonalNormal(poutine.block(model,
    hide=[...])))``), with ``Predictive``, and pickles with ``torch.save``.

    Parameters
    ----------
    guide : AutoContinuous
        Not yet part of another guide. It becomes this guide's part, and the
        ``Symmetrize`` creates the plates for it, as an ``AutoGuideList`` does for its parts.
    spec : PermutationSpec, optional
        Defaults to the model's ``.spec``.
    num_permutations, estimator, beta, check_invariance, gradient
        As for :class:`~pyro_symmetry.AutoSymmetrizedNormal`. ``"permanent"`` needs
        a diagonal Normal (``AutoDiagonalNormal``); ``"importance"`` scores its
        proposal with the diagonal marginals of ``q`` (or per-component factors of
        a mixture), which keeps the bound valid.
    create_plates : callable, optional
        As for ``AutoNormal``: called with the model's arguments, returns the plates
        (e.g. ``pyro.plate("data", N, subsample=idx)`` for minibatches chosen by the
        caller). Pyro's ``AutoContinuous`` guides have no such option; a wrapped guide
        that has one passes it on here.

    Raises
    ------
    TypeError
        ``guide`` not an ``AutoContinuous``; a mixture base under ``torch.jit`` tracing
        (see Notes).
    ValueError
        ``guide`` already part of another guide; bad options (as for
        :class:`~pyro_symmetry.AutoSymmetrizedNormal`).
    SpecError
        As for :class:`~pyro_symmetry.AutoSymmetrizedNormal`, at set-up (undone on failure).

    Notes
    -----
    The wrapped guide's parameters keep their names in the param store (``AutoDiagonalNormal.loc``,
    ...; inside an ``AutoGuideList``, Pyro's nested names ``AutoGuideList.1.guide.loc``).
    ``median``, ``quantiles``, ``get_posterior`` and ``guide(...)``/``Predictive`` describe
    ``q``: ``median()`` is one representative of the ``|G|`` equivalent modes, and since
    ``ELBO(q_sym)`` does not change when ``q`` moves along a symmetric direction (two hidden
    units trading places in an overlapping region), it can drift there during training;
    compare medians after :func:`~pyro_symmetry.align`. Draws from ``q_sym`` itself:
    :meth:`sample_posterior` or ``Predictive(model, guide=guide.symmetrized())``.

    ``JitTrace_ELBO`` works for the Normal bases. A mixture base cannot be traced, as in
    Pyro: ``pyro.distributions.MixtureOfDiagNormals.rsample`` draws through a custom
    ``torch.autograd.Function`` that ``torch.jit.trace`` fails on (``RuntimeError:
    unordered_map::at`` in Pyro 1.9.2); :class:`AutoMixtureOfDiagNormals` says so instead.

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
        create_plates: Callable | None = None,
    ) -> None:
        if not isinstance(guide, AutoContinuous):
            raise TypeError(
                f"Symmetrize wraps a flat-vector AutoContinuous guide (AutoDiagonalNormal, ...), got "
                f"{type(guide).__name__}; for AutoNormal use ps.AutoSymmetrizedNormal"
            )
        if guide.master is not None:
            raise ValueError(
                f"guide ({type(guide).__name__}) is already a part of another guide (an AutoGuideList or a "
                "Symmetrize); wrap a fresh guide"
            )
        if create_plates is not None and guide.create_plates is not None:
            raise ValueError("pass create_plates to Symmetrize or to the guide it wraps, not to both")
        if create_plates is not None and not callable(create_plates):
            raise TypeError(f"create_plates must be callable, got {type(create_plates).__name__}")
        super().__init__(guide.model, create_plates=create_plates or guide.create_plates)
        spec = spec if spec is not None else find_spec(guide.model)
        self._init_symmetry(spec, num_permutations, estimator, beta, check_invariance, gradient)
        self.layout: FlatLayout | None = None
        # The part of a master guide: the master creates the plates (Pyro asserts that a
        # part has no create_plates of its own). Registered as a plain submodule so that it
        # keeps its Pyro name (an AutoGuideList still renames it, as it does its own parts).
        guide.create_plates = None
        torch.nn.Module.add_module(self, "guide", guide)
        guide._update_master(weakref.ref(self))

    def _check_fitted(self) -> None:
        if self.layout is None or self.guide.prototype_trace is None:
            raise SpecError(
                f"Symmetrize({type(self.guide).__name__}) is not fitted: run an SVI step (or call it once) first"
            )

    def _check_prototype(self, part_trace: Any) -> None:
        # Called by the part's set-up; its prototype is this guide's own.
        if self.master is not None:
            self.master()._check_prototype(part_trace)

    def _setup_prototype(self, *args: Any, **kwargs: Any) -> None:
        """Set up the wrapped guide (one trace of the model) unless it already is, and share
        its prototype trace, plates and flat layout."""
        if self.guide.prototype_trace is None:
            with self.guide._pyro_context:  # as in its own call: its parameters get their full names
                self.guide._setup_prototype(*args, **kwargs)
        self.prototype_trace = self.guide.prototype_trace
        self._prototype_frames = dict(self.guide._prototype_frames)
        self.layout = FlatLayout.from_guide(self.guide)

    def symmetry_base(self, *args: Any, **kwargs: Any) -> BaseDensity:
        """``q`` over the flat latent with its layout."""
        self._check_fitted()
        return BaseDensity(self.guide.get_posterior(*args, **kwargs), self.spec, self.layout, validate=False)

    def forward(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        if self.prototype_trace is None:
            with self._set_up_or_undo(self, self.guide):
                self._setup_prototype(*args, **kwargs)
                result, latent = self._run_guide(*args, **kwargs)
                self._bind_symmetry(self.prototype_trace, self.model, args, kwargs)
        else:
            result, latent = self._run_guide(*args, **kwargs)
        self._add_symmetry_factor(self.symmetry_base(*args, **kwargs), latent)
        return result

    def _run_guide(self, *args: Any, **kwargs: Any) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The wrapped guide's draw (``site -> value``) and its flat latent ``z``."""
        if self.guide.master is None:  # pickling (AutoGuide.__getstate__) drops the link
            self.guide._update_master(self.master if self.master is not None else weakref.ref(self))
        self._create_plates(*args, **kwargs)
        recorder = _LatentRecorder(f"_{self.guide._pyro_name}_latent")
        with recorder:
            result = self.guide(*args, **kwargs)
        if recorder.value is None:
            raise SpecError(f"{type(self.guide).__name__} did not sample its flat latent site")
        return result, recorder.value

    def median(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        """The wrapped guide's median (of ``q``: one representative, see Notes)."""
        self._check_fitted()
        return self.guide.median(*args, **kwargs)

    def quantiles(self, quantiles: Sequence[float] | torch.Tensor, *args: Any, **kwargs: Any) -> dict:
        """The wrapped guide's quantiles ``site -> (len(quantiles), *shape)`` (of ``q``)."""
        self._check_fitted()
        return self.guide.quantiles(quantiles, *args, **kwargs)

    def get_posterior(self, *args: Any, **kwargs: Any) -> Any:
        """``q`` over the flat latent (the wrapped guide's posterior)."""
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
    TypeError
        Under ``torch.jit`` tracing (``JitTrace_ELBO``, ``torch.jit.trace_module``): a
        mixture cannot be traced, as in Pyro, whose ``MixtureOfDiagNormals.rsample``
        draws through a custom ``torch.autograd.Function`` that ``torch.jit.trace`` fails
        on (``RuntimeError: unordered_map::at``, Pyro 1.9.2). Use ``Trace_ELBO``.
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
        if torch.jit.is_tracing():
            raise TypeError(
                f"{type(self).__name__} cannot be traced by torch.jit (JitTrace_ELBO, torch.jit.trace_module): "
                "like Pyro's MixtureOfDiagNormals it draws through a custom torch.autograd.Function, which the "
                "tracer does not support; use Trace_ELBO"
            )
        return StableMixtureOfDiagNormals(self.locs, self.scales, self.logits)

    def _loc_scale(self, *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_fitted()
        c = int(self.logits.argmax())
        return self.locs[c], self.scales[c]
