"""One object for "a posterior over a network's weights", whatever form it came in.

A :class:`Posterior` holds either a *density* (one distribution per site, or one over the
flat latent vector of an ``AutoContinuous`` guide with its layout; a point estimate is a
``Delta`` per site) or *draws* (``site -> (chain, draw, *shape)``: MCMC chains, ensembles,
ArviZ trees). Every public function of the package reads its posterior arguments through
:func:`~pyro_symmetry.as_posterior` and then asks this object only:

=====================  =============================================================
``sites``              ``site -> event shape`` of every site it covers
``sample``             draws of the density ``(*sample_shape, *shape)`` per site
``log_prob``           the density at a value
``gaussian()``         Gaussian marginals ``(loc, scale)`` (scale 0 for points)
``point()``            one network: the means of a density, or the point itself
``draws()``            ``(chain, draw, *shape)`` per site (sampled from a density)
``act(value, g)``      the group element ``g`` acting on a value (through the spec)
=====================  =============================================================

Values of a guide's density live in its unconstrained space (as Pyro's autoguides
sample them); ``draws()`` maps sites with a constrained support (a learned noise scale)
to the model's space with the guide's own transforms. Weights are real-valued, so for
them both spaces coincide.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyro.distributions as dist
import torch
import torch.distributions as td

from ..groups import FlatLayout, PermutationSpec, SpecError

__all__ = ["Posterior"]


def _unwrap(d: td.Distribution) -> td.Distribution:
    while isinstance(d, td.Independent):
        d = d.base_dist
    return d


def _is_delta(d: td.Distribution) -> bool:
    return isinstance(_unwrap(d), dist.Delta)


class Posterior:
    """A posterior over weights: a density or a set of draws (see the module docstring).

    Build it with :func:`~pyro_symmetry.as_posterior`; the constructor takes exactly one
    of ``dists``, ``flat`` (with ``layout``) or ``draws``.

    Parameters
    ----------
    dists : mapping ``site -> Distribution``, optional
        Event shape of each = the site's shape.
    flat : Distribution, optional
        Over the flat latent vector ``(D,)`` of ``layout``.
    layout : FlatLayout, optional
    draws : mapping ``site -> Tensor (chain, draw, *shape)``, optional
    spec : PermutationSpec, optional
    transforms : mapping ``site -> Transform``, optional
        Unconstrained -> constrained for sites of a guide with constrained support.
    model : the Pyro model, if known (a guide's or an MCMC kernel's)
    sample_stats : mapping ``name -> Tensor (chain, draw)``, optional
        Carried to ArviZ's ``sample_stats`` group (MCMC divergences, step sizes, ...).
    name : str
        How error messages call this posterior (``"q1"``).
    source : the object it was read from (a guide keeps its identity for ``pushforward_guide``).
    """

    def __init__(
        self,
        *,
        dists: Mapping[str, td.Distribution] | None = None,
        flat: td.Distribution | None = None,
        layout: FlatLayout | None = None,
        draws: Mapping[str, torch.Tensor] | None = None,
        spec: PermutationSpec | None = None,
        transforms: Mapping[str, Any] | None = None,
        model: Any = None,
        sample_stats: Mapping[str, torch.Tensor] | None = None,
        name: str = "the posterior",
        source: Any = None,
    ) -> None:
        if sum(x is not None for x in (dists, flat, draws)) != 1:
            raise ValueError("a Posterior holds exactly one of dists, flat (with layout) or draws")
        if flat is not None and not isinstance(layout, FlatLayout):
            raise SpecError(f"{name}: a distribution over the flat latent vector needs layout=FlatLayout(...)")
        self.dists = None if dists is None else dict(dists)
        self.flat, self.layout = flat, layout
        self._draws = None if draws is None else dict(draws)
        self.spec = spec
        self.transforms = dict(transforms or {})
        self.model = model
        self.sample_stats = dict(sample_stats or {})
        self.name = name
        self.source = source
        self.sites = self._site_shapes()
        if spec is not None:
            self._check_spec(spec)

    # ------------------------------------------------------------------ layout
    def _site_shapes(self) -> dict[str, tuple[int, ...]]:
        if self.dists is not None:
            return {k: tuple(d.batch_shape) + tuple(d.event_shape) for k, d in self.dists.items()}
        if self.flat is not None:
            return dict(self.layout.shapes)
        return {k: tuple(v.shape[2:]) for k, v in self._draws.items()}

    def _check_spec(self, spec: PermutationSpec) -> None:
        for s in spec.sites:
            if s not in self.sites:
                raise SpecError(
                    f"site {s!r} is missing from {self.name} (its sites: {sorted(self.sites)}); "
                    "the spec's sites must be sites of every posterior"
                )
            want = None if spec.shapes is None else spec.shapes.get(s)
            if want is not None and tuple(want) != self.sites[s]:
                axis = next((i for i, (a, b) in enumerate(zip(want, self.sites[s])) if a != b), None)
                where = f" (axis {axis}: {self.sites[s][axis]} vs {want[axis]})" if axis is not None else ""
                raise SpecError(
                    f"site {s!r} of {self.name} has shape {self.sites[s]}, the spec expects {tuple(want)}{where}"
                )

    def with_spec(self, spec: PermutationSpec | None) -> Posterior:
        """The same posterior checked against (and acting through) ``spec``; a spec without
        shapes is bound to this posterior's site shapes."""
        if spec is None:
            return self
        if spec.shapes is None or any(s not in spec.shapes for s in spec.sites):
            self._check_spec(spec)
            spec = spec.with_shapes({**(spec.shapes or {}), **{s: self.sites[s] for s in spec.sites}})
        out = object.__new__(Posterior)
        out.__dict__.update(self.__dict__)
        out.spec = spec
        out._check_spec(spec)
        return out

    @property
    def form(self) -> str:
        """``"point"``, ``"gaussian"``, ``"distribution"`` (another density) or ``"draws"``."""
        if self._draws is not None:
            return "draws"
        if self.dists is not None and all(_is_delta(d) for d in self.dists.values()):
            return "point"
        return "gaussian" if self.is_gaussian else "distribution"

    @property
    def is_point(self) -> bool:
        return self.form == "point"

    @property
    def is_gaussian(self) -> bool:
        """Whether ``gaussian()`` is available (Normal or Delta per site, or a flat Normal family)."""
        if self.dists is not None:
            return all(isinstance(_unwrap(d), (td.Normal, dist.Delta)) for d in self.dists.values())
        if self.flat is not None:
            return isinstance(_unwrap(self.flat), (td.Normal, td.MultivariateNormal, td.LowRankMultivariateNormal))
        return False

    def distribution(self) -> td.Distribution | dict[str, td.Distribution]:
        """The density: one distribution over the flat vector, or ``site -> Distribution``."""
        if self._draws is not None:
            raise SpecError(f"{self.name} is a set of draws, not a density: it has no log_prob")
        return self.flat if self.flat is not None else dict(self.dists)

    @property
    def num_chains(self) -> int:
        return 1 if self._draws is None else next(iter(self._draws.values())).shape[0]

    # ------------------------------------------------------------------ the interface
    def gaussian(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(loc, scale)``: per-site means and marginal standard deviations (0 for points)."""
        if not self.is_gaussian:
            if self._draws is not None:
                what = "a set of draws"
            else:
                what = f"a {type(_unwrap(self.flat or next(iter(self.dists.values())))).__name__}"
            raise SpecError(f"{self.name} is {what}; a Gaussian posterior (loc, scale) or a point is needed")
        if self.flat is not None:
            d = self.flat
            return self.layout.from_flat(d.mean), self.layout.from_flat(d.stddev)
        loc, scale = {}, {}
        for k, d in self.dists.items():
            base = _unwrap(d)
            if isinstance(base, dist.Delta):
                loc[k] = base.v.expand(self.sites[k])
                scale[k] = torch.zeros_like(loc[k])
            else:
                loc[k], scale[k] = base.loc.expand(self.sites[k]), base.scale.expand(self.sites[k])
        return loc, scale

    def point(self) -> dict[str, torch.Tensor]:
        """One network: the means of a density (of Gaussian marginals), or the point itself."""
        if self._draws is not None:
            shape = next(iter(self._draws.values())).shape[:2]
            if tuple(shape) == (1, 1):
                return {k: v[0, 0] for k, v in self._draws.items()}
            raise SpecError(
                f"{self.name} is a set of {shape[0]} x {shape[1]} draws, not one network; align the draws "
                "(align_samples) or pick one"
            )
        if self.is_gaussian:
            return self.gaussian()[0]
        d = self.distribution()
        return self.layout.from_flat(d.mean) if self.flat is not None else {k: v.mean for k, v in d.items()}

    def sample(
        self, sample_shape: torch.Size | tuple = (), *, reparam: bool = False, generator: torch.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """Draws of the density, ``site -> (*sample_shape, *shape)`` (unconstrained space).

        ``generator`` makes the draws reproducible without touching torch's global RNG.
        """
        d = self.distribution()
        sample_shape = torch.Size(sample_shape)

        def one(x: td.Distribution) -> torch.Tensor:
            return x.rsample(sample_shape) if reparam else x.sample(sample_shape)

        if generator is not None:
            from .._state import fork_rng

            with fork_rng():
                torch.manual_seed(int(torch.randint(2**62, (), generator=generator)))
                return self.sample(sample_shape, reparam=reparam)
        if self.flat is not None:
            return self.layout.from_flat(one(d))
        return {k: one(v) for k, v in d.items()}

    def log_prob(self, value: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``log q(value)`` summed over sites, ``(*batch)``."""
        d = self.distribution()
        if not isinstance(value, Mapping):
            raise TypeError(f"value must be a mapping site -> tensor, got {type(value).__name__}")
        missing = [s for s in self.sites if s not in value]
        if missing:
            raise SpecError(f"sites {missing} of {self.name} are missing from the value (have {sorted(value)})")
        if self.flat is not None:
            return d.log_prob(self.layout.to_flat(value))
        return sum(v.log_prob(value[k]) for k, v in d.items())

    def draws(self, num_draws: int | None = None, *, generator: torch.Generator | None = None) -> dict:
        """``site -> (chain, draw, *shape)`` in the model's (constrained) space: the draws
        themselves, or ``num_draws`` draws of the density as one chain."""
        if self._draws is not None:
            return dict(self._draws)
        if self.is_point:
            return {k: v[None, None] for k, v in self.point().items()}
        if num_draws is None:
            raise ValueError(f"{self.name} is a density: say how many draws (num_draws=)")
        with torch.no_grad():
            values = self.sample((1, num_draws), generator=generator)
        return {k: self.transforms[k](v) if k in self.transforms else v for k, v in values.items()}

    def act(self, value: Mapping[str, torch.Tensor], g: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``g . value`` for the spec's sites (other sites unchanged)."""
        if self.spec is None:
            raise SpecError(f"{self.name} has no spec: as_posterior(x, spec) first")
        return self.spec.apply(value, g)

    def __repr__(self) -> str:
        shapes = ", ".join(f"{k}: {tuple(s)}" for k, s in list(self.sites.items())[:4])
        more = "" if len(self.sites) <= 4 else f", ... ({len(self.sites)} sites)"
        extra = f", chains={self.num_chains}" if self._draws is not None else ""
        return f"Posterior({self.form}, {{{shapes}{more}}}{extra})"
