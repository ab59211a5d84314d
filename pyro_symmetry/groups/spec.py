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
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

import torch

from .._validation import check_batch_shape, check_int, check_mapping
from ._indexing import decode_signed, encode_signed, gather_axes

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
    """

    site: str
    axis: int
    inner: int = 1
    ndim: int | None = None  # the site's own number of dims, if known


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _as_axis(entry: Any, where: str) -> Axis:
    if isinstance(entry, (tuple, list)) and len(entry) in (2, 3, 4):
        site, axis = entry[0], entry[1]
        inner = entry[2] if len(entry) >= 3 else 1
        ndim = entry[3] if len(entry) == 4 else None
        if (
            isinstance(site, str)
            and _is_int(axis)
            and _is_int(inner)
            and inner >= 1
            and (ndim is None or (_is_int(ndim) and ndim >= 0))
        ):
            return Axis(site, axis, inner, ndim)
    raise SpecError(
        f"{where}: entry {entry!r} is not a (site: str, axis: int[, inner: int >= 1[, ndim: int >= 0]]) tuple"
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
    """A set of interchangeable neurons (a hidden layer or a set of channels).

    Parameters
    ----------
    size : int
        Number of neurons ``n``.
    incoming : sequence of ``(site, axis)``
        Axes that index the neurons' own parameters: rows of the layer's weight,
        its bias, norm parameters and buffers. Scaled by ``lam`` under rescaling.
    outgoing : sequence of ``(site, axis)``
        Axes of the next layer's parameters that read these neurons (columns).
        Divided by ``lam`` under rescaling.
    activation_symmetry : {"none", "sign", "scale"}
        Extra symmetry of the activation: ``"sign"`` for odd activations (tanh):
        the group is the signed permutations, ``|G_l| = n! 2^n``; ``"scale"`` for
        positively homogeneous ones (ReLU): a continuous rescaling symmetry on top
        of the permutations (see :mod:`pyro_symmetry.scaling`).
    """

    size: int
    incoming: tuple[Axis, ...] = ()
    outgoing: tuple[Axis, ...] = ()
    activation_symmetry: str = "none"

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 1:
            raise SpecError(f"NeuronGroup size must be a positive int, got {self.size!r}")
        object.__setattr__(self, "incoming", _as_axes(self.incoming, "NeuronGroup incoming"))
        object.__setattr__(self, "outgoing", _as_axes(self.outgoing, "NeuronGroup outgoing"))
        if self.activation_symmetry not in ACTIVATION_SYMMETRIES:
            raise SpecError(
                f"activation_symmetry must be one of {ACTIVATION_SYMMETRIES}, got {self.activation_symmetry!r}"
            )
        if not self.incoming and not self.outgoing:
            raise SpecError("a NeuronGroup must act on at least one (site, axis)")

    @property
    def axes(self) -> tuple[Axis, ...]:
        return self.incoming + self.outgoing

    @property
    def signed(self) -> bool:
        return self.activation_symmetry == "sign"


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
        """Normalize every axis to a negative one and check sizes against shapes."""
        seen: dict[tuple[str, int], str] = {}
        table: dict[str, list[tuple[int, int, str]]] = {}
        event_ndim: dict[str, int] = {}
        for name, g in self.groups.items():
            for ax in g.axes:
                shape = None if self.shapes is None else self.shapes.get(ax.site)
                if self.shapes is not None and shape is None:
                    raise SpecError(
                        f"group {name!r} acts on site {ax.site!r}, which is not among the model's sites "
                        f"{sorted(self.shapes)}"
                    )
                if shape is not None:
                    nd = len(shape)
                    if ax.ndim is not None and ax.ndim != nd:
                        raise SpecError(f"group {name!r}: site {ax.site!r} has {nd} dims {shape}, not {ax.ndim}")
                    if not -nd <= ax.axis < nd:
                        raise SpecError(
                            f"group {name!r}: axis {ax.axis} is out of range for site {ax.site!r} of shape {shape}"
                        )
                    neg = ax.axis - nd if ax.axis >= 0 else ax.axis
                    if shape[neg] != g.size * ax.inner:
                        raise SpecError(
                            f"group {name!r} has size {g.size} (x inner {ax.inner}) but axis {ax.axis} of site "
                            f"{ax.site!r} has length {shape[neg]} (site shape {shape})"
                        )
                    event_ndim[ax.site] = nd
                elif ax.ndim is not None:
                    if event_ndim.setdefault(ax.site, ax.ndim) != ax.ndim:
                        raise SpecError(f"site {ax.site!r} is given ndim {ax.ndim} and {event_ndim[ax.site]}")
                    neg = ax.axis - ax.ndim if ax.axis >= 0 else ax.axis
                elif ax.axis >= 0:
                    neg = None  # resolved lazily once shapes are known
                else:
                    neg = ax.axis
                key = (ax.site, ax.axis if neg is None else neg)
                if key in seen:
                    raise SpecError(
                        f"axis {ax.axis} of site {ax.site!r} is claimed by groups {seen[key]!r} and {name!r}"
                    )
                seen[key] = name
                table.setdefault(ax.site, []).append((neg, ax.inner, name, ax.axis))
        self._resolved.clear()
        self._resolved.update(table=table, event_ndim=event_ndim)

    def _site_moves(self, site: str, batched: bool = False) -> tuple[int, list[tuple[int, int, str]]]:
        """Return ``(event_ndim, [(event_axis >= 0, inner, group)])`` for ``site``.

        Without a known shape, a site given only by negative axes is read with the
        fewest event dims those axes need: exact for unbatched group elements (the
        gather then treats extra leading dims as batch), but batched elements must
        know where the batch dims end, so they need the shape.
        """
        if site not in self._resolved["table"]:
            raise SpecError(f"no group acts on site {site!r}; the spec's sites are {list(self.sites)}")
        entries = self._resolved["table"][site]
        nd = self._resolved["event_ndim"].get(site)
        if nd is None:
            if any(neg is None for neg, *_ in entries) or batched:
                why = "is given by a non-negative axis" if not batched else "is acted on by a batched group element"
                raise SpecError(
                    f"site {site!r} {why} but the spec does not know the site's shape; use "
                    "spec.with_shapes({site: shape, ...}) or spec.check(model, *args)"
                    + ("" if batched else ", or give the axis as a negative number counting from the right")
                )
            nd = max(-neg for neg, *_ in entries)
        return nd, [(nd + neg if neg is not None else ax, inner, name) for neg, inner, name, ax in entries]

    # ------------------------------------------------------------------ basics
    @property
    def sizes(self) -> dict[str, int]:
        """``group name -> number of neurons``."""
        return {k: g.size for k, g in self.groups.items()}

    @property
    def sites(self) -> tuple[str, ...]:
        """The sites any group acts on, in first-seen order."""
        return tuple(self._resolved["table"])

    @property
    def log_order(self) -> float:
        """``log |G| = sum_l lgamma(n_l + 1) (+ n_l log 2 for sign-flip groups)``."""
        return float(
            sum(math.lgamma(g.size + 1) + (g.size * math.log(2.0) if g.signed else 0.0) for g in self.groups.values())
        )

    @property
    def order(self) -> int:
        """``|G|`` as an exact integer."""
        return math.prod(math.factorial(g.size) * (2**g.size if g.signed else 1) for g in self.groups.values())

    def with_shapes(self, shapes: Mapping[str, Sequence[int]]) -> PermutationSpec:
        """The same spec, checked against and bound to the given site shapes."""
        return PermutationSpec(self.groups, _check_shapes(shapes))

    def replace_groups(self, groups: Mapping[str, NeuronGroup]) -> PermutationSpec:
        return PermutationSpec(groups, self.shapes)

    def _device(self, device: Any) -> torch.device:
        return torch.device("cpu") if device is None else torch.device(device)

    # ------------------------------------------------------------------ group law
    def identity(self, batch_shape: Sequence[int] = (), device: Any = None) -> dict[str, torch.Tensor]:
        """The identity element, optionally expanded to ``batch_shape``."""
        batch_shape = check_batch_shape("batch_shape", batch_shape)
        dev = self._device(device)
        return {k: torch.arange(n, device=dev).expand(batch_shape + (n,)).clone() for k, n in self.sizes.items()}

    def sample(
        self,
        batch_shape: Sequence[int] = (),
        generator: torch.Generator | None = None,
        device: Any = None,
        signed: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Draw uniform group elements, shape ``(*batch_shape, n)`` per group.

        For sign-flip groups (odd activations) the element is a uniform *signed*
        permutation unless ``signed=False``. ``generator`` makes draws reproducible.
        """
        batch_shape = check_batch_shape("batch_shape", batch_shape)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
        dev = generator.device if generator is not None else self._device(device)
        out = {}
        for k, g in self.groups.items():
            shape = batch_shape + (g.size,)
            p = torch.rand(shape, generator=generator, device=dev).argsort(-1)
            if signed and g.signed:
                neg = torch.rand(shape, generator=generator, device=dev) < 0.5
                p = encode_signed(p, neg)
            out[k] = p
        return out

    def _check_element(self, perm: GroupElement, what: str = "perm") -> torch.Size:
        """Check a (batched) group element; return its broadcast batch shape.

        Every entry must be a (signed, for sign-flip groups) permutation of ``0..n-1`` in
        every batch entry: one sort per group, cheap next to moving the weights.
        """
        if not isinstance(perm, Mapping):
            raise SpecError(f"{what} must be a mapping group name -> LongTensor, got {type(perm).__name__}")
        missing = set(self.groups) - set(perm)
        extra = set(perm) - set(self.groups)
        if missing or extra:
            raise SpecError(f"{what} has groups {sorted(perm, key=str)}, the spec has {sorted(self.groups)}")
        for k, p in perm.items():
            if not isinstance(p, torch.Tensor) or p.dtype not in (torch.int64, torch.int32):
                raise SpecError(f"{what}[{k!r}] must be an integer LongTensor, got {getattr(p, 'dtype', type(p))}")
            n = self.groups[k].size
            if p.dim() == 0 or p.shape[-1] != n:
                raise SpecError(f"{what}[{k!r}] has shape {tuple(p.shape)}, expected (*batch, {n})")
            signed = self.groups[k].signed
            src = decode_signed(p)[0] if signed else p
            if not bool((src.sort(-1).values == torch.arange(n, device=p.device)).all()):
                if not signed and bool((p < 0).any()):
                    raise SpecError(
                        f"{what}[{k!r}] flips signs (negative entries) but group {k!r} has no sign-flip symmetry"
                    )
                raise SpecError(f"{what}[{k!r}] is not a permutation of 0..{n - 1} in every batch entry")
        try:
            return torch.broadcast_shapes(*(p.shape[:-1] for p in perm.values()))
        except RuntimeError:
            shapes = {k: tuple(p.shape[:-1]) for k, p in perm.items()}
            raise SpecError(f"{what} has batch shapes {shapes} that do not broadcast") from None

    def validate(self, perm: GroupElement) -> None:
        """Raise :class:`SpecError` unless ``perm`` is a valid (batched) group element."""
        self._check_element(perm)

    def inverse(self, perm: GroupElement) -> dict[str, torch.Tensor]:
        """``inverse(p)`` with ``apply(apply(w, p), inverse(p)) == w``."""
        self._check_element(perm)
        out = {}
        for k, p in perm.items():
            src, neg = decode_signed(p.long())
            ar = torch.arange(p.shape[-1], device=p.device).expand_as(src)
            inv = torch.empty_like(src).scatter_(-1, src, ar)
            inv_neg = torch.zeros_like(neg).scatter_(-1, src, neg)
            out[k] = encode_signed(inv, inv_neg)
        return out

    def compose(self, a: GroupElement, b: GroupElement) -> dict[str, torch.Tensor]:
        """``compose(a, b)``, the element "first ``b``, then ``a``".

        ``apply(apply(w, b), a) == apply(w, compose(a, b))``; batch dims broadcast.
        """
        batch_a = self._check_element(a, "a")
        batch_b = self._check_element(b, "b")
        try:
            torch.broadcast_shapes(batch_a, batch_b)
        except RuntimeError:
            raise SpecError(
                f"a has batch shape {tuple(batch_a)} and b {tuple(batch_b)}: they do not broadcast"
            ) from None
        out = {}
        for k in self.groups:
            sa, na = decode_signed(a[k].long())
            sb, nb = decode_signed(b[k].long())
            shape = torch.broadcast_shapes(sa.shape, sb.shape)
            sa, na, sb, nb = (t.expand(shape) for t in (sa, na, sb, nb))
            src = sb.gather(-1, sa)
            neg = na ^ nb.gather(-1, sa)
            out[k] = encode_signed(src, neg)
        return out

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
        dev = self._device(device)
        per_group = []
        for g in self.groups.values():
            perms = torch.tensor(list(itertools.permutations(range(g.size))), dtype=torch.long, device=dev)
            if g.signed:
                flips = torch.tensor(list(itertools.product([False, True], repeat=g.size)), device=dev)
                perms = encode_signed(
                    perms[:, None, :].expand(-1, len(flips), -1), flips[None].expand(len(perms), -1, -1)
                ).reshape(-1, g.size)
            per_group.append(perms)
        if not per_group:
            return {}
        grids = torch.meshgrid(*[torch.arange(len(p), device=dev) for p in per_group], indexing="ij")
        return {k: p[i.reshape(-1)] for k, p, i in zip(self.groups, per_group, grids)}

    # ------------------------------------------------------------------ action
    def apply(self, params: Mapping[str, torch.Tensor], perm: GroupElement) -> dict[str, torch.Tensor]:
        """Act with ``perm`` on a parameter mapping.

        Parameters
        ----------
        params : mapping ``site -> Tensor (*batch_w, *site_shape)``
            Sites the spec does not touch are passed through unchanged. Every site
            the spec touches must be present.
        perm : mapping ``group -> LongTensor (*batch_g, n)``

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
        out = dict(params)
        batched = any(p.dim() > 1 for p in perm.values())
        for site in self.sites:
            if site not in params:
                raise SpecError(f"site {site!r} of the spec is missing from params (have {sorted(params)})")
            x = params[site]
            nd, moves = self._site_moves(site, batched)
            self._check_site(site, x, nd, moves)
            batch_x = x.shape[: x.dim() - nd]
            try:
                torch.broadcast_shapes(batch_x, batch_g)
            except RuntimeError:
                raise SpecError(
                    f"params[{site!r}] has batch shape {tuple(batch_x)}, which does not broadcast with the "
                    f"group element's batch shape {tuple(batch_g)}"
                ) from None
            out[site] = gather_axes(x, nd, [(ax, inner, perm[g], self.groups[g].signed) for ax, inner, g in moves])
        return out

    def _check_site(self, site: str, x: torch.Tensor, nd: int, moves: list[tuple[int, int, str]]) -> None:
        if not isinstance(x, torch.Tensor):
            raise SpecError(f"params[{site!r}] must be a tensor, got {type(x).__name__}")
        if x.dim() < nd:
            raise SpecError(f"params[{site!r}] has shape {tuple(x.shape)}, expected at least {nd} dims")
        event = x.shape[x.dim() - nd :]
        if self.shapes is not None and site in self.shapes and tuple(event) != self.shapes[site]:
            raise SpecError(f"params[{site!r}] has event shape {tuple(event)}, the spec expects {self.shapes[site]}")
        for ax, inner, g in moves:
            if event[ax] != self.groups[g].size * inner:
                raise SpecError(
                    f"params[{site!r}] has length {event[ax]} on axis {ax - nd} but group {g!r} has size "
                    f"{self.groups[g].size}" + (f" x inner {inner}" if inner > 1 else "")
                )

    def site_moves(self, site: str) -> tuple[int, list[tuple[int, int, str]]]:
        """``(event_ndim, [(event_axis >= 0, inner, group name)])`` for one site.

        Needs the site's number of dims (from ``shapes`` or the axes' ``ndim``).
        """
        return self._site_moves(site, batched=True)

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
        merged = NeuronGroup(
            sizes.pop(),
            incoming=sum((self.groups[k].incoming for k in names), ()),
            outgoing=sum((self.groups[k].outgoing for k in names), ()),
            activation_symmetry=syms.pop() if len(syms) == 1 else "none",
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

        ``model`` is a Pyro model (traced once with ``*args, **kwargs``; its latent
        sample sites are the sites) or an ``nn.Module`` (its parameters and buffers
        by state-dict name, plus its Pyro sample sites if it is a ``PyroModule``
        called with ``*args``). Raises :class:`SpecError` naming the first site,
        axis or size that does not match, or a layer's bias that the spec leaves
        out while it permutes the layer's weight rows (``"fc1.bias"`` beside an
        incoming ``"fc1.weight"``: permuting one without the other changes the
        function).
        """
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
        return bound

    def __repr__(self) -> str:
        parts = ", ".join(
            f"{k}: {g.size}" + ("±" if g.signed else "") + ("~" if g.activation_symmetry == "scale" else "")
            for k, g in self.groups.items()
        )
        return f"PermutationSpec({{{parts}}}, log|G|={self.log_order:.2f})"
