"""Canonical forms: one representative per symmetry orbit of a network.

Two networks (or posterior samples) that differ by a weight-space symmetry compute the
same function, but look different coordinate by coordinate: permuted neurons, rescaled
ReLU neurons, flipped tanh neurons. Mapping every sample to a canonical representative
of its orbit before comparing them (marginals, MMD, R-hat) removes these artificial
differences (Laurent, Aldea, Franchi, ICLR 2024):

1. the continuous / sign symmetries of the activations: minimum-mass rescaling for
   positively homogeneous activations (:func:`~pyro_symmetry.scaling.min_mass`), a
   sign convention for odd ones (:func:`~pyro_symmetry.scaling.sign_convention`);
2. the permutations: sort the neurons of each layer by a key, or align every sample to
   a reference (:func:`~pyro_symmetry.alignment.align_samples`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._shapes import broadcast_shapes
from .._validation import check_devices, check_int, check_params, check_seed, check_spec
from ..groups import PermutationSpec, SpecError
from ..posterior import point_params
from ._axes import detached, group_spans, groups_with, unit_rows
from .minimum_mass import min_mass
from .rescaling import mass_of_site
from .signs import flip_signs, sign_convention

__all__ = ["CanonicalForm", "canonicalize", "sort_permutation"]

_ALIGN_EXPONENT = 30  # samples whose largest |weight| is beyond 2**+-30 are aligned after scaling

SortKey = str | int | Callable[[Mapping[str, torch.Tensor], PermutationSpec, str], torch.Tensor]


@dataclass(frozen=True, repr=False)
class CanonicalForm:
    """Result of :func:`canonicalize`.

    ``params == spec.apply(flip_signs(rescale(input, spec, log_scales), spec, signs), permutation)``.

    Attributes
    ----------
    params : dict ``site -> Tensor (*batch, *site_shape)``
        The canonical representatives.
    log_scales : dict ``group -> Tensor (*batch, n)``
        Minimum-mass log-scales of the ``"scale"`` groups (input neuron order).
    signs : dict ``group -> BoolTensor (*batch, n)``
        Flips of the ``"sign"`` groups (input neuron order; ``True`` = negated).
    permutation : dict ``group -> LongTensor (*batch, n)``
        The permutation applied last (identity where none was applied).
    reference : dict ``site -> Tensor`` or None
        The reference the samples were aligned to (``permutation="align"``).
    """

    params: dict[str, torch.Tensor]
    log_scales: dict[str, torch.Tensor]
    signs: dict[str, torch.Tensor]
    permutation: dict[str, torch.Tensor]
    reference: dict[str, torch.Tensor] | None

    def __repr__(self) -> str:
        # every per-group tensor is (*batch, n): its leading dims are the batch
        per_group = [*self.permutation.values(), *self.log_scales.values(), *self.signs.values()]
        batch = tuple(per_group[0].shape[:-1]) if per_group else "?"
        return (
            f"CanonicalForm(sites={len(self.params)}, batch={batch}, scaled={sorted(self.log_scales)}, "
            f"signed={sorted(self.signs)}, permuted={sorted(self.permutation)}, "
            f"aligned={self.reference is not None})"
        )


def _incoming_rows(params: Mapping[str, torch.Tensor], spec: PermutationSpec, group: str) -> list[torch.Tensor]:
    """Each incoming span of ``group`` as ``(*batch, *unit_shape, m)`` (one row per unit)."""
    return [unit_rows(params[a.site], a, span) for a, span in group_spans(spec, group, "incoming")]


def _incoming_norm(rows: list[torch.Tensor], k: int) -> torch.Tensor:
    """``sqrt(sum of squared incoming entries)`` per unit (``k`` unit dims), in float64 and
    scaled per sample by a power of two: weights around ``1e20`` (whose squares overflow
    float32) or ``1e-25`` (whose squares underflow it) are ordered as exactly as weights near 1."""
    dims = tuple(range(-k - 1, 0))
    big = functools.reduce(torch.maximum, [r.detach().abs().amax(dims).double() for r in rows])
    e = torch.frexp(big).exponent.masked_fill(big == 0, 0)[(...,) + (None,) * (k + 1)]
    return sum(torch.ldexp(r.double(), -e).square().sum(-1) for r in rows).sqrt()


def _sort_key(params: Mapping[str, torch.Tensor], spec: PermutationSpec, group: str, key: SortKey) -> torch.Tensor:
    shape = spec.unit_shape(group)
    if callable(key):
        values = key(params, spec, group)
        if (
            not isinstance(values, torch.Tensor)
            or values.dim() < len(shape)
            or tuple(values.shape[values.dim() - len(shape) :]) != shape
        ):
            want = ", ".join(map(str, shape))
            raise SpecError(
                f"sort_key returned {getattr(values, 'shape', type(values))} for group {group!r}; expected a tensor "
                f"(*batch, {want})"
            )
        return values
    rows = _incoming_rows(params, spec, group)
    if not rows:
        raise SpecError(f"group {group!r} has no incoming axes to read a sort key from")
    if key == "incoming_norm":
        return _incoming_norm(rows, len(shape))
    if isinstance(key, int) and not isinstance(key, bool):
        row = rows[0]
        if not -row.shape[-1] <= key < row.shape[-1]:
            raise ValueError(f"sort_key={key} is out of range: group {group!r} has {row.shape[-1]} incoming weights")
        return row[..., key]
    raise ValueError(
        f"sort_key must be 'incoming_norm', an int (an incoming weight's index) or a callable; got {key!r}"
    )


def sort_permutation(
    params: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    key: SortKey = "incoming_norm",
    groups: list[str] | None = None,
) -> dict[str, torch.Tensor]:
    """The permutation that sorts every group's neurons by a key, in descending order.

    Groups are visited in spec order (input to output for built specs) and each
    group's key is read after the earlier groups are sorted, so a key that reads
    weights indexed by the previous layer (an ``int`` key) is itself canonical.

    Parameters
    ----------
    params : mapping ``site -> Tensor (*batch, *site_shape)``
    spec : PermutationSpec
    key : "incoming_norm", int or callable
        ``"incoming_norm"``: the L2 norm of the neuron's incoming weights and bias
        (invariant to every other group's permutations and sign flips; after
        min-mass its weight part equals the norm of the outgoing weights; computed in
        float64 with a per-sample power-of-two scaling, so any magnitude sorts
        exactly). ``int k``: the neuron's ``k``-th
        incoming weight (Laurent et al. sort by one chosen incoming weight). A
        callable ``key(params, spec, group) -> Tensor (*batch, n)``.
    groups : list of str, optional
        Default: every group. A nested group (attention dims within heads) is sorted
        within each slot of its parent, after the parent: list parents first.

    Returns
    -------
    dict ``group -> LongTensor (*batch, *unit_shape)``
        (Not differentiable: inputs that require grad are read as values.)
        ``spec.apply(params, perm)`` has each group's keys in descending order (a
        stable sort: ties keep their order, so sorted input maps to the identity).
    """
    check_spec(spec)
    if isinstance(params, Mapping):
        check_devices({f"params[{s!r}]": params.get(s) for s in spec.sites})
        params = detached(params)  # an index permutation: no gradient is meant
    check_params(params, spec)
    if isinstance(groups, str):
        raise TypeError(f"groups must be a list of group names, got {groups!r}")
    groups = list(spec.groups) if groups is None else list(groups)
    unknown = [g for g in groups if g not in spec.groups]
    if unknown:
        raise SpecError(f"groups {unknown} are not in the spec (groups: {sorted(spec.groups)})")
    current = dict(params)
    perm: dict[str, torch.Tensor] = {}
    device = next(v.device for v in params.values() if isinstance(v, torch.Tensor))
    identity = spec.identity(device=device)
    for g in groups:
        values = _sort_key(current, spec, g, key)
        perm[g] = torch.sort(values, dim=-1, descending=True, stable=True).indices
        if g != groups[-1]:
            current = spec.apply(current, {**identity, g: perm[g]})
    for k, v in identity.items():
        perm.setdefault(k, v)
    return perm


def _batch_shape(params: Mapping[str, torch.Tensor], spec: PermutationSpec) -> torch.Size:
    shapes = []
    for site in spec.sites:
        nd = spec.action(site).event_ndim
        x = params[site]
        shapes.append(x.shape[: x.dim() - nd])
    return broadcast_shapes(*shapes)


def _distance(x: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], spec: PermutationSpec) -> torch.Tensor:
    """``sum_sites ||x - ref||^2`` per sample: ``(*batch,)``, float64 (float32 weights
    around ``1e20`` would overflow a float32 sum of squares and make every distance Inf)."""
    total = None
    for site in spec.sites:
        d = mass_of_site(x[site] - ref[site], spec.action(site).event_ndim)
        total = d if total is None else total + d
    return total


def _where_batch(mask: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``where(mask, a, b)`` with ``mask`` over the leading batch dims."""
    out = broadcast_shapes(a.shape, b.shape)
    return torch.where(mask.reshape(mask.shape + (1,) * (len(out) - mask.dim())), a, b)


def _remove_activation_symmetries(
    params: Mapping[str, torch.Tensor], spec: PermutationSpec, options: Mapping[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Min-mass (``options``: ``tol``, ``max_iters``, ``include_biases``), then the sign convention."""
    x = dict(params)
    log_scales: dict[str, torch.Tensor] = {}
    signs: dict[str, torch.Tensor] = {}
    if groups_with(spec, "scale"):
        res = min_mass(x, spec, **options)
        x, log_scales = res.params, res.log_scales
    if groups_with(spec, "sign"):
        signs = sign_convention(x, spec)
        x = flip_signs(x, spec, signs)
    return x, log_scales, signs


def canonicalize(
    params_or_samples: Mapping[str, torch.Tensor],
    spec: PermutationSpec,
    *,
    scaling: bool = True,
    permutation: str | None = "align",
    reference: None | str | Mapping[str, Any] = None,
    sort_key: SortKey = "incoming_norm",
    tol: float | None = None,
    max_iters: int = 10_000,
    include_biases: bool = False,
    seed: int | None = 0,
    max_sweeps: int = 100,
) -> CanonicalForm:
    """One canonical representative per symmetry orbit, for a network or a batch of samples.

    1. ``scaling=True``: groups with ``activation_symmetry == "scale"`` (ReLU) are
       rescaled to minimum mass (:func:`~pyro_symmetry.scaling.min_mass`); groups with
       ``"sign"`` (tanh) get the sign convention "outgoing weights sum to a positive
       number" (:func:`~pyro_symmetry.scaling.sign_convention`). Both commute with the
       permutations, so afterwards only the permutations remain.
    2. ``permutation="sort"``: each group's neurons are sorted by ``sort_key``
       (:func:`sort_permutation`), per sample, vectorized. Exactly invariant: every
       element of an orbit maps to the same point (up to the min-mass tolerance).
       ``permutation="align"``: every sample is aligned to a reference by weight
       matching (:func:`~pyro_symmetry.alignment.align_samples`; with ``scaling=True``
       the signs are already fixed, so only permutations are searched). More robust
       when keys are close (neurons of similar norm), but a local optimum of a
       coordinate descent, exact for planted permutations of the reference.
       ``None``: no permutation step.

    **Norm layers.** Only the scaling symmetries the spec declares are removed: a
    channel's scale before a BatchNorm/LayerNorm (a free symmetry of the normalized
    function, along which min-mass is degenerate, Laurent et al.) is not one of them:
    :meth:`~pyro_symmetry.PermutationSpec.from_module` marks the pre-norm rows, biases
    and running statistics *passive*, so they are only permuted, never rescaled or
    sign-flipped; the channel's scale is fixed on the norm's affine weight and bias and
    the next layers' columns (see :func:`~pyro_symmetry.scaling.min_mass`). Every element
    of a ResNet's or a transformer's orbit (rescaling, signed permutation) maps to one
    canonical form (``tests/test_scaling_norms.py``). Nested groups (the q/k and v
    dimensions of each attention head) get the sign convention per (head, dim) and are
    sorted within each head slot after the heads are sorted; groups acting on slices of
    an axis (fused q/k/v heads) are sorted by the norm of all their slices.

    Applying ``canonicalize`` to its own output changes nothing (idempotent): min-mass
    and the sign convention are idempotent, a sorted network is its own sort, and an
    alignment is kept only where it brings a sample strictly closer to the reference
    (so an aligned sample stays put when aligned again to the same reference).

    Parameters
    ----------
    params_or_samples : mapping ``site -> Tensor (*batch, *site_shape)``
        One network or a batch of samples / runs (any leading dims).
    spec : PermutationSpec
    scaling : bool
        Remove the activations' scaling / sign symmetries first.
    permutation : {"align", "sort", None}
    reference : None, "barycenter" or mapping ``site -> Tensor (*site_shape)``
        For ``"align"``: ``None`` aligns to the first sample (index 0 of every batch
        dim) with its neurons sorted by ``sort_key`` (so a single network gets its
        sorted form, and members of one orbit meet), ``"barycenter"`` to the
        iteratively refined mean of the aligned samples, a mapping (point values, or
        ``(loc, scale)`` pairs whose means are used) to that network, itself first put
        in canonical scaling / signs.
    sort_key : "incoming_norm", int or callable
        For ``"sort"`` (and the default ``"align"`` reference), see
        :func:`sort_permutation`.
    tol, max_iters, include_biases
        Passed to :func:`~pyro_symmetry.scaling.min_mass` (by default the mass counts
        the weights only, as Laurent et al.'s does).
    seed, max_sweeps
        Passed to :func:`~pyro_symmetry.alignment.align_samples`.

    Returns
    -------
    CanonicalForm
        ``(params, log_scales, signs, permutation, reference)``. Not differentiable:
        inputs that require grad are read as values and every returned tensor is
        detached (a canonical form is chosen by discrete and iterative steps). With
        ``reference="barycenter"`` and ``scaling=True`` the returned reference is the
        barycenter put in canonical scaling, and the samples are aligned to it, so that
        passing it back as ``reference`` reproduces the result.

    Examples
    --------
    >>> model = ps.models.BayesianMLP(64, [32], 10, activation="relu")
    >>> canon = ps.canonicalize(samples, model.spec, permutation="sort")
    >>> canon.params["fc1.weight"].shape          # samples["fc1.weight"].shape

    References
    ----------
    Laurent, Aldea, Franchi (ICLR 2024), A Symmetry-Aware Exploration of Bayesian Neural
    Network Posteriors; Ainsworth, Hayase, Srinivasa (ICLR 2023), Git Re-Basin.
    """
    if not isinstance(params_or_samples, Mapping) or not params_or_samples:
        raise TypeError(f"params_or_samples must be a non-empty mapping site -> tensor, got {type(params_or_samples)}")
    check_spec(spec)
    check_devices({f"params_or_samples[{s!r}]": params_or_samples.get(s) for s in spec.sites})
    params_or_samples = detached(params_or_samples)  # a canonical form carries no graph
    check_params(params_or_samples, spec, name="params_or_samples")
    if permutation not in ("align", "sort", None):
        raise ValueError(f"permutation must be 'align', 'sort' or None, got {permutation!r}")
    if reference is not None and permutation != "align":
        raise ValueError("reference is only used with permutation='align'")
    if not (reference is None or isinstance(reference, Mapping) or reference == "barycenter"):
        raise ValueError(f"reference must be None, 'barycenter' or a mapping site -> tensor, got {reference!r}")
    if not isinstance(scaling, bool):
        raise TypeError(f"scaling must be a bool, got {scaling!r}")
    if not isinstance(include_biases, bool):
        raise TypeError(f"include_biases must be a bool, got {include_biases!r}")
    check_int("max_iters", max_iters, minimum=0)
    check_int("max_sweeps", max_sweeps, minimum=0)
    check_seed("seed", seed)

    options = dict(tol=tol, max_iters=max_iters, include_biases=include_biases)
    if scaling:
        x, log_scales, signs = _remove_activation_symmetries(params_or_samples, spec, options)
    else:
        x, log_scales, signs = dict(params_or_samples), {}, {}
    batch = _batch_shape(x, spec)
    device = x[spec.sites[0]].device
    ref_out = None
    if permutation == "sort":
        perm = sort_permutation(x, spec, sort_key)
        x = spec.apply(x, perm)
    elif permutation == "align":
        x, perm, ref_out = _align(x, spec, reference, scaling, sort_key, options, seed, max_sweeps)
    else:
        perm = {}
    for k, v in spec.identity(device=device).items():
        if k not in perm:
            perm[k] = v.expand(tuple(batch) + tuple(v.shape))
    return CanonicalForm(params=x, log_scales=log_scales, signs=signs, permutation=perm, reference=ref_out)


def _align_samples_scaled(
    x: dict[str, torch.Tensor], spec: PermutationSpec, ref: Any, seed: int | None, max_sweeps: int
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``(permutation, aligned, reference)`` of ``align_samples`` on samples (and
    reference) brought near unit magnitude.

    Weight matching maximizes ``<x, g.ref>``, which does not change when the samples and
    the reference are multiplied by one positive constant. Samples whose largest weight
    is far from 1 (``1e20`` or ``1e-25`` in float32, where the products overflow or
    underflow) are aligned after scaling everything by one power of two; the permutations
    are then applied to the unscaled samples (exact) and the reference scaled back.
    """
    from ..alignment import align_samples

    tensors = [x[s] for s in spec.sites] + ([ref[s] for s in spec.sites] if isinstance(ref, Mapping) else [])
    big = max(float(t.detach().abs().max()) for t in tensors if t.numel())
    e = math.frexp(big)[1] if big > 0 else 0
    if abs(e) <= _ALIGN_EXPONENT:
        res = align_samples(x, spec, ref, seed=seed, max_sweeps=max_sweeps)
        return res.permutation, res.aligned, res.reference
    scaled = {**x, **{s: torch.ldexp(x[s], torch.tensor(-e)) for s in spec.sites}}
    if isinstance(ref, Mapping):
        ref = {**ref, **{s: torch.ldexp(ref[s], torch.tensor(-e)) for s in spec.sites}}
    res = align_samples(scaled, spec, ref, seed=seed, max_sweeps=max_sweeps)
    aligned = {**res.aligned, **spec.apply({s: x[s] for s in spec.sites}, res.permutation)}
    reference = {**res.reference, **{s: torch.ldexp(res.reference[s], torch.tensor(e)) for s in spec.sites}}
    return res.permutation, aligned, reference


def _align(
    x: dict[str, torch.Tensor],
    spec: PermutationSpec,
    reference: None | str | Mapping[str, Any],
    scaling: bool,
    sort_key: SortKey,
    options: Mapping[str, Any],
    seed: int | None,
    max_sweeps: int,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The alignment step of :func:`canonicalize`: ``(aligned, permutation, reference)``."""
    ref: Any = reference
    if reference is None:
        # The first sample in sorted order: a reference that is itself canonical, so every
        # element of an orbit (one network, or the first of a batch) meets the same one.
        first = {s: x[s][(0,) * (x[s].dim() - spec.action(s).event_ndim)] for s in spec.sites}
        ref = spec.apply(first, sort_permutation(first, spec, sort_key))
    elif isinstance(reference, Mapping):
        check_devices({f"reference[{k!r}]": v for k, v in reference.items()})
        ref = detached(point_params(reference))  # a (loc, scale) mapping is aligned by its means
        if scaling:
            ref.update(_remove_activation_symmetries({k: ref[k] for k in spec.sites}, spec, options)[0])
    # After the sign convention only permutations are left to search.
    align_spec = spec.without_signs() if scaling else spec
    found, moved, ref_out = _align_samples_scaled(x, align_spec, ref, seed, max_sweeps)
    if reference == "barycenter" and scaling and groups_with(spec, "scale"):
        # The mean of min-mass networks is not min-mass: put the barycenter in canonical
        # scaling and align to it, so that it is a reference this function reproduces.
        bary = _remove_activation_symmetries({k: ref_out[k] for k in spec.sites}, spec, options)[0]
        found, moved, ref_out = _align_samples_scaled(x, align_spec, {**ref_out, **bary}, seed, max_sweeps)
    # Keep a sample as it is unless the alignment brings it closer to the reference:
    # the result is then never worse than its input, and a second call (whose input
    # is already aligned) changes nothing unless it finds a strictly better match.
    keep = _distance(x, ref_out, spec) <= _distance(moved, ref_out, spec)
    perm = {k: torch.where(keep[..., None], torch.arange(p.shape[-1], device=p.device), p) for k, p in found.items()}
    aligned = {**moved, **{s: _where_batch(keep, x[s], moved[s]) for s in spec.sites}}
    return aligned, perm, ref_out
