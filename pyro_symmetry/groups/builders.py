"""Build a :class:`PermutationSpec` from layer names or from a module."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from .._validation import check_int
from ._chain import BOTH, LAYERS, NONE, NORMS, execution_steps, pointwise_kind
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


def _prefix(name: str) -> str:
    return f"{name}." if name else ""


def _layer_shapes(name: str, m: nn.Module) -> dict[str, tuple[int, ...]]:
    """Weight and bias shapes of a layer from its attributes (also when they are priors)."""
    p = _prefix(name)
    if isinstance(m, nn.Linear):
        w = (m.out_features, m.in_features)
    else:
        w = (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    return {f"{p}weight": w, **({f"{p}bias": (w[0],)} if _has_bias(m) else {})}


def _has_bias(m: nn.Module) -> bool:
    return "bias" in getattr(m, "_pyro_samples", {}) or getattr(m, "bias", None) is not None


def spec_from_module(
    module: nn.Module, *, activation_symmetry: str | Mapping[str, str] | None = None
) -> PermutationSpec:
    """Spec of a chain of ``Linear``/``Conv1d``/``Conv2d`` layers.

    The chain is read in execution order from a ``torch.fx`` trace of the module
    (``nn.Sequential``, or any module whose ``forward`` is traceable: functional
    activations such as ``torch.tanh`` or ``F.relu`` are then recognized, and a
    residual connection is refused). A module that cannot be traced (e.g. a
    ``PyroModule`` whose ``forward`` holds Pyro statements) is read in the
    registration order of its leaf modules, which must be the forward order.
    Between two layers only pointwise activations, pooling, dropout, flatten and
    BatchNorm/LayerNorm are allowed; norm parameters and running statistics follow
    their channels. A ``Flatten`` from conv channels to a ``Linear`` makes each
    channel a block of ``in_features // channels`` columns. The output layer's
    neurons are not permuted.

    Each group's ``activation_symmetry`` is inferred from the operations between
    its layer and the next: ``"scale"`` if they are all positively homogeneous
    (ReLU, max pooling), ``"sign"`` if all odd (tanh, sin, erf, average pooling),
    else ``"none"`` (any norm layer removes both). When the order is only known
    from registration (an untraceable module that is not made of ``nn.Sequential``
    containers), a gap between two layers with no activation module registered in
    it may hide a functional activation, so such a group gets ``"none"``: its
    permutations are still exact, and ``activation_symmetry=`` declares more.

    A module with a ``spec`` attribute that is a ``PermutationSpec`` (the models of
    :mod:`pyro_symmetry.models`) returns it.

    Residual networks are not chains: build the per-layer spec by hand or with
    this function on each branch and tie the groups of one residual stream with
    :meth:`PermutationSpec.tie`.

    Parameters
    ----------
    module : nn.Module
    activation_symmetry : {"none", "sign", "scale"} or mapping group -> str, optional
        Overrides the inferred symmetry of every group (a str) or of the named ones.

    Raises
    ------
    SpecError
        If a step of the chain is not a supported layer or operation (naming it), or
        the module is not a chain (a residual connection, a layer called twice).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    own = getattr(module, "spec", None)
    if isinstance(own, PermutationSpec):
        return _override(own, activation_symmetry)
    steps, exact_order = execution_steps(module)
    groups: dict[str, dict[str, Any]] = {}
    current: str | None = None
    last_layer: str | None = None
    for name, m in steps:
        if isinstance(m, frozenset):  # a functional operation
            if current is not None:
                groups[current]["sym"] &= m
                groups[current]["seen"] = True
            continue
        p = _prefix(name)
        kind = pointwise_kind(m)
        if isinstance(m, LAYERS):
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
            if _has_bias(m):
                incoming.append(Axis(f"{p}bias", 0))
            groups[name] = dict(
                size=size,
                incoming=incoming,
                outgoing=[],
                sym=set(BOTH),
                conv=not isinstance(m, nn.Linear),
                seen=exact_order,
                layer=m,
            )
            current = last_layer = name
        elif isinstance(m, NORMS):
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
            g["sym"] &= NONE
            g["seen"] = True
        elif kind is not None:
            if current is not None:
                groups[current]["sym"] &= kind
                groups[current]["seen"] = True
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
    shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for k, g in groups.items():
        shapes.update(_layer_shapes(k, g["layer"]))
    shapes.update(_pyro_sample_shapes(module))
    del groups[last_layer]  # output neurons are not interchangeable
    out = {}
    for k, g in groups.items():
        sym = (
            "none"
            if not g["seen"]
            else ("scale" if "scale" in g["sym"] else ("sign" if "sign" in g["sym"] else "none"))
        )
        out[k] = NeuronGroup(g["size"], tuple(g["incoming"]), tuple(g["outgoing"]), sym)
    return _override(PermutationSpec(out, shapes), activation_symmetry)


def _override(spec: PermutationSpec, activation_symmetry: str | Mapping[str, str] | None) -> PermutationSpec:
    if activation_symmetry is None:
        return spec
    if isinstance(activation_symmetry, str):
        activation_symmetry = dict.fromkeys(spec.groups, activation_symmetry)
    if not isinstance(activation_symmetry, Mapping):
        raise TypeError(f"activation_symmetry must be a str or a mapping group -> str, got {activation_symmetry!r}")
    unknown = [k for k in activation_symmetry if k not in spec.groups]
    if unknown:
        raise SpecError(
            f"activation_symmetry names groups {unknown} that the spec does not have ({sorted(spec.groups)})"
        )
    return spec.replace_groups(
        {
            k: replace(g, activation_symmetry=activation_symmetry.get(k, g.activation_symmetry))
            for k, g in spec.groups.items()
        }
    )


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

        from .._state import isolated

        # Tracing samples from the prior and may create params: leave the caller's RNGs
        # and param store as they were.
        with isolated():
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
