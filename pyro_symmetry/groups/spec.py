"""Permutation (and signed-permutation) groups acting on a network's parameters.

A network's parameters are a mapping ``site name -> tensor`` (Pyro sample-site names
such as ``"fc1.weight"``), optionally with leading batch dimensions. A
:class:`PermutationSpec` names each *neuron group* (a hidden layer, or a set of
channels), its size, and the ``(site, axis)`` pairs it acts on. A group element
is a mapping ``group name -> LongTensor`` of shape ``(*batch, n)``: a permutation,
or a *signed* permutation (``p[i] < 0`` means "take neuron ``~p[i]`` and negate it",
see :mod:`pyro_symmetry.groups._indexing`) for groups whose activation is odd.

Convention: ``apply(w, p)`` maps ``w[..., i, ...]`` to ``w[..., p[i], ...]`` along
every axis the group touches, i.e. ``W_l -> P_l W_l P_{l-1}^T`` with
``P[i, p[i]] = 1``; ``apply(apply(w, b), a) == apply(w, compose(a, b))``.

This module holds the data model (axes, groups, spec) and the group law; how an element
acts on a site lives in :mod:`.action` (the one place that reads axes), the law of nested
groups in :mod:`._elements`. ``docs/architecture.md`` shows where a new symmetry plugs in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from .._shapes import broadcast_shapes
from .._validation import check_batch_shape, check_int, check_mapping
from . import _elements, _layout
from ._indexing import encode_signed
from .action import SiteAction, Span

__all__ = [
    "ACTIVATION_SYMMETRIES",
    "Axis",
    "GroupElement",
    "NeuronGroup",
    "PermutationSpec",
    "SpecError",
]

GroupElement = Mapping[str, torch.Tensor]
ACTIVATION_SYMMETRIES = ("none", "sign", "scale")

#: Largest ``|G|`` that :meth:`PermutationSpec.elements` will enumerate.
MAX_ENUMERATION = 100_000


class SpecError(ValueError):
    """A spec that does not match a model, parameters, or a group element."""


class Axis(NamedTuple):
    """One ``(site, axis)`` pair a neuron group acts on.

    ``axis`` counts from the left of the site's own shape when non-negative (the
    spec then needs the site's shape, see :meth:`PermutationSpec.with_shapes`), or
    from the right when negative (Pyro's convention; works with any batch dims).
    ``inner`` > 1 means the axis holds ``size`` contiguous blocks of ``inner``
    entries, one block per neuron (a linear layer after flattening conv channels).
    ``start`` makes the axis a *slice*: the group acts on entries
    ``[start, start + size * inner)`` only (the q, k and v parts of a fused attention
    projection); without it the group's blocks must cover the whole axis.
    """

    site: str
    axis: int
    inner: int = 1
    ndim: int | None = None  # the site's own number of dims, if known
    start: int | None = None  # first entry of a slice; None: the whole axis


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_axis(entry: Any, where: str) -> Axis:
    if isinstance(entry, (tuple, list)) and 2 <= len(entry) <= 5:
        site, axis, inner, ndim, start = (*entry, *(1, None, None)[len(entry) - 2 :])
        if (
            isinstance(site, str)
            and _is_int(axis)
            and _is_int(inner)
            and inner >= 1
            and (ndim is None or (_is_int(ndim) and ndim >= 0))
            and (start is None or (_is_int(start) and start >= 0))
        ):
            return Axis(site, axis, inner, ndim, start)
    raise SpecError(
        f"{where}: entry {entry!r} is not a (site: str, axis: int[, inner: int >= 1[, ndim: int >= 0"
        "[, start: int >= 0]]]) tuple"
    )


def _as_axes(entries: Any, where: str) -> tuple[Axis, ...]:
    if isinstance(entries, (str, bytes)) or not isinstance(entries, Iterable):
        raise SpecError(f"{where} must be a sequence of (site, axis) pairs, got {entries!r}")
    return tuple(_as_axis(e, f"{where}[{i}]") for i, e in enumerate(entries))


def _check_shapes(shapes: Any) -> dict[str, tuple[int, ...]]:
    """``site -> shape`` with every shape a sequence of non-negative ints."""
    if not isinstance(shapes, Mapping):
        raise SpecError(f"shapes must be a mapping site -> shape, got {type(shapes).__name__}")
    out = {}
    for site, shape in shapes.items():
        if not isinstance(site, str):
            raise SpecError(f"site names must be str, got {site!r} ({type(site).__name__})")
        try:
            out[site] = check_batch_shape(f"shapes[{site!r}]", shape)
        except (TypeError, ValueError) as e:
            raise SpecError(str(e)) from None
    return out


@dataclass(frozen=True)
class NeuronGroup:
    """A set of interchangeable neurons (a hidden layer, a set of channels, attention heads).

    Parameters
    ----------
    size : int
        Number of neurons ``n``.
    incoming : sequence of ``(site, axis)``
        Axes that index the neurons' own parameters: rows of the layer's weight,
        its bias, a norm layer's affine weight and bias. Scaled by ``lam`` under rescaling.
    outgoing : sequence of ``(site, axis)``
        Axes of the next layer's parameters that read these neurons (columns).
        Divided by ``lam`` under rescaling.
    activation_symmetry : {"none", "sign", "scale"}
        Extra symmetry of the activation: ``"sign"`` for odd activations (tanh):
        the group is the signed permutations, ``|G_l| = n! 2^n``; ``"scale"`` for
        positively homogeneous ones (ReLU): a continuous rescaling symmetry on top
        of the permutations (see :mod:`pyro_symmetry.scaling`). Read it through
        :attr:`signed` and :attr:`scalable`.
    passive : sequence of ``(site, axis)``, keyword-only
        Axes that are permuted with the neurons but neither rescaled nor sign-flipped:
        the rows and bias of a layer whose output goes straight into a BatchNorm, and the
        BatchNorm's running statistics (the scale before a normalization is normalized
        away; the channel's scaling and sign symmetry act on the norm's affine weight).
    parent : str, optional, keyword-only
        Makes this a *nested* group: it permutes units within each block of the parent
        group (attention dims within each head, channels within a GroupNorm group), one
        permutation per parent slot: the wreath product ``S_n wr S_H``. Each of its axes
        must be an axis of the parent whose ``inner`` is ``size * inner``. Parents of
        nested groups have no sign or scale symmetry; nested groups have no scale symmetry.
    """

    size: int
    incoming: tuple[Axis, ...] = ()
    outgoing: tuple[Axis, ...] = ()
    activation_symmetry: str = "none"
    passive: tuple[Axis, ...] = field(default=(), kw_only=True)
    parent: str | None = field(default=None, kw_only=True)

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise SpecError(f"NeuronGroup size must be a positive int, got {self.size!r}")
        for role in ("incoming", "outgoing", "passive"):
            object.__setattr__(self, role, _as_axes(getattr(self, role), f"NeuronGroup {role}"))
        if self.activation_symmetry not in ACTIVATION_SYMMETRIES:
            raise SpecError(
                f"activation_symmetry must be one of {ACTIVATION_SYMMETRIES}, got {self.activation_symmetry!r}"
            )
        if not self.axes:
            raise SpecError("a NeuronGroup must act on at least one (site, axis)")
        if self.parent is not None:
            if not isinstance(self.parent, str):
                raise SpecError(f"NeuronGroup parent must be a group name (str), got {self.parent!r}")
            if self.activation_symmetry == "scale":
                raise SpecError("a nested NeuronGroup (parent=...) cannot have activation_symmetry='scale'")

    @property
    def axes(self) -> tuple[Axis, ...]:
        return self.incoming + self.outgoing + self.passive

    def roles(self) -> Iterable[tuple[str, Axis]]:
        """``(role, axis)`` for every axis: role in ``incoming``/``outgoing``/``passive``."""
        for role in ("incoming", "outgoing", "passive"):
            for ax in getattr(self, role):
                yield role, ax

    @property
    def signed(self) -> bool:
        """Whether the group includes sign flips (signed permutations; odd activations)."""
        return self.activation_symmetry == "sign"

    @property
    def scalable(self) -> bool:
        """Whether positive per-neuron rescaling is a symmetry (positively homogeneous activations)."""
        return self.activation_symmetry == "scale"


@dataclass(frozen=True)
class PermutationSpec:
    """The symmetry group of a network, acting on its parameter sites.

    Parameters
    ----------
    groups : mapping ``name -> NeuronGroup``
    shapes : mapping ``site -> shape``, optional
        The sites' own (unbatched) shapes. Needed when axes are given as
        non-negative numbers; when present every axis is checked against it.

    Examples
    --------
    >>> spec = PermutationSpec({
    ...     "h1": NeuronGroup(16, incoming=[("fc1.weight", -2), ("fc1.bias", -1)],
    ...                       outgoing=[("fc2.weight", -1)]),
    ... })
    >>> perm = spec.sample()
    >>> params2 = spec.apply(params, perm)   # same function, permuted weights

    References
    ----------
    Ainsworth, Hayase, Srinivasa (2023), Git Re-Basin; Gelberg et al. (2024).
    """

    groups: Mapping[str, NeuronGroup]
    shapes: Mapping[str, tuple[int, ...]] | None = None
    _resolved: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.groups, Mapping):
            raise SpecError(f"groups must be a mapping name -> NeuronGroup, got {type(self.groups).__name__}")
        groups = dict(self.groups)
        for name, g in groups.items():
            if not isinstance(name, str):
                raise SpecError(f"group names must be str, got {name!r} ({type(name).__name__})")
            if not isinstance(g, NeuronGroup):
                raise SpecError(f"group {name!r} is a {type(g).__name__}, expected a NeuronGroup")
        object.__setattr__(self, "groups", groups)
        if self.shapes is not None:
            object.__setattr__(self, "shapes", _check_shapes(self.shapes))
        self._resolve()

    # ------------------------------------------------------------------ layout
    def _resolve(self) -> None:
        _layout.resolve(self)

    def _units(self, name: str) -> int:
        """Entries (in units of the axis' ``inner``) a group's span covers: ``n`` or ``H * n``."""
        g = self.groups[name]
        return g.size if g.parent is None else g.size * self.groups[g.parent].size

    def _event_ndim(self, site: str, batched: bool) -> int:
        return _layout.event_ndim(self, site, batched)

    def action(self, site: str, batched: bool = True) -> SiteAction:
        """How the spec's groups act on ``site`` (see :class:`~pyro_symmetry.groups.action.SiteAction`).

        ``batched=False`` allows a site whose shape the spec does not know, given by
        negative axes only, to be read with the fewest event dims (unbatched elements).
        """
        nd = self._event_ndim(site, batched)
        cache = self._resolved["actions"]
        if (site, nd) not in cache:
            spans = []
            for name, role, ax, neg in self._resolved["table"][site]:
                g = self.groups[name]
                shape = (g.size,) if g.parent is None else (self.groups[g.parent].size, g.size)
                axis = nd + neg if neg is not None else ax.axis
                spans.append(Span(name, site, axis, ax.start or 0, shape, ax.inner, role, ax.start is None))
            cache[(site, nd)] = SiteAction(site, nd, spans, self.groups)
        return cache[(site, nd)]

    # ------------------------------------------------------------------ basics
    @property
    def sizes(self) -> dict[str, int]:
        """``group name -> number of neurons`` (per parent slot for nested groups)."""
        return {k: g.size for k, g in self.groups.items()}

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites any group acts on, in first-seen order."""
        return tuple(self._resolved["table"])

    def children(self, name: str) -> list[str]:
        """Names of the groups nested in group ``name``."""
        return [k for k, g in self.groups.items() if g.parent == name]

    @property
    def top_level(self) -> tuple[str, ...]:
        """Names of the groups that are not nested."""
        return tuple(k for k, g in self.groups.items() if g.parent is None)

    def unit_shape(self, name: str) -> tuple[int, ...]:
        """Shape of group ``name``'s entry in an element: ``(n,)``, or ``(H, n)`` when nested."""
        return _elements.unit_shape(self, name)

    def _group_log_order(self, g: NeuronGroup) -> float:
        one = math.lgamma(g.size + 1) + (g.size * math.log(2.0) if g.signed else 0.0)
        return one * (1 if g.parent is None else self.groups[g.parent].size)

    @property
    def log_order(self) -> float:
        """``log |G| = sum_l lgamma(n_l + 1) (+ n_l log 2 for sign-flip groups)``, nested
        groups counted once per parent slot."""
        return float(sum(self._group_log_order(g) for g in self.groups.values()))

    @property
    def order(self) -> int:
        """``|G|`` as an exact integer."""
        out = 1
        for g in self.groups.values():
            one = math.factorial(g.size) * (2**g.size if g.signed else 1)
            out *= one ** (1 if g.parent is None else self.groups[g.parent].size)
        return out

    def with_shapes(self, shapes: Mapping[str, Sequence[int]]) -> PermutationSpec:
        """The same spec, checked against and bound to the given site shapes."""
        return PermutationSpec(self.groups, _check_shapes(shapes))

    def replace_groups(self, groups: Mapping[str, NeuronGroup]) -> PermutationSpec:
        return PermutationSpec(groups, self.shapes)

    def with_prefix(self, prefix: str) -> PermutationSpec:
        """The same spec with ``prefix`` put before every site name (and group name): the
        spec of a sub-module ``net`` used inside a model whose sites are ``"net.fc1.weight"``."""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str, got {type(prefix).__name__}")

        def move(axes: tuple[Axis, ...]) -> tuple[Axis, ...]:
            return tuple(ax._replace(site=prefix + ax.site) for ax in axes)

        groups = {
            prefix + k: replace(
                g,
                incoming=move(g.incoming),
                outgoing=move(g.outgoing),
                passive=move(g.passive),
                parent=None if g.parent is None else prefix + g.parent,
            )
            for k, g in self.groups.items()
        }
        shapes = None if self.shapes is None else {prefix + k: v for k, v in self.shapes.items()}
        return PermutationSpec(groups, shapes)

    def _device(self, device: Any) -> torch.device:
        return torch.device("cpu") if device is None else torch.device(device)

    # ------------------------------------------------------------------ group law
    def identity(self, batch_shape: Sequence[int] = (), device: Any = None) -> dict[str, torch.Tensor]:
        """The identity element, optionally expanded to ``batch_shape``."""
        batch_shape = check_batch_shape("batch_shape", batch_shape)
        return _elements.identity(self, batch_shape, self._device(device))

    def sample(
        self,
        batch_shape: Sequence[int] = (),
        generator: torch.Generator | None = None,
        device: Any = None,
        signed: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Draw uniform group elements, shape ``(*batch_shape, *unit_shape)`` per group.

        For sign-flip groups (odd activations) the element is a uniform *signed*
        permutation unless ``signed=False``. ``generator`` makes draws reproducible.
        """
        batch_shape = check_batch_shape("batch_shape", batch_shape)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        dev = generator.device if generator is not None else self._device(device)
        return _elements.sample(self, batch_shape, generator, dev, signed)

    def _check_element(self, perm: GroupElement, what: str = "perm") -> torch.Size:
        return _elements.check_element(self, perm, what)

    def validate(self, perm: GroupElement, what: str = "perm") -> torch.Size:
        """Raise :class:`SpecError` unless ``perm`` is a valid (batched) group element;
        return its batch shape."""
        return _elements.check_element(self, perm, what)

    def inverse(self, perm: GroupElement) -> dict[str, torch.Tensor]:
        """``inverse(p)`` with ``apply(apply(w, p), inverse(p)) == w``."""
        self._check_element(perm)
        return _elements.inverse(self, perm)

    def compose(self, a: GroupElement, b: GroupElement) -> dict[str, torch.Tensor]:
        """``compose(a, b)``, the element "first ``b``, then ``a``".

        ``apply(apply(w, b), a) == apply(w, compose(a, b))``; batch dims broadcast.
        """
        batch_a = self._check_element(a, "a")
        batch_b = self._check_element(b, "b")
        try:
            broadcast_shapes(batch_a, batch_b)
        except RuntimeError:
            raise SpecError(
                f"a has batch shape {tuple(batch_a)} and b {tuple(batch_b)}: they do not broadcast"
            ) from None
        return _elements.compose(self, a, b)

    def elements(self, device: Any = None, max_order: int = MAX_ENUMERATION) -> dict[str, torch.Tensor]:
        """All ``|G|`` elements, stacked along a leading dim (exact enumeration).

        Raises :class:`SpecError` if ``|G| > max_order``.
        """
        max_order = check_int("max_order", max_order, minimum=1)
        if self.order > max_order:
            raise SpecError(
                f"|G| = {self.order} (log|G| = {self.log_order:.1f}) exceeds the enumeration limit "
                f"max_order={max_order}; use a stochastic estimator"
            )
        return _elements.elements(self, self._device(device))

    def moving_elements(self, device: Any = None, seed: int = 0) -> list[dict[str, torch.Tensor]]:
        """Elements that together move every neuron (a cyclic shift with every sign flipped,
        and a seeded uniform element): what invariance checks act with."""
        return _elements.moving_elements(self, self._device(device), seed)

    def sign_element(self, flips: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The element that negates the neurons where ``flips[group]`` (bool ``(*batch, n)``)
        is True and moves nothing; groups not in ``flips`` get the identity."""
        out = {}
        for k in self.groups:
            shape = self.unit_shape(k)
            ar = torch.arange(shape[-1])
            if k in flips:
                f = torch.as_tensor(flips[k]).bool()
                if f.dim() < len(shape) or tuple(f.shape[f.dim() - len(shape) :]) != shape:
                    raise SpecError(f"flips[{k!r}] has shape {tuple(f.shape)}, expected (*batch, {shape[-1]})")
                if bool(f.any()) and not self.groups[k].signed:
                    raise SpecError(f"flips[{k!r}] negates neurons of group {k!r}, which has no sign-flip symmetry")
                out[k] = encode_signed(ar.to(f.device).expand(f.shape), f)
            else:
                out[k] = ar.expand(shape).clone()
        return out

    # ------------------------------------------------------------------ action
    def apply(self, params: Mapping[str, torch.Tensor], perm: GroupElement) -> dict[str, torch.Tensor]:
        """Act with ``perm`` on a parameter mapping.

        Parameters
        ----------
        params : mapping ``site -> Tensor (*batch_w, *site_shape)``
            Sites the spec does not touch are passed through unchanged. Every site
            the spec touches must be present.
        perm : mapping ``group -> LongTensor (*batch_g, *unit_shape)``

        Returns
        -------
        dict ``site -> Tensor (*broadcast(batch_w, batch_g), *site_shape)``

        Raises
        ------
        SpecError
            If an entry of ``perm`` is not a (signed, for sign-flip groups) permutation
            of ``0..n-1`` in every batch entry (checked with one sort per group), a site
            is missing or has the wrong shape, or the batch shapes do not broadcast.
        """
        check_mapping("params", params, nonempty=bool(self.sites))
        batch_g = self._check_element(perm)
        batched = any(p.dim() > len(self.unit_shape(k)) for k, p in perm.items())
        return self._act(params, batched, batch_g, lambda action, x: action.apply(x, perm))

    def rescale(self, params: Mapping[str, torch.Tensor], log_scales: Mapping[str, torch.Tensor]) -> dict:
        """Incoming entries of each group in ``log_scales`` times ``exp(u)``, outgoing ones
        times ``exp(-u)`` (``u = log_scales[group]``, ``(*batch, n)``); passive entries and
        other groups unchanged. A symmetry only for groups with :attr:`NeuronGroup.scalable`
        (the caller checks; see :func:`pyro_symmetry.rescale`)."""
        check_mapping("params", params, nonempty=bool(self.sites))
        batch = broadcast_shapes(*(torch.as_tensor(u).shape[:-1] for u in log_scales.values()))
        sites = [s for s in self.sites if any(g in log_scales for g in self._site_groups(s))]
        return self._act(params, len(batch) > 0, batch, lambda action, x: action.scale(x, log_scales), sites)

    def _site_groups(self, site: str) -> set[str]:
        return {name for name, *_ in self._resolved["table"][site]}

    def _act(self, params: Mapping, batched: bool, batch_g: torch.Size, fn: Callable, sites=None) -> dict:
        out = dict(params)
        for site in self.sites if sites is None else sites:
            if site not in params:
                raise SpecError(f"site {site!r} of the spec is missing from params (have {sorted(params)})")
            x = params[site]
            action = self.action(site, batched)
            self._check_site(site, x, action.event_ndim)
            batch_x = x.shape[: x.dim() - action.event_ndim]
            try:
                broadcast_shapes(batch_x, batch_g)
            except RuntimeError:
                raise SpecError(
                    f"params[{site!r}] has batch shape {tuple(batch_x)}, which does not broadcast with the "
                    f"group element's batch shape {tuple(batch_g)}"
                ) from None
            out[site] = fn(action, x)
        return out

    def _check_site(self, site: str, x: Any, nd: int) -> None:
        if not isinstance(x, torch.Tensor):
            raise SpecError(f"params[{site!r}] must be a tensor, got {type(x).__name__}")
        if x.dim() < nd:
            raise SpecError(f"params[{site!r}] has shape {tuple(x.shape)}, expected at least {nd} dims")
        event = x.shape[x.dim() - nd :]
        if self.shapes is not None and site in self.shapes and tuple(event) != self.shapes[site]:
            raise SpecError(f"params[{site!r}] has event shape {tuple(event)}, the spec expects {self.shapes[site]}")

    def site_moves(self, site: str) -> tuple[int, list[tuple[int, int, str]]]:
        """Deprecated layout tuples ``(event_ndim, [(event_axis >= 0, inner, group)])``.

        Only for specs without slices or nested groups; use :meth:`action`.
        """
        action = self.action(site)
        out = []
        for s in action.spans:
            if not s.whole or len(s.shape) > 1:
                raise SpecError(f"site {site!r} has sliced or nested groups: use spec.action({site!r})")
            out.append((s.axis, s.inner, s.group))
        return action.event_ndim, out

    # ------------------------------------------------------------------ builders
    @classmethod
    def from_module(cls, module: torch.nn.Module, **kwargs: Any) -> PermutationSpec:
        """Build the spec of a ``Linear``/``Conv`` chain.

        See :func:`~pyro_symmetry.groups.builders.spec_from_module`.
        """
        from .builders import spec_from_module

        return spec_from_module(module, **kwargs)

    def tie(self, names: Iterable[str], name: str | None = None) -> PermutationSpec:
        """Merge groups that must share one permutation (e.g. a residual stream).

        Every layer writing into a residual stream, and every layer reading from it,
        must use the same permutation; tying the groups of those layers makes one
        group acting on all their axes.
        """
        if isinstance(names, str) or not isinstance(names, Iterable):
            raise TypeError(f"names must be a sequence of group names, got {names!r}")
        names = list(names)
        if len(names) < 2:
            raise SpecError("tie needs at least two group names")
        if len(set(names)) != len(names):
            raise SpecError(f"tie got repeated group names {names}")
        for k in names:
            if k not in self.groups:
                raise SpecError(f"cannot tie unknown group {k!r}; groups are {sorted(self.groups)}")
        sizes = {self.groups[k].size for k in names}
        if len(sizes) != 1:
            raise SpecError(f"cannot tie groups {names} of different sizes {[self.groups[k].size for k in names]}")
        syms = {self.groups[k].activation_symmetry for k in names}
        if any(self.groups[k].parent is not None or self.children(k) for k in names):
            raise SpecError(f"cannot tie groups {names}: nested groups and their parents are tied by their parent")
        merged = NeuronGroup(
            sizes.pop(),
            incoming=sum((self.groups[k].incoming for k in names), ()),
            outgoing=sum((self.groups[k].outgoing for k in names), ()),
            activation_symmetry=syms.pop() if len(syms) == 1 else "none",
            passive=sum((self.groups[k].passive for k in names), ()),
        )
        new_name = name or names[0]
        groups = {}
        for k, g in self.groups.items():
            if k == names[0]:
                groups[new_name] = merged
            elif k not in names:
                groups[k] = g
        return self.replace_groups(groups)

    def without_signs(self) -> PermutationSpec:
        """The same spec with sign-flip symmetries dropped (plain permutations)."""
        return self.replace_groups(
            {k: replace(g, activation_symmetry="none") if g.signed else g for k, g in self.groups.items()}
        )

    def check(self, model: Callable | torch.nn.Module, *args: Any, **kwargs: Any) -> PermutationSpec:
        """Check the spec against a model and return it bound to the model's site shapes.

        ``model`` is a Pyro model (traced with ``*args, **kwargs``; its latent sample
        sites are the sites) or an ``nn.Module`` (its parameters and buffers by
        state-dict name, plus its Pyro sample sites if it is a ``PyroModule``; without
        ``args`` it runs on inputs built from its first layer).

        Shapes first: raises :class:`SpecError` naming the first site, axis or size that
        does not match, or a layer's bias that the spec leaves out while it permutes the
        layer's weight rows (``"fc1.bias"`` beside an incoming ``"fc1.weight"``). Then
        invariance: the model's outputs, every site's log-density (prior and likelihood)
        and, for groups with a scaling symmetry, the outputs under a random positive
        rescaling must be unchanged under elements that move every neuron
        (:meth:`moving_elements`); a spec whose group changes the function fails naming
        the first group or site where it differs. The caller's RNGs and param store are
        left as they were.
        """
        from ._verify import check_spec_against
        from .builders import model_site_shapes

        shapes = model_site_shapes(model, *args, **kwargs)
        bound = self.with_shapes(shapes)
        covered = set(bound.sites)
        for name, g in bound.groups.items():
            for ax in g.incoming:
                if not ax.site.endswith(".weight"):
                    continue
                bias = ax.site[: -len("weight")] + "bias"
                if bias in shapes and bias not in covered and shapes[bias][-1:] == (g.size,):
                    raise SpecError(
                        f"group {name!r} permutes the rows of {ax.site!r} but not {bias!r} (shape {shapes[bias]}); "
                        f"add ({bias!r}, 0) to the group's incoming axes"
                    )
        check_spec_against(bound, model, *args, **kwargs)
        return bound

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}: {g.size}"
            + ("±" if g.signed else "")
            + ("~" if g.scalable else "")
            + (f" in {g.parent}" if g.parent else "")
            for k, g in self.groups.items()
        )
        return f"PermutationSpec({{{parts}}}, log|G|={self.log_order:.2f})"
