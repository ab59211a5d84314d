"""Build a :class:`PermutationSpec` from layer names or from a module."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from torch import nn

from .._validation import check_int
from .spec import Axis, NeuronGroup, PermutationSpec, SpecError

__all__ = ["activation_symmetry", "mlp_spec", "model_site_shapes", "own_batch_ndim", "spec_from_module"]


def activation_symmetry(act: nn.Module) -> str:
    """``"scale"`` (positively homogeneous: ReLU), ``"sign"`` (odd: tanh) or ``"none"``
    for a pointwise activation module (``"scale"`` when both hold, e.g. ``nn.Identity``)."""
    from ._chain import pointwise_kind

    kinds = pointwise_kind(act) or frozenset()
    return "scale" if "scale" in kinds else ("sign" if "sign" in kinds else "none")


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


def spec_from_module(
    module: nn.Module,
    *,
    example_inputs: Any = None,
    activation_symmetry: str | Mapping[str, str] | None = None,
    use_spec_attribute: bool = True,
) -> PermutationSpec:
    """The symmetry group of a module, read from the forward it executes.

    The forward is run once on ``example_inputs`` (eval mode, Pyro sample sites under a
    trace, the caller's RNGs and param store untouched) and every torch operation it executes
    is recorded, so residual connections, shared layers, Pyro statements and data-dependent
    control flow are read as they ran. Every dim of every tensor is labelled: fixed (batch,
    spatial, sequence, inputs, the network's outputs) or a space of interchangeable channels
    created by a layer's output (a ``Linear``'s rows, a conv's output channels, an embedding
    dim, a parameter used directly such as a class token). Spaces that meet (both sides of
    ``+``, a layer's columns and its input, ``q @ k.T`` over head dims, norm parameters) share
    one permutation; reshapes into ``(heads, dims)``, GroupNorm groups, grouped convolutions
    and ``nn.MultiheadAttention`` give nested groups (units permuted within each block);
    slices and ``cat`` along channels give groups acting on axis slices. A space that reaches
    a fixed dim is fixed. Each group's ``activation_symmetry`` is what every operation on its
    scaled entries keeps (``"scale"``: ReLU, max pooling and linear ops; ``"sign"``: tanh,
    sin, erf; ``"none"``: GELU, SiLU, softmax ...); the rows of a layer feeding a
    BatchNorm/LayerNorm/GroupNorm/RMSNorm and the running statistics are ``passive`` (only
    permuted), the norm's affine weight and bias ``incoming``.

    The spec is then verified: the module, with fresh random parameters, must give the same
    outputs (and likelihood) after its parameters are moved by elements that move every
    neuron and rescaled for groups with a scaling symmetry (a relative tolerance of
    ``sqrt(eps)`` of the dtype). A module with a ``spec`` attribute that is a
    :class:`PermutationSpec` (the models of :mod:`pyro_symmetry.models`) returns it.

    Parameters
    ----------
    module : nn.Module
    example_inputs : Tensor or tuple of Tensors, optional
        Inputs the forward accepts (a model taking ``(x, y)`` gets ``x`` only). By default they
        are built from the first layer that reads the input: ``(2, in_features)`` for a
        ``Linear``, ``(2, C, s, s)`` for a few sizes ``s`` for a conv, integer tokens ``(2, T)``
        for an ``Embedding``.
    activation_symmetry : {"none", "sign", "scale"} or mapping group -> str, optional
        Overrides the inferred symmetry of every group (a str) or of the named ones; the
        result is verified like the inferred one.
    use_spec_attribute : bool
        Return ``module.spec`` when it is a :class:`PermutationSpec` (default).

    Raises
    ------
    SpecError
        If the forward fails on the inputs (naming the module that was running), an operation
        of the forward is unknown (naming it and its module), a tensor is read after an
        in-place update through a view of it, or the verification finds a group that changes
        the function (naming it).

    Notes
    -----
    What is returned is a group of exact symmetries of the recorded forward; where a larger
    group exists but the spec's axes cannot express it, a subgroup is returned (never a
    guess):

    - the spec describes the path the forward took on the example inputs (their shapes,
      their branches of data-dependent control flow); position-table rows or parameters the
      run did not read are not permuted;
    - in a grouped convolution the input channels within each conv group are fixed (their
      permutation would depend on the output block, on another axis of the kernel); conv
      groups move as blocks on both sides and output channels permute within each block;
    - a fused q/k/v projection split with ``reshape(B, T, 3, H, d)`` and indexing gives the
      v dims the q/k dims' permutation (``chunk``/slicing along channels keeps them apart);
    - a channel space reshaped into blocks keeps one level of nesting (heads, dims);
    - sign and scale are only claimed where every operation on the scaled entries keeps them
      (a product of two values, a norm without affine weight, a softmax or a reduction over
      channels removes them); recurrent layers and other unknown operations are refused.
    """
    from ._fromgraph import spec_from_graph
    from ._verify import verify_module

    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a torch.nn.Module, got {type(module).__name__}")
    own = getattr(module, "spec", None)
    if use_spec_attribute and isinstance(own, PermutationSpec):
        return _override(own, activation_symmetry)
    spec, inputs, _ = spec_from_graph(module, example_inputs)
    spec = _override(spec, activation_symmetry)
    verify_module(spec, module, inputs)
    return spec


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


def own_batch_ndim(site: Mapping[str, Any]) -> int:
    """Batch dims of a Pyro trace site that are not plates (``dist.expand`` inside no plate).

    Parameters
    ----------
    site : dict
        A site of a ``poutine.trace`` (``site["fn"]``, ``site["cond_indep_stack"]``).

    Returns
    -------
    int
        The number of rightmost batch dims of ``site["fn"]`` that belong to the site itself
        (its value's shape), not to an enclosing ``pyro.plate``.
    """
    plate_dims = {-f.dim for f in site["cond_indep_stack"] if f.vectorized}
    bs = site["fn"].batch_shape
    own = 0
    for i in range(1, len(bs) + 1):
        if i in plate_dims:
            break
        own = i
    return own


_own_batch_ndim = own_batch_ndim  # the old private name, still imported by some callers
