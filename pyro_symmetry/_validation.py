"""Input checks shared by every public entry point, and the package's error rule.

**Error rule.** Every public function raises, for a bad input, one of three exception types, chosen by
what is wrong (not by where it is noticed):

``TypeError``
    A wrong *kind* of value: a float or a bool where an ``int`` is needed, a string
    where a tensor is, an integer tensor where a floating-point one is, an object
    without the method a duck type needs (an ``executor`` without ``submit``).
``ValueError``
    A value of the right kind that is not allowed: a count below its minimum, an
    unknown option string (``estimator="mc"``), out-of-range probabilities, a shape that
    disagrees with another argument (labels against predictions), and **NaN or Inf**
    where finite numbers are needed (a NaN never passes silently and never turns into a
    verdict).
:class:`~pyro_symmetry.SpecError` (a subclass of ``ValueError``)
    A mismatch between a symmetry spec and a model, guide, posterior or parameter
    mapping: a site missing or unknown, a site's shape or an axis length that is not
    the spec's, a group the operation cannot handle (too large to enumerate, sliced for a
    factorized estimator), a model that is not invariant under the spec.
    ``except ValueError`` catches it too.

Messages name the argument (and the site, group, axis and shape at fault, and the value
received), and say what would be accepted. A deprecated spelling of an argument or a
function warns with ``DeprecationWarning`` naming its replacement and keeps working for
one release.

Each helper here raises such an error and returns the checked value, so a public function
validates its inputs in a few lines instead of failing deep inside torch.

This module sits below every other one: it imports nothing from the package at import
time (``groups`` itself uses it).
"""

from __future__ import annotations

import math
import numbers
import operator
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ._shapes import broadcast_shapes

__all__ = [
    "check_batch_shape",
    "check_callable",
    "check_devices",
    "check_finite",
    "check_floating",
    "check_int",
    "check_mapping",
    "check_params",
    "check_real",
    "check_same_device_dtype",
    "check_seed",
    "check_spec",
    "check_tensor",
]


def _spec_error() -> type[ValueError]:
    from .groups.spec import SpecError

    return SpecError


def check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    """``value`` as an ``int`` (Python or numpy integer, not a bool) that is ``>= minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {value!r} ({type(value).__name__})")
    value = operator.index(value)
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value}")
    return value


def check_seed(name: str, value: Any) -> int | None:
    """An optional integer seed."""
    return None if value is None else check_int(name, value)


def check_real(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    nonnegative: bool = False,
    finite: bool = True,
    low: float | None = None,
    high: float | None = None,
) -> float:
    """``value`` as a ``float``: a real number (or a one-element tensor), not a bool."""
    if torch.is_tensor(value):
        if value.numel() != 1 or value.is_complex():
            raise TypeError(f"{name} must be a real number, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r} ({type(value).__name__})")
    value = float(value)
    if math.isnan(value) or (finite and math.isinf(value)):
        raise ValueError(f"{name} must be a finite number, got {value}")
    if positive and not value > 0:
        raise ValueError(f"{name} must be a positive number, got {value}")
    if nonnegative and not value >= 0:
        raise ValueError(f"{name} must be a non-negative number, got {value}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name} must lie in [{low}, {high}], got {value}")
    return value


def check_callable(name: str, value: Any) -> Callable:
    if not callable(value):
        raise TypeError(f"{name} must be callable, got {type(value).__name__}")
    return value


def check_mapping(name: str, value: Any, *, nonempty: bool = True, what: str = "site -> tensor") -> Mapping:
    """A (non-empty) mapping."""
    if not isinstance(value, Mapping):
        raise TypeError(f"{name} must be a mapping {what}, got {type(value).__name__}")
    if nonempty and not value:
        raise ValueError(f"{name} is an empty mapping; expected {what}")
    return value


def check_tensor(name: str, value: Any, *, floating: bool = False, min_dim: int = 0) -> torch.Tensor:
    """A tensor (floating point if asked) with at least ``min_dim`` dims."""
    if not torch.is_tensor(value):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if floating:
        check_floating(name, value)
    if value.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dims, got shape {tuple(value.shape)}")
    return value


def check_floating(name: str, value: torch.Tensor) -> torch.Tensor:
    if not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
    return value


def check_finite(name: str, value: torch.Tensor) -> torch.Tensor:
    """Raise ``ValueError`` (a :class:`SpecError`) if ``value`` holds NaN or Inf entries
    (``ValueError`` if it is on the meta device: it has no values to check)."""
    if not torch.is_tensor(value):
        raise _spec_error()(f"{name} must be a tensor, got {type(value).__name__}")
    check_devices({name: value})
    if value.numel() and (value.is_floating_point() or value.is_complex()):
        # aminmax propagates NaN and is far cheaper than isfinite(t).all() on large tensors.
        lo, hi = torch.aminmax(value.detach().reshape(-1))
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise _spec_error()(f"{name} contains NaN or Inf values")
    return value


def check_batch_shape(name: str, value: Any) -> tuple[int, ...]:
    """A batch shape: an int or a sequence of non-negative ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = (value,)
    if isinstance(value, (str, bytes)) or not isinstance(value, (Sequence, torch.Size)):
        raise TypeError(f"{name} must be a sequence of non-negative ints, got {value!r}")
    return tuple(check_int(f"{name}[{i}]", d, minimum=0) for i, d in enumerate(value))


def check_spec(value: Any, name: str = "spec") -> Any:
    from .groups.spec import PermutationSpec

    if not isinstance(value, PermutationSpec):
        raise TypeError(f"{name} must be a PermutationSpec, got {type(value).__name__}")
    return value


def check_devices(tensors: Mapping[str, Any], hint: str = "") -> torch.device | None:
    """All tensors hold values (none on the meta device) and share one device.

    ``tensors`` maps a label that names the argument and site (``"q1['fc1.weight']"``,
    ``"params['fc1.weight']"``) to a tensor; non-tensor values are skipped. Raises
    ``ValueError`` naming the first meta tensor, or the first two tensors on different
    devices with their devices, so that callers fail before any computation (a meta
    tensor otherwise fails deep inside torch with "cannot be called on meta tensors").
    ``hint`` is appended to the mixed-device message. Returns the common device (``None``
    if there is no tensor).
    """
    first = None
    for label, t in tensors.items():
        if not torch.is_tensor(t):
            continue
        if t.device.type == "meta":
            raise ValueError(
                f"{label} is on the meta device: it holds no values; load or materialize the weights first "
                "(e.g. module.to_empty(device='cpu') then load_state_dict)"
            )
        if first is None:
            first = (label, t.device)
        elif t.device != first[1]:
            raise ValueError(
                f"{label} is on device {t.device} but {first[0]} is on {first[1]}; move them to one device{hint}"
            )
    return None if first is None else first[1]


def check_same_device_dtype(tensors: Mapping[str, torch.Tensor], hint: str = "") -> None:
    """All floating-point tensors share one dtype and all tensors one device (none on meta).

    ``tensors`` maps a label (``"x"``, ``"params['fc1.weight']"``) to a tensor; the error
    names the first two that disagree (``ValueError`` for devices, see
    :func:`check_devices`; ``TypeError`` for dtypes).
    """
    check_devices(tensors, hint)
    first_f = None
    for label, t in tensors.items():
        if t.is_floating_point():
            if first_f is None:
                first_f = (label, t)
            elif t.dtype != first_f[1].dtype:
                raise TypeError(
                    f"{label} has dtype {t.dtype} but {first_f[0]} has {first_f[1].dtype}; "
                    f"convert them to one dtype{hint}"
                )


def check_params(
    params: Any,
    spec: Any,
    sites: Sequence[str] | None = None,
    *,
    name: str = "params",
    floating: bool = True,
    finite: bool = True,
) -> torch.Size:
    """Check the sites of a (batched) parameter mapping against a spec; return the batch shape.

    Every site in ``sites`` (default: the spec's) must be present, a tensor (floating point
    and finite if asked) whose trailing dims are the site's shape (from ``spec.shapes`` or
    the spec's axes), and the leading (batch) dims of all sites must broadcast. All
    sites lie on one device, none on the meta device (:func:`check_devices`).
    """
    check_mapping(name, params)
    SpecError = _spec_error()
    sites = spec.sites if sites is None else sites
    for site in sites:
        if site not in params:
            raise SpecError(f"site {site!r} of the spec is missing from {name} (have {sorted(params)})")
    check_devices({f"{name}[{site!r}]": params[site] for site in sites})
    batches = {}
    for site in sites:
        x = params[site]
        label = f"{name}[{site!r}]"
        check_tensor(label, x, floating=floating)
        shape = None if spec.shapes is None else spec.shapes.get(site)
        nd = len(shape) if shape is not None else spec.action(site).event_ndim
        if x.dim() < nd or (shape is not None and tuple(x.shape[x.dim() - nd :]) != shape):
            want = "?" * nd if shape is None else ", ".join(map(str, shape))
            raise SpecError(f"{label} has shape {tuple(x.shape)}, expected (*batch, {want})")
        if finite:
            check_finite(label, x)
        batches[site] = tuple(x.shape[: x.dim() - nd])
    try:
        return broadcast_shapes(*batches.values())
    except RuntimeError:
        raise SpecError(f"the sites of {name} have batch shapes {batches} that do not broadcast") from None
