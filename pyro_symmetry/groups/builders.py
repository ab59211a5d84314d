"""Build a :class:`PermutationSpec` from layer names or from a module."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

from .._validation import check_int
from .spec import Axis, NeuronGroup, PermutationSpec, SpecError

__all__ = ["mlp_spec", "model_site_shapes", "spec_from_module"]


def mlp_spec(
    layer_names: Sequence[str],
    hidden_sizes: Sequence[int],
    *,
    bias: bool = True,
    activation_symmetry: str = "none",
) -> PermutationSpec:
    """Spec of an MLP whose layer ``l`` has sites ``"{layer}.weight"`` ``(out, in)``
    and ``"{layer}.bias"`` ``(out,)``.

    Parameters
    ----------
    layer_names : sequence of L names
    hidden_sizes : sequence of L - 1 widths
        Hidden group ``l`` permutes rows of layer ``l`` and columns of layer ``l+1``.
    bias : bool
        Whether the layers have biases.
    activation_symmetry : {"none", "sign", "scale"}
        ``"sign"`` for odd activations (tanh), ``"scale"`` for ReLU.

    Examples
    --------
    >>> spec = mlp_spec(["fc1", "fc2", "fc3"], [32, 32])
    >>> spec.log_order  # 2 * lgamma(33)
    """
    if isinstance(layer_names, str) or not isinstance(layer_names, Sequence):
        raise TypeError(f"layer_names must be a sequence of layer names, got {layer_names!r}")
    if isinstance(hidden_sizes, str) or not isinstance(hidden_sizes, Sequence):
        raise TypeError(f"hidden_sizes must be a sequence of ints, got {hidden_sizes!r}")
    layer_names = list(layer_names)
    for i, name in enumerate(layer_names):
        if not isinstance(name, str):
            raise TypeError(f"layer_names[{i}] must be a str, got {name!r}")
    if len(set(layer_names)) != len(layer_names):
        raise SpecError(f"layer_names must be distinct, got {layer_names}")
    hidden_sizes = [check_int(f"hidden_sizes[{i}]", h) for i, h in enumerate(hidden_sizes)]
    if not isinstance(bias, bool):
        raise TypeError(f"bias must be a bool, got {bias!r}")
    if len(hidden_sizes) != len(layer_names) - 1:
        raise SpecError(
            f"mlp_spec needs one hidden size per layer boundary: got {len(layer_names)} layers "
            f"{layer_names} and {len(hidden_sizes)} hidden sizes {hidden_sizes}"
        )
    groups = {}
    for i, n in enumerate(hidden_sizes):
        cur, nxt = layer_names[i], layer_names[i + 1]
        incoming = [Axis(f"{cur}.weight", -2, 1, 2)] + ([Axis(f"{cur}.bias", -1, 1, 1)] if bias else [])
        groups[cur] = NeuronGroup(
            n, incoming=incoming, outgoing=[Axis(f"{nxt}.weight", -1, 1, 2)], activation_symmetry=activation_symmetry
        )
    return PermutationSpec(groups)


# Effect of each pointwise module on the extra activation symmetries that survive
# between two layers: the intersection over the chain decides the group's symmetry.
_BOTH = frozenset({"sign", "scale"})
_SCALE = frozenset({"scale"})
_SIGN = frozenset({"sign"})
_NONE: frozenset = frozenset()
_POINTWISE: dict[type, frozenset] = {
    nn.Identity: _BOTH,
    nn.Flatten: _BOTH,
    nn.Dropout: _BOTH,
    nn.Dropout1d: _BOTH,
    nn.Dropout2d: _BOTH,
    nn.AvgPool1d: _BOTH,
    nn.AvgPool2d: _BOTH,
    nn.AdaptiveAvgPool1d: _BOTH,
    nn.AdaptiveAvgPool2d: _BOTH,
    nn.ReLU: _SCALE,
    nn.LeakyReLU: _SCALE,
    nn.MaxPool1d: _SCALE,
    nn.MaxPool2d: _SCALE,
    nn.AdaptiveMaxPool1d: _SCALE,
    nn.AdaptiveMaxPool2d: _SCALE,
    nn.Tanh: _SIGN,
    nn.Hardtanh: _SIGN,
    nn.Softsign: _SIGN,
    nn.Tanhshrink: _SIGN,
    nn.ReLU6: _NONE,
    nn.ELU: _NONE,
    nn.SELU: _NONE,
    nn.CELU: _NONE,
    nn.GELU: _NONE,
    nn.SiLU: _NONE,
    nn.Mish: _NONE,
    nn.Sigmoid: _NONE,
    nn.Softplus: _NONE,
    nn.Hardswish: _NONE,
    nn.Hardsigmoid: _NONE,
    nn.LogSigmoid: _NONE,
    nn.Softmax: _NONE,
    nn.LogSoftmax: _NONE,
}
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if not list(m.children())]


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def spec_from_module(module: nn.Module) -> PermutationSpec:
    """Spec of a chain of ``Linear``/``Conv1d``/``Conv2d`` layers.

    The module's leaf submodules are read in registration order as a chain
    (``nn.Sequential``, or a ``PyroModule`` whose layers are registered in
    forward order). Between two layers only pointwise activations, pooling,
    dropout, flatten and BatchNorm/LayerNorm are allowed; norm parameters and
    running statistics follow their channels. A ``Flatten`` from conv channels to
    a ``Linear`` makes each channel a block of ``in_features // channels``
    columns. The output layer's neurons are not permuted.

    Each group's ``activation_symmetry`` is inferred from the modules between
    its layer and the next: ``"scale"`` if they are all positively homogeneous
    (ReLU, max pooling), ``"sign"`` if all odd (tanh, average pooling), else
    ``"none"`` (any norm layer removes both).

    Residual networks are not chains: build the per-layer spec by hand or with
    this function on each branch and tie the groups of one residual stream with
    :meth:`PermutationSpec.tie`.

    Raises
    ------
    SpecError
        If a leaf has parameters but is not a supported layer, naming the leaf.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    groups: dict[str, dict[str, Any]] = {}
    current: str | None = None
    last_layer: str | None = None
    for name, m in _leaves(module):
        p = _prefix(name)
        if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            size = m.out_features if isinstance(m, nn.Linear) else m.out_channels
            if isinstance(m, (nn.Conv1d, nn.Conv2d)) and m.groups != 1:
                raise SpecError(f"layer {name!r}: grouped convolutions (groups={m.groups}) are not supported")
            if current is not None:
                g = groups[current]
                inner = 1
                if isinstance(m, nn.Linear) and g["conv"]:
                    if m.in_features % g["size"]:
                        raise SpecError(
                            f"layer {name!r} has in_features={m.in_features}, not a multiple of the "
                            f"{g['size']} channels of group {current!r}"
                        )
                    inner = m.in_features // g["size"]
                elif (m.in_features if isinstance(m, nn.Linear) else m.in_channels) != g["size"]:
                    raise SpecError(
                        f"layer {name!r} reads {g['size']} features from group {current!r} but expects "
                        f"{m.in_features if isinstance(m, nn.Linear) else m.in_channels}"
                    )
                g["outgoing"].append(Axis(f"{p}weight", 1, inner))
            incoming = [Axis(f"{p}weight", 0)]
            if m.bias is not None:
                incoming.append(Axis(f"{p}bias", 0))
            groups[name] = dict(
                size=size, incoming=incoming, outgoing=[], sym=set(_BOTH), conv=not isinstance(m, nn.Linear)
            )
            current = last_layer = name
        elif isinstance(m, _NORMS):
            if current is None:
                continue  # input normalization: not a hidden group
            g = groups[current]
            if isinstance(m, nn.LayerNorm):
                if m.normalized_shape[0] != g["size"]:
                    raise SpecError(
                        f"LayerNorm {name!r} normalizes shape {tuple(m.normalized_shape)}, but group "
                        f"{current!r} has {g['size']} features on its leading normalized axis"
                    )
            elif isinstance(m, nn.GroupNorm):
                if m.num_groups != 1 and m.num_groups != g["size"]:
                    raise SpecError(
                        f"GroupNorm {name!r} with {m.num_groups} groups mixes channels of group "
                        f"{current!r} non-equivariantly; only num_groups 1 or C are supported"
                    )
            elif m.num_features != g["size"]:
                raise SpecError(
                    f"{type(m).__name__} {name!r} has {m.num_features} features but group {current!r} has {g['size']}"
                )
            for pname, t in list(m.named_parameters(recurse=False)) + list(m.named_buffers(recurse=False)):
                if t is not None and t.dim() >= 1:
                    g["incoming"].append(Axis(f"{p}{pname}", 0))
            g["sym"] &= _NONE
        elif type(m) in _POINTWISE or isinstance(m, tuple(_POINTWISE)):
            kind = next(v for k, v in _POINTWISE.items() if isinstance(m, k))
            if current is not None:
                groups[current]["sym"] &= kind
        elif any(True for _ in m.parameters(recurse=False)):
            raise SpecError(
                f"cannot infer the symmetry of module {name!r} ({type(m).__name__}); build the "
                "PermutationSpec by hand with NeuronGroup(...)"
            )
        else:
            raise SpecError(
                f"module {name!r} ({type(m).__name__}) is not a known pointwise operation; build the "
                "PermutationSpec by hand, or wrap custom activations in a supported module"
            )
    if last_layer is None:
        raise SpecError(f"module {type(module).__name__} has no Linear or Conv layer")
    del groups[last_layer]  # output neurons are not interchangeable
    out = {}
    for k, g in groups.items():
        sym = "scale" if "scale" in g["sym"] else ("sign" if "sign" in g["sym"] else "none")
        out[k] = NeuronGroup(g["size"], tuple(g["incoming"]), tuple(g["outgoing"]), sym)
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    shapes.update(_pyro_sample_shapes(module))
    return PermutationSpec(out, shapes)


def _pyro_sample_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of ``PyroSample`` attributes (priors), named like state-dict keys."""
    try:
        from pyro.nn import PyroSample
    except ImportError:  # pragma: no cover
        return {}
    shapes = {}
    for mname, m in module.named_modules():
        for attr, prior in getattr(m, "_pyro_samples", {}).items():
            if isinstance(prior, PyroSample):
                prior = prior.prior
            if callable(prior) and not hasattr(prior, "event_shape"):
                continue  # prior depends on the module state: shapes come from a trace
            shape = tuple(prior.batch_shape) + tuple(prior.event_shape)
            shapes[f"{_prefix(mname)}{attr}"] = shape
    return shapes


def model_site_shapes(model: Callable | nn.Module, *args: Any, **kwargs: Any) -> dict[str, tuple[int, ...]]:
    """Site shapes of a model: latent Pyro sample sites of one trace, plus an
    ``nn.Module``'s parameters and buffers by state-dict name.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    if isinstance(model, nn.Module):
        shapes.update({k: tuple(v.shape) for k, v in model.state_dict().items()})
        shapes.update(_pyro_sample_shapes(model))
    if args or kwargs or not isinstance(model, nn.Module):
        import pyro.poutine as poutine
        from pyro.poutine.util import site_is_subsample

        tr = poutine.trace(poutine.block(model, hide_types=["param"])).get_trace(*args, **kwargs)
        for name, site in tr.nodes.items():
            if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site):
                # A site's own shape is its event shape plus the batch dims that belong
                # to the site itself (``expand`` outside any plate).
                fn = site["fn"]
                own = _own_batch_ndim(site)
                shapes[name] = tuple(fn.batch_shape[len(fn.batch_shape) - own :]) + tuple(fn.event_shape)
    return shapes


def _own_batch_ndim(site: Mapping[str, Any]) -> int:
    """Batch dims of a site that are not plates (``dist.expand`` inside no plate)."""
    plate_dims = {-f.dim for f in site["cond_indep_stack"] if f.vectorized}
    bs = site["fn"].batch_shape
    own = 0
    for i in range(1, len(bs) + 1):
        if i in plate_dims:
            break
        own = i
    return own
