"""Ready Bayesian neural networks with iid priors and their symmetry spec.

Both models are ``PyroModule`` s whose weights are ``PyroSample`` sites named like
``nn.Module`` parameters (``"fc1.weight"``, ``"conv1.bias"``), work with
``AutoNormal``/``AutoDiagonalNormal``, ``SVI`` with ``Trace_ELBO`` (also with
``vectorize_particles=True``) and ``Predictive`` (also ``parallel=True``), and carry
a ``.spec`` (:class:`~pyro_symmetry.groups.PermutationSpec`) bound to their sites.

Each also has a ``functional(params, x)`` method that evaluates the network for a
mapping of (batched) weights without Pyro: ``params[site]`` of shape
``(*batch, *site_shape)`` gives outputs ``(*batch, N, out)``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, PyroSample
from torch import nn

from .._shapes import broadcast_shapes
from .._validation import check_finite, check_int, check_mapping, check_real
from ..groups import Axis, NeuronGroup, PermutationSpec, SpecError, activation_symmetry, mlp_spec

__all__ = ["ACTIVATIONS", "BayesianCNN", "BayesianMLP", "activation_symmetry"]

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "sigmoid": nn.Sigmoid,
    "softplus": nn.Softplus,
    "identity": nn.Identity,
}
LIKELIHOODS = ("classification", "regression")


def _activation(act: str | nn.Module | type) -> nn.Module:
    if isinstance(act, str):
        if act not in ACTIVATIONS:
            raise ValueError(f"unknown activation {act!r}; choose one of {sorted(ACTIVATIONS)} or pass an nn.Module")
        return ACTIVATIONS[act]()
    if isinstance(act, type) and issubclass(act, nn.Module):
        return act()
    if isinstance(act, nn.Module):
        return act
    raise ValueError(f"activation must be a name, an nn.Module or an nn.Module class, got {act!r}")


def _drop_plate_dim(w: torch.Tensor, event_ndim: int) -> torch.Tensor:
    """Weights sampled under Pyro plates carry a trailing singleton batch dim
    aligned with the ``data`` plate (``(P, 1, out, in)`` with vectorized particles or
    ``Predictive(parallel=True)``); drop it so outputs are ``(P, N, out)``."""
    if w.dim() > event_ndim and w.shape[-event_ndim - 1] == 1:
        w = w.squeeze(-event_ndim - 1)
    return w


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    # (N, in) or (*batch, N, in) times (*batch, out, in) -> (*batch, N, out): one batched GEMM.
    y = torch.matmul(x, w.transpose(-1, -2))
    return y if b is None else y + b.unsqueeze(-2)


class _BayesianBase(PyroModule):
    """Shared likelihood, priors and plate handling."""

    def _init_common(self, out_features: int, likelihood: str, prior_scale: float, obs_scale: float | None) -> None:
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        prior_scale = check_real("prior_scale", prior_scale, positive=True)
        if obs_scale is not None:
            obs_scale = check_real("obs_scale", obs_scale, positive=True)
        self.out_features = check_int("out_features", out_features, minimum=1)
        self.likelihood = likelihood
        self.prior_scale = prior_scale
        self.obs_scale = obs_scale
        # Priors are built in this dtype/device and follow ``model.to(...)`` / ``model.double()``.
        self._dtype, self._device = torch.get_default_dtype(), torch.device("cpu")
        self._site_shapes: dict[str, tuple[int, ...]] = {}

    def _prior(self, *shape: int) -> PyroSample:
        zero = torch.zeros((), dtype=self._dtype, device=self._device)
        return PyroSample(dist.Normal(zero, zero + self.prior_scale).expand(shape).to_event(len(shape)))

    def _set_priors(self) -> None:
        for site, shape in self._site_shapes.items():
            layer, attr = site.rsplit(".", 1)
            setattr(self._layer(layer), attr, self._prior(*shape))

    def _apply(self, fn: Callable, *args: Any, **kwargs: Any) -> _BayesianBase:
        # ``model.to(torch.float64)``, ``.double()``, ``.cuda()``: move the priors too (they
        # are distributions, not buffers), so sampled weights follow the module.
        out = super()._apply(fn, *args, **kwargs)
        probe = fn(torch.zeros((), dtype=self._dtype, device=self._device))
        if (probe.dtype, probe.device) != (self._dtype, self._device):
            self._dtype, self._device = probe.dtype, probe.device
            self._set_priors()
        return out

    def _check_x(self, x: torch.Tensor) -> None:
        if not torch.is_tensor(x):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
        n_in = len(self.input_shape)
        if x.dim() < n_in + 1 or tuple(x.shape[x.dim() - n_in :]) != self.input_shape:
            want = ", ".join(map(str, self.input_shape))
            raise SpecError(f"x has shape {tuple(x.shape)}, expected (N, {want}) for {type(self).__name__}")

    def _check_functional(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> None:
        """Sites, shapes, dtypes and devices of ``functional(params, x)``, named on failure."""
        check_mapping("params", params)
        self._check_x(x)
        batches = set()
        for site, shape in self._site_shapes.items():
            if site not in params:
                raise SpecError(f"params is missing site {site!r} of {type(self).__name__}")
            w = params[site]
            if not torch.is_tensor(w):
                raise TypeError(f"params[{site!r}] must be a torch.Tensor, got {type(w).__name__}")
            nd = len(shape)
            if w.dim() < nd or tuple(w.shape[w.dim() - nd :]) != shape:
                raise SpecError(
                    f"params[{site!r}] has shape {tuple(w.shape)}, expected (*batch, {', '.join(map(str, shape))})"
                )
            if w.dtype != x.dtype:
                raise TypeError(
                    f"params[{site!r}] has dtype {w.dtype} but x has {x.dtype}; use one dtype (the model's "
                    "priors follow model.to(dtype))"
                )
            if w.device != x.device:
                raise ValueError(f"params[{site!r}] is on {w.device} but x is on {x.device}")
            batches.add(tuple(w.shape[: w.dim() - nd]))
        if len(batches) > 1:
            try:
                broadcast_shapes(*batches)
            except RuntimeError:
                raise SpecError(
                    f"the sites of params have batch shapes {sorted(batches)} that do not broadcast"
                ) from None

    def _check_data(self, x: torch.Tensor, y: torch.Tensor | None, num_data: int | None) -> None:
        self._check_x(x)
        check_finite("x", x)
        n = x.shape[x.dim() - len(self.input_shape) - 1]
        if num_data is not None:
            check_int("num_data", num_data, minimum=n)
        if y is None:
            return
        if not torch.is_tensor(y):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if self.likelihood == "classification":
            if y.shape != (n,):
                raise SpecError(f"y has shape {tuple(y.shape)}, expected ({n},): one class label per row of x")
            if y.numel():
                lo, hi = torch.aminmax(y)
                if not (0 <= lo and hi < self.out_features) or (y.is_floating_point() and bool((y != y.round()).any())):
                    raise ValueError(
                        f"y must hold integer class labels in [0, {self.out_features}), got values in "
                        f"[{lo.item()}, {hi.item()}]"
                    )
        else:
            want = (n,) if self.out_features == 1 else (n, self.out_features)
            if y.shape != want:
                raise SpecError(f"y has shape {tuple(y.shape)}, expected {want}")
            if not y.is_floating_point():
                raise TypeError(f"regression targets y must be floating point, got dtype {y.dtype}")
            check_finite("y", y)

    def _observe(self, out: torch.Tensor, y: torch.Tensor | None, num_data: int | None) -> None:
        n = out.shape[-2]
        size = n if num_data is None else int(num_data)
        sigma = self.obs_scale
        if self.likelihood != "classification" and sigma is None:
            # A global latent, sampled outside the data plate: shape () or (P, 1) under
            # vectorized particles.
            one = torch.ones((), dtype=out.dtype, device=out.device)
            sigma = pyro.sample("obs_scale", dist.HalfNormal(one))
        # A fixed subsample keeps the likelihood scaled by size / batch without random indices.
        with pyro.plate("data", size=size, subsample=torch.arange(n, device=out.device)):
            if self.likelihood == "classification":
                pyro.sample("obs", dist.Categorical(logits=out), obs=y)
            else:
                if self.out_features == 1:
                    pyro.sample("obs", dist.Normal(out.squeeze(-1), sigma), obs=y)
                else:
                    if torch.is_tensor(sigma) and sigma.dim():
                        sigma = sigma.unsqueeze(-1)
                    pyro.sample("obs", dist.Normal(out, sigma).to_event(1), obs=y)

    def _sampled_params(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self._layer(name.rsplit(".", 1)[0]), name.rsplit(".", 1)[1]) for name in self.site_names}

    def _layer(self, name: str) -> nn.Module:
        return getattr(self, name)

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        """Run the model: sample weights, observe ``y`` if given.

        Parameters
        ----------
        x : Tensor ``(N, *input_shape)``
        y : Tensor ``(N,)`` (class labels or targets), optional
        num_data : int, optional
            Full data-set size when ``x`` is a minibatch (scales the likelihood).

        Returns
        -------
        Tensor ``(*particles, N, out_features)``: logits or regression means.
        """
        self._check_data(x, y, num_data)
        params = {k: _drop_plate_dim(v, self._event_ndims[k]) for k, v in self._sampled_params().items()}
        out = self.functional(params, x)
        self._observe(out, y, num_data)
        return out


class BayesianMLP(_BayesianBase):
    """A Bayesian MLP ``x -> act(W_1 x + b_1) -> ... -> W_L h + b_L`` with iid
    ``Normal(0, prior_scale)`` priors on every weight and bias.

    Parameters
    ----------
    in_features : int
    hidden_sizes : sequence of int
    out_features : int
    activation : str or nn.Module
        Any pointwise activation (``"relu"``, ``"tanh"``, ...). ReLU adds a
        scaling symmetry, tanh sign flips (recorded in ``.spec``).
    likelihood : {"classification", "regression"}
        Categorical on logits, or Normal with ``obs_scale`` (``None``: a
        ``HalfNormal(1)`` latent ``"obs_scale"``).
    prior_scale : float
    obs_scale : float or None
    bias : bool

    Attributes
    ----------
    spec : PermutationSpec
        Groups named after the layers (``"fc1"``, ...), bound to the sites' shapes.

    Notes
    -----
    The priors (and so the sampled weights) follow the module's dtype and device:
    ``model.to(torch.float64)`` (or ``model.double()``) gives a float64 network, whose
    inputs must then be float64 too. ``forward`` and ``functional`` check the data
    (shapes, dtypes, NaN/Inf, class labels in range) and name what is wrong.

    Examples
    --------
    >>> model = BayesianMLP(64, [32, 32], 10)
    >>> guide = pyro.infer.autoguide.AutoNormal(model)
    >>> svi = pyro.infer.SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), pyro.infer.Trace_ELBO())
    >>> svi.step(x, y)
    """

    def __init__(
        self,
        in_features: int,
        hidden_sizes: Sequence[int],
        out_features: int,
        *,
        activation: str | nn.Module = "relu",
        likelihood: str = "classification",
        prior_scale: float = 1.0,
        obs_scale: float | None = 1.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(hidden_sizes, (str, bytes)) or not isinstance(hidden_sizes, Sequence):
            raise TypeError(f"hidden_sizes must be a sequence of ints, got {hidden_sizes!r}")
        sizes = [
            check_int("in_features", in_features),
            *[check_int(f"hidden_sizes[{i}]", h) for i, h in enumerate(hidden_sizes)],
            check_int("out_features", out_features),
        ]
        if any(s < 1 for s in sizes):
            raise ValueError(f"all layer sizes must be >= 1, got {sizes} (in_features, *hidden_sizes, out_features)")
        if not isinstance(bias, bool):
            raise TypeError(f"bias must be a bool, got {bias!r}")
        self._init_common(out_features, likelihood, prior_scale, obs_scale)
        self.input_shape = (sizes[0],)
        self.sizes = sizes
        self.act = _activation(activation)
        self.layer_names = [f"fc{i + 1}" for i in range(len(sizes) - 1)]
        self.site_names: list[str] = []
        self._event_ndims: dict[str, int] = {}
        for name, (n_in, n_out) in zip(self.layer_names, zip(sizes[:-1], sizes[1:])):
            layer = PyroModule()
            layer.weight = self._prior(n_out, n_in)
            self.site_names.append(f"{name}.weight")
            self._event_ndims[f"{name}.weight"] = 2
            if bias:
                layer.bias = self._prior(n_out)
                self.site_names.append(f"{name}.bias")
                self._event_ndims[f"{name}.bias"] = 1
            setattr(self, name, layer)
        self.bias = bias
        shapes: dict[str, tuple[int, ...]] = {}  # in site (= packing) order
        for n, i, o in zip(self.layer_names, sizes[:-1], sizes[1:]):
            shapes[f"{n}.weight"] = (o, i)
            if bias:
                shapes[f"{n}.bias"] = (o,)
        self._site_shapes = shapes
        self.spec = mlp_spec(
            self.layer_names, sizes[1:-1], bias=bias, activation_symmetry=activation_symmetry(self.act)
        ).with_shapes(shapes)

    def functional(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(*batch, N, out)`` for weights ``params[site]`` ``(*batch, *shape)``."""
        self._check_functional(params, x)
        h = x
        last = len(self.layer_names) - 1
        for i, name in enumerate(self.layer_names):
            w = params[f"{name}.weight"]
            b = params[f"{name}.bias"] if self.bias else None
            h = _linear(h, w, b)
            if i < last:
                h = self.act(h)
        return h


def _conv2d(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, padding: int) -> torch.Tensor:
    """Conv with batched weights ``(*batch, out, in, k, k)`` via one grouped conv.

    ``x`` is ``(N, C, H, W)`` or ``(*batch, N, C, H, W)``.
    """
    batch = w.shape[:-4]
    if not batch:
        return F.conv2d(x, w, b, padding=padding)
    B = math.prod(batch)
    out_c, in_c = w.shape[-4], w.shape[-3]
    if x.dim() == 4:
        x = x.expand(batch + x.shape)
    n = x.shape[-4]
    xg = x.reshape(B, n, in_c, *x.shape[-2:]).transpose(0, 1).reshape(n, B * in_c, *x.shape[-2:])
    wg = w.reshape(B * out_c, in_c, *w.shape[-2:])
    bg = None if b is None else b.reshape(B * out_c)
    y = F.conv2d(xg, wg, bg, padding=padding, groups=B)
    return y.reshape(n, B, out_c, *y.shape[-2:]).transpose(0, 1).reshape(batch + (n, out_c) + y.shape[-2:])


class BayesianCNN(_BayesianBase):
    """A small Bayesian conv net for images ``(N, C, H, W)``:
    ``[conv3x3 -> act -> avgpool2] x len(channels) -> flatten -> linear``.

    Average pooling keeps both the ReLU scaling and the tanh sign symmetry. The
    spec permutes each conv layer's output channels (axis 0 of its weight and
    bias, axis 1 of the next conv) and, for the last conv, blocks of
    ``H' * W'`` flattened columns of ``"fc.weight"``.

    Parameters
    ----------
    in_channels : int
    image_size : (int, int)
    channels : sequence of int
    out_features : int
    activation, likelihood, prior_scale, obs_scale : as :class:`BayesianMLP`
    """

    def __init__(
        self,
        in_channels: int,
        image_size: tuple[int, int],
        channels: Sequence[int],
        out_features: int,
        *,
        activation: str | nn.Module = "relu",
        likelihood: str = "classification",
        prior_scale: float = 1.0,
        obs_scale: float | None = 1.0,
    ) -> None:
        super().__init__()
        self._init_common(out_features, likelihood, prior_scale, obs_scale)
        self.act = _activation(activation)
        if isinstance(channels, (str, bytes)) or not isinstance(channels, Sequence):
            raise TypeError(f"channels must be a sequence of ints, got {channels!r}")
        channels = [check_int(f"channels[{i}]", c) for i, c in enumerate(channels)]
        if not channels or any(c < 1 for c in channels):
            raise ValueError(f"channels must be a non-empty list of positive ints, got {channels}")
        if not isinstance(image_size, Sequence) or len(image_size) != 2:
            raise TypeError(f"image_size must be a pair (height, width), got {image_size!r}")
        h, w = (check_int(f"image_size[{i}]", v, minimum=1) for i, v in enumerate(image_size))
        chans = [check_int("in_channels", in_channels, minimum=1), *channels]
        self.input_shape = (chans[0], h, w)
        self.layer_names = [f"conv{i + 1}" for i in range(len(channels))] + ["fc"]
        self.site_names, self._event_ndims, shapes = [], {}, {}
        for name, c_in, c_out in zip(self.layer_names[:-1], chans[:-1], chans[1:]):
            layer = PyroModule()
            layer.weight = self._prior(c_out, c_in, 3, 3)
            layer.bias = self._prior(c_out)
            setattr(self, name, layer)
            shapes[f"{name}.weight"], shapes[f"{name}.bias"] = (c_out, c_in, 3, 3), (c_out,)
            h, w = h // 2, w // 2
        if h < 1 or w < 1:
            raise ValueError(f"image_size {image_size} is too small for {len(channels)} pooling stages")
        self.spatial = h * w
        fc = PyroModule()
        fc.weight = self._prior(out_features, chans[-1] * self.spatial)
        fc.bias = self._prior(out_features)
        self.fc = fc
        shapes["fc.weight"], shapes["fc.bias"] = (out_features, chans[-1] * self.spatial), (out_features,)
        for k, s in shapes.items():
            self.site_names.append(k)
            self._event_ndims[k] = len(s)
        self._site_shapes = shapes
        sym = activation_symmetry(self.act)
        groups = {}
        for i, name in enumerate(self.layer_names[:-1]):
            nxt = self.layer_names[i + 1]
            inner = self.spatial if nxt == "fc" else 1
            groups[name] = NeuronGroup(
                chans[i + 1],
                incoming=[Axis(f"{name}.weight", 0), Axis(f"{name}.bias", 0)],
                outgoing=[Axis(f"{nxt}.weight", 1, inner)],
                activation_symmetry=sym,
            )
        self.spec = PermutationSpec(groups, shapes)

    def functional(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(*batch, N, out)`` for weights ``params[site]`` ``(*batch, *shape)``."""
        self._check_functional(params, x)
        h = x
        for name in self.layer_names[:-1]:
            h = _conv2d(h, params[f"{name}.weight"], params[f"{name}.bias"], padding=1)
            h = F.avg_pool2d(self.act(h).flatten(0, -4), 2).reshape(h.shape[:-2] + (h.shape[-2] // 2, h.shape[-1] // 2))
        return _linear(h.flatten(-3), params["fc.weight"], params["fc.bias"])
