"""The ``(loc, scale)`` and point readers of a posterior: thin views of
:func:`~pyro_symmetry.as_posterior`, the one reader of every posterior form.

``gaussian_params`` and ``point_params`` (and ``read``, what the alignment layer uses)
accept everything :func:`~pyro_symmetry.as_posterior` accepts (fitted autoguides,
``train_runs`` results, ``(loc, scale)`` / Normal / tensor mappings, state dicts and
``named_parameters()``) and return plain ``site -> tensor`` dictionaries.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .groups import SpecError
from .posteriors import as_posterior

__all__ = ["gaussian_params", "is_gaussian_mapping", "point_params", "posterior_kind", "read"]


def posterior_kind(q: Any, name: str = "the posterior") -> str:
    """``"guide"`` (a fitted or unfitted Pyro guide), ``"gaussian"`` (Gaussian marginals:
    ``(loc, scale)``/Normal mappings, ``AutoNormal``-family guides) or ``"point"``.

    Other forms :func:`~pyro_symmetry.as_posterior` reads are ``"draws"`` or
    ``"distribution"`` (see :attr:`Posterior.form <pyro_symmetry.Posterior.form>`).
    """
    if isinstance(q, torch.nn.Module) and hasattr(q, "prototype_trace"):
        return "guide"
    form = as_posterior(q, name=name).form
    return "gaussian" if form == "gaussian" else form


def is_gaussian_mapping(q: Mapping[str, Any]) -> bool:
    """Whether ``q`` is a non-empty mapping of ``(loc, scale)`` pairs or (Independent) Normals."""
    if not isinstance(q, Mapping) or not q:
        return False
    try:
        return as_posterior(q).form == "gaussian"
    except (TypeError, ValueError):
        return False


def gaussian_params(q: Any, *, detach: bool = True) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``site -> (loc, scale)`` (marginal standard deviations) of a posterior.

    Any form :func:`~pyro_symmetry.as_posterior` reads as Gaussian marginals:
    ``AutoNormal`` and the symmetrized guides, the ``AutoContinuous`` Normal family
    (``AutoDiagonalNormal``; for ``AutoLowRankMultivariateNormal``/``AutoMultivariateNormal``
    the marginal standard deviations), ``Symmetrize(guide)`` (its ``q``), ``train_runs``
    results, mappings of ``(loc, scale)`` pairs or of (Independent) Normal distributions.
    Values are detached unless ``detach=False`` (then a guide's live parameters and
    tensors that require grad keep their graph). A meta-device or mixed-device posterior
    raises a ``ValueError`` naming the site; a point raises a :class:`SpecError`.
    """
    kind, loc, scale = read(q, detach=detach)
    if kind == "point":
        raise SpecError("a Gaussian posterior is needed (loc and scale) but got a mapping of point tensors")
    return {k: (loc[k], scale[k]) for k in loc}


def point_params(q: Any, *, detach: bool = True) -> dict[str, torch.Tensor]:
    """``site -> tensor`` point values: the posterior means of a Gaussian posterior
    (guide or mapping), or the tensors of a point (a mapping, a state dict, an
    ``AutoDelta``) themselves (detached unless ``detach=False``; on one device, none on
    the meta device)."""
    return read(q, detach=detach)[1]


def read(
    q: Any, name: str | None = None, *, detach: bool = True
) -> tuple[str, dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """``(form, means or points, standard deviations or None)`` of a posterior.

    ``form`` is ``"point"`` or ``"gaussian"``; any other posterior (draws, a mixture)
    raises a :class:`SpecError` saying what it is. Every tensor is checked by
    :func:`~pyro_symmetry.as_posterior` (values, not on the meta device; one device;
    finite; scales non-negative); error messages name ``name[site]`` (or
    ``loc[site]``/``params[site]`` without a name). With ``detach`` (the default) the
    values carry no autograd graph.
    """
    post = as_posterior(q, name=name, detach=detach)
    if post.form == "point":
        return "point", post.point(), None
    loc, scale = post.gaussian()  # raises, naming the form, when there are no Gaussian marginals
    return "gaussian", loc, scale
