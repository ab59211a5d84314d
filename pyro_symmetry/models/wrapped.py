"""Any deterministic ``nn.Module`` as a Bayesian neural network.

:class:`BayesianModule` puts an iid ``Normal(0, prior_scale)`` prior on every parameter of
a network (one sample site per parameter, named like the parameter) and a likelihood on
its output. The network itself is only a skeleton: ``functional(params, x)`` evaluates it
with ``torch.func.functional_call`` (vmapped over leading batch dims of the weights), so
the sampled weights are never written into it. Its spec is built from the network's
computation graph by :meth:`~pyro_symmetry.PermutationSpec.from_module`, the machinery
users get for their own networks.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn
from torch.func import functional_call, vmap

from .._shapes import broadcast_shapes
from ..groups import PermutationSpec, SpecError
from .mlp import _BayesianBase, _drop_plate_dim

__all__ = ["BayesianModule"]


class BayesianModule(_BayesianBase):
    """A Bayesian network from a deterministic ``nn.Module``: iid Normal priors on every
    parameter, Categorical (classification) or Normal (regression) likelihood.

    Parameters
    ----------
    net : nn.Module
        The network ``x -> outputs (N, out_features)``. Its parameters are only shapes:
        every one becomes a latent site of the same name. Buffers are used as they are,
        so normalization layers must not keep running statistics
        (``BatchNorm2d(..., track_running_stats=False)``: batch statistics in training and
        prediction alike); a net with such buffers is refused.
    input_shape : tuple of int
        The shape of one input (``x`` is ``(N, *input_shape)``).
    out_features : int
    likelihood, prior_scale, obs_scale : as :class:`BayesianMLP`
    input_dtype : torch.dtype, optional
        Dtype of the inputs (default: floating, the model's dtype); ``torch.long`` for token ids.

    Attributes
    ----------
    spec : PermutationSpec
        ``PermutationSpec.from_module(net)``, bound to the sites' shapes (built on first use).

    Examples
    --------
    >>> net = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    >>> model = BayesianModule(net, (8,), 3)
    >>> guide = ps.AutoSymmetrizedNormal(model, spec=model.spec)
    """

    def __init__(
        self,
        net: nn.Module,
        input_shape: Sequence[int],
        out_features: int,
        *,
        likelihood: str = "classification",
        prior_scale: float = 1.0,
        obs_scale: float | None = 1.0,
        input_dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(net, nn.Module):
            raise TypeError(f"net must be an nn.Module, got {type(net).__name__}")
        self._init_common(out_features, likelihood, prior_scale, obs_scale)
        stats = [k for k, _ in net.named_buffers() if k.endswith(("running_mean", "running_var"))]
        if stats:
            raise SpecError(
                f"net keeps running statistics ({stats[0]!r}, ...): a Bayesian network's prediction must depend only "
                "on its weights and the data; use track_running_stats=False (batch statistics)"
            )
        for p in net.parameters():
            p.requires_grad_(False)
        net.eval()
        self.net = net
        self.input_shape = tuple(int(s) for s in input_shape)
        self.input_dtype = input_dtype
        self._site_shapes = {k: tuple(p.shape) for k, p in net.named_parameters()}
        self.site_names = list(self._site_shapes)
        self._event_ndims = {k: len(s) for k, s in self._site_shapes.items()}
        self._spec: PermutationSpec | None = None

    # ------------------------------------------------------------------ spec
    @property
    def spec(self) -> PermutationSpec:
        if self._spec is None:
            from ..groups.builders import spec_from_module

            x = self._example_input()
            self._spec = spec_from_module(self.net, example_inputs=(x,)).with_shapes(self._site_shapes)
        return self._spec

    def _example_input(self) -> torch.Tensor:
        gen = torch.Generator().manual_seed(0)
        if self.input_dtype is not None and not self.input_dtype.is_floating_point:
            return torch.randint(0, 2, (2, *self.input_shape), generator=gen)
        return torch.randn((2, *self.input_shape), generator=gen, dtype=self._dtype)

    # ------------------------------------------------------------------ priors
    def _site_prior(self, shape: tuple[int, ...]) -> dist.Distribution:
        zero = torch.zeros((), dtype=self._dtype, device=self._device)
        return dist.Normal(zero, zero + self.prior_scale).expand(shape).to_event(len(shape))

    def _set_priors(self) -> None:  # priors are built at sampling time in the current dtype
        pass

    def _sampled_params(self) -> dict[str, torch.Tensor]:
        return {k: pyro.sample(k, self._site_prior(s)) for k, s in self._site_shapes.items()}

    def _check_x(self, x: torch.Tensor) -> None:
        if self.input_dtype is None or self.input_dtype.is_floating_point:
            return super()._check_x(x)
        if not torch.is_tensor(x) or x.is_floating_point():
            raise TypeError(f"x must be an integer tensor of token ids, got {getattr(x, 'dtype', type(x))}")

    def _check_data(self, x: torch.Tensor, y: torch.Tensor | None, num_data: int | None) -> None:
        if self.input_dtype is None or self.input_dtype.is_floating_point:
            return super()._check_data(x, y, num_data)
        self._check_x(x)

    # ------------------------------------------------------------------ network
    def functional(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        """Outputs ``(*batch, N, out)`` for weights ``params[site]`` of shape ``(*batch, *site_shape)``."""
        if self._floating_input():
            self._check_functional(params, x)
        nd = self._event_ndims
        batch = broadcast_shapes(*(params[k].shape[: params[k].dim() - nd[k]] for k in self.site_names))
        if not batch:
            return functional_call(self.net, dict(params), (x,))
        flat = {
            k: params[k].expand(batch + params[k].shape[params[k].dim() - nd[k] :]).reshape((-1, *self._site_shapes[k]))
            for k in self.site_names
        }
        out = vmap(lambda p: functional_call(self.net, p, (x,)))(flat)
        return out.reshape(batch + out.shape[1:])

    def _floating_input(self) -> bool:
        return self.input_dtype is None or self.input_dtype.is_floating_point

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, num_data: int | None = None) -> torch.Tensor:
        """Sample the weights, run the network, observe ``y`` if given; returns the outputs."""
        self._check_data(x, y, num_data)
        params = {k: _drop_plate_dim(v, self._event_ndims[k]) for k, v in self._sampled_params().items()}
        out = self.functional(params, x)
        self._observe(out, y, num_data)
        return out

    def init_values(self) -> dict[str, torch.Tensor]:
        """The skeleton's own (randomly initialized) weights, e.g. for
        ``init_loc_fn=pyro.infer.autoguide.init_to_value(values=model.init_values())``."""
        return {k: p.detach().to(self._dtype).clone() for k, p in self.net.named_parameters()}

    def extra_repr(self) -> str:
        n = sum(math.prod(s) for s in self._site_shapes.values())
        return f"sites={len(self._site_shapes)}, weights={n}, likelihood={self.likelihood!r}"
