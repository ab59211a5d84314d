"""The flat latent vector of Pyro's ``AutoContinuous`` guides, and group actions on it.

``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal`` and
``AutoMultivariateNormal`` pack every latent site, flattened in row-major order,
into one vector in the order of the model's prototype trace. A group element
then acts on that vector as one (signed) index vector ``idx`` of length ``D``:
``flat_new = flat_old[..., idx]`` (negated where ``idx < 0``, with ``~idx`` the
source), which is what :func:`flat_permutation` returns.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .._shapes import broadcast_shapes
from .._validation import check_mapping, check_same_device_dtype, check_spec, check_tensor
from ._indexing import encode_signed, gather_axes
from .spec import GroupElement, PermutationSpec, SpecError, _check_shapes

__all__ = ["FlatLayout", "apply_flat", "flat_permutation"]


@dataclass(frozen=True)
class FlatLayout:
    """Ordered ``site -> shape`` layout of a flat latent vector.

    Parameters
    ----------
    shapes : mapping ``site -> shape`` in packing order
    """

    shapes: Mapping[str, tuple[int, ...]]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shapes", _check_shapes(self.shapes))

    @classmethod
    def from_guide(cls, guide: Any) -> FlatLayout:
        """Layout of a fitted (or at least once-called) ``AutoContinuous`` guide."""
        shapes = getattr(guide, "_unconstrained_shapes", None)
        if shapes is None:
            raise SpecError(
                f"{type(guide).__name__} has no latent layout yet: call the guide once (or run one SVI step) "
                "so that it traces the model, or pass an AutoContinuous guide"
            )
        return cls({k: tuple(v) for k, v in shapes.items()})

    @property
    def offsets(self) -> dict[str, tuple[int, int]]:
        """``site -> (start, stop)`` in the flat vector."""
        out, pos = {}, 0
        for k, s in self.shapes.items():
            n = math.prod(s)
            out[k] = (pos, pos + n)
            pos += n
        return out

    @property
    def dim(self) -> int:
        return sum(math.prod(s) for s in self.shapes.values())

    def to_flat(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Pack ``site -> (*batch, *shape)`` into ``(*batch, D)``."""
        check_mapping("params", params)
        parts = []
        for k, s in self.shapes.items():
            if k not in params:
                raise SpecError(f"site {k!r} of the flat layout is missing from params (have {sorted(params)})")
            x = check_tensor(f"params[{k!r}]", params[k])
            if x.dim() < len(s) or tuple(x.shape[x.dim() - len(s) :]) != s:
                raise SpecError(
                    f"params[{k!r}] has shape {tuple(x.shape)}, expected (*batch, {', '.join(map(str, s))})"
                )
            parts.append(x.reshape(tuple(x.shape[: x.dim() - len(s)]) + (-1,)))
        # One flat vector has one dtype: refuse to up- or down-cast sites silently.
        if len({(p.dtype, p.device) for p in parts}) > 1:
            check_same_device_dtype({f"params[{k!r}]": params[k] for k in self.shapes})
        try:
            batch = broadcast_shapes(*(p.shape[:-1] for p in parts))
        except RuntimeError:
            shapes = {k: tuple(p.shape[:-1]) for k, p in zip(self.shapes, parts)}
            raise SpecError(f"the sites of params have batch shapes {shapes} that do not broadcast") from None
        return torch.cat([p.expand(batch + p.shape[-1:]) for p in parts], dim=-1)

    def from_flat(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Unpack ``(*batch, D)`` into ``site -> (*batch, *shape)`` (views)."""
        check_tensor("flat", flat, min_dim=1)
        if flat.shape[-1] != self.dim:
            raise SpecError(f"flat vector has length {flat.shape[-1]}, the layout has {self.dim}")
        batch = tuple(flat.shape[:-1])
        return {k: flat[..., a:b].reshape(batch + self.shapes[k]) for k, (a, b) in self.offsets.items()}


def flat_permutation(spec: PermutationSpec, perm: GroupElement, layout: FlatLayout) -> torch.Tensor:
    """The signed index vector of ``perm`` on the flat latent vector.

    Returns
    -------
    LongTensor, shape ``(*batch, D)``
        ``apply_flat(flat, idx)`` equals ``to_flat(spec.apply(from_flat(flat), perm))``.
        Sites of the layout that the spec does not touch map to themselves.
    """
    check_spec(spec)
    if not isinstance(layout, FlatLayout):
        raise TypeError(f"layout must be a FlatLayout, got {type(layout).__name__}")
    spec = spec if spec.shapes is not None else spec.with_shapes(layout.shapes)
    missing = [s for s in spec.sites if s not in layout.shapes]
    if missing:
        raise SpecError(f"sites {missing} of the spec are not in the flat layout {list(layout.shapes)}")
    device = next(iter(perm.values())).device if perm else torch.device("cpu")
    # Act on a 1-based position code so that the sign of position 0 survives.
    code = torch.arange(1, layout.dim + 1, device=device)
    moved = spec.apply(layout.from_flat(code), perm)
    flat = layout.to_flat(moved)
    return encode_signed(flat.abs() - 1, flat < 0)


def apply_flat(flat: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Apply a signed flat index ``(*batch_i, D)`` to ``flat`` ``(*batch_x, D)``."""
    check_tensor("flat", flat, min_dim=1)
    check_tensor("index", index, min_dim=1)
    if index.dtype not in (torch.int64, torch.int32):
        raise SpecError(f"index must be an integer LongTensor (from flat_permutation), got dtype {index.dtype}")
    D = flat.shape[-1]
    if D != index.shape[-1]:
        raise SpecError(f"flat vector has length {D} but the index has length {index.shape[-1]}")
    if index.numel():
        lo, hi = torch.aminmax(index)
        if int(lo) < -D or int(hi) >= D:
            raise SpecError(f"index has entries in [{int(lo)}, {int(hi)}], outside the signed range [-{D}, {D})")
    try:
        broadcast_shapes(flat.shape[:-1], index.shape[:-1])
    except RuntimeError:
        raise SpecError(
            f"flat has batch shape {tuple(flat.shape[:-1])} and index {tuple(index.shape[:-1])}: they do not broadcast"
        ) from None
    return gather_axes(flat, 1, [(0, 1, index, True)])
