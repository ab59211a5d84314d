"""Sign flips of hidden neurons with odd activations, and a sign convention.

For an odd activation (``tanh(-z) = -tanh(z)``: tanh, sin, erf, softsign), negating
neuron ``i``'s incoming row and bias and its outgoing column keeps the function:

.. math::

    W_l \\to S_l W_l S_{l-1}, \\qquad b_l \\to S_l b_l, \\qquad
    S_l = \\mathrm{diag}(\\pm 1), \\; S_0 = S_L = I.

Together with the permutations this is the group of signed permutations
(``|G_l| = n_l!\\, 2^{n_l}``; Chen, Lu, Hecht-Nielsen 1993).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import torch

from .._validation import check_devices, check_mapping, check_spec
from ..groups import PermutationSpec, SpecError, encode_signed
from ._axes import check_group_tensors, detached, group_spans, groups_with, unit_rows

__all__ = ["flip_signs", "sign_convention"]


def _as_flips(k: str, s: torch.Tensor) -> torch.Tensor:
    """``True`` where neuron is negated, from a bool mask or a ``+-1`` tensor."""
    if s.dtype == torch.bool:
        return s
    if s.is_floating_point() or s.dtype in (torch.int8, torch.int16, torch.int32, torch.int64):
        if not bool(((s == 1) | (s == -1)).all()):
            raise ValueError(f"signs[{k!r}] must be a bool mask (True = flip) or contain only +1/-1")
        return s < 0
    raise TypeError(f"signs[{k!r}] must be a bool or +-1 tensor, got dtype {s.dtype}")


def flip_signs(
    params: Mapping[str, torch.Tensor], spec: PermutationSpec, signs: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Negate hidden neurons of odd-activation groups (a function-preserving map).

    The flips act as the signed permutation "identity with signs", through
    :meth:`PermutationSpec.apply`, so ``flip_signs(w, spec, s)`` equals
    ``spec.apply(w, {g: encode_signed(arange(n), s[g])})``.

    Parameters
    ----------
    params : mapping ``site -> Tensor (*batch_w, *site_shape)``
    spec : PermutationSpec
    signs : mapping ``group -> Tensor (*batch_s, *unit_shape)``
        A bool mask (``True``: negate the neuron) or a ``+-1`` tensor (``-1``:
        negate) for some or all groups with ``activation_symmetry == "sign"``
        (:attr:`NeuronGroup.signed`); ``unit_shape`` is ``(n,)``, or ``(H, n)`` for a
        group nested in a parent of size H (one flip per head and dim).

    Returns
    -------
    dict ``site -> Tensor (*broadcast(batch_w, batch_s), *site_shape)``
        **Differentiable** in ``params`` (a signed re-indexing: tensors that require
        grad keep their graph). Exact at any magnitude (only signs change).

    Raises
    ------
    SpecError
        If a group in ``signs`` has no sign-flip symmetry (its activation is not
        odd, e.g. ReLU), is unknown, or the tensor has the wrong size.
    ValueError
        If a tensor is on the meta device, or the tensors are on different devices.

    Examples
    --------
    >>> model = ps.models.BayesianMLP(4, [8], 3, activation="tanh")
    >>> w2 = ps.flip_signs(w, model.spec, {"fc1": torch.rand(8) < 0.5})
    """
    check_spec(spec)
    check_mapping("params", params)
    signs = check_group_tensors(spec, signs, "sign", "signs")
    device = check_devices(
        {**{f"params[{k!r}]": v for k, v in params.items()}, **{f"signs[{k!r}]": v for k, v in signs.items()}}
    )
    device = torch.device("cpu") if device is None else device
    element = {}
    for k, g in spec.groups.items():
        ar = torch.arange(g.size, device=device)
        if k in signs:
            flips = _as_flips(k, signs[k]).to(device)
            element[k] = encode_signed(ar.expand(flips.shape), flips)
        else:
            element[k] = ar.expand(spec.unit_shape(k))
    return spec.apply(params, element)


def _outgoing_sums(params: Mapping[str, torch.Tensor], spec: PermutationSpec, group: str) -> torch.Tensor:
    """Sum of every outgoing entry of each unit of ``group``: ``(*batch, *unit_shape)``, float64
    (``unit_shape`` is ``(n,)``, or ``(H, n)`` for a group nested in a parent of size H).

    Only the sign is used, so each sample is scaled by a power of two (exact) that
    brings its largest outgoing entry near 1: float32 weights near their largest value
    would otherwise sum to ``+-Inf`` or ``Inf - Inf = NaN`` and pick arbitrary signs.
    """
    # each ``(*batch_i, *unit_shape, m)``: a span's outgoing entries, one row per unit
    parts = [unit_rows(params[a.site].double(), a, span) for a, span in group_spans(spec, group, "outgoing")]
    if not parts:
        return None
    k = len(spec.unit_shape(group))
    dims = tuple(range(-k - 1, 0))
    big = functools.reduce(torch.maximum, [p.abs().amax(dims) for p in parts])
    e = torch.frexp(big).exponent.masked_fill(big == 0, 0)[(...,) + (None,) * (k + 1)]
    total = None
    for p in parts:
        s = torch.ldexp(p, -e).sum(-1)
        total = s if total is None else total + s
    return total


def sign_convention(
    params: Mapping[str, torch.Tensor], spec: PermutationSpec, groups: list[str] | None = None
) -> dict[str, torch.Tensor]:
    """Flips that make each odd-activation neuron's outgoing weights sum to a positive number.

    The sum of a neuron's outgoing weights (its column of the next layer, summed over
    all outputs) changes sign with the neuron and is unchanged by permutations of
    any group; flipping the neurons with a negative sum picks one representative per
    sign orbit. Groups are visited from the last to the first (the outgoing sums of
    layer ``l`` depend on the signs chosen for layer ``l + 1``), so the result is the
    same for every signed permutation of the input. Neurons whose outgoing sum is
    exactly zero (measure zero for continuous posteriors; no outgoing weights at all)
    are not flipped.

    Parameters
    ----------
    params : mapping ``site -> Tensor (*batch, *site_shape)``
    spec : PermutationSpec
    groups : list of str, optional
        Default: every group with ``activation_symmetry == "sign"``.

    Returns
    -------
    dict ``group -> BoolTensor (*batch, *unit_shape)``
        ``True`` where the neuron must be flipped; apply with :func:`flip_signs`. The
        sums are formed in float64 after scaling each sample by a power of two, so the
        signs are right at any magnitude (float32 weights near ``3e38`` included).
    """
    check_spec(spec)
    check_mapping("params", params)
    check_devices({f"params[{k!r}]": v for k, v in params.items()})
    params = detached(params)  # only signs are read: no gradient is meant
    if isinstance(groups, str):
        raise TypeError(f"groups must be a list of group names, got {groups!r}")
    groups = groups_with(spec, "sign") if groups is None else list(groups)
    check_group_tensors(spec, {k: torch.zeros(spec.unit_shape(k)) for k in groups}, "sign", "groups")
    current = dict(params)
    flips: dict[str, torch.Tensor] = {}
    # Visit groups against the direction of the network; repeat until no group changes
    # (one pass for a chain, where each group's outgoing sums only depend on later groups).
    order = list(reversed(groups))
    for _ in range(len(order) + 1):
        changed = False
        for k in order:
            sums = _outgoing_sums(current, spec, k)
            if sums is None:
                raise SpecError(f"group {k!r} has no outgoing axes, so no sign convention can be read from them")
            new = sums < 0
            if bool(new.any()):
                changed = True
                current = flip_signs(current, spec, {k: new})
                flips[k] = flips[k] ^ new if k in flips else new
            elif k not in flips:
                flips[k] = new
        if not changed:
            return flips
    raise RuntimeError("sign_convention did not reach a fixed point; the spec's groups form a cycle")
