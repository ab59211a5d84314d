r"""A mixture of diagonal Normals whose implicit pathwise gradient is computed in log space."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.autograd.function import once_differentiable
from torch.distributions import constraints

__all__ = ["StableMixtureOfDiagNormals"]

_LOG_2PI = math.log(2.0 * math.pi)
_SQRT_HALF = math.sqrt(0.5)


class StableMixtureOfDiagNormals(dist.MixtureOfDiagNormals):
    r"""Pyro's ``MixtureOfDiagNormals`` with a log-space (high-dimension safe) ``rsample`` gradient.

    .. math::

        q(z) = \sum_{j=1}^K \pi_j \, q_j(z), \qquad
        q_j(z) = \prod_{i=1}^D N(z_i \mid \mu_{ji}, \sigma_{ji}^2), \qquad
        \pi = \mathrm{softmax}(\text{component\_logits}).

    A draw picks ``j ~ Categorical(pi)`` and returns ``mu_j + sigma_j * eps`` with
    ``eps ~ N(0, I)``, exactly as :class:`pyro.distributions.MixtureOfDiagNormals`
    (same random-number use, so the same seed gives the same draw), and ``log_prob``
    is Pyro's. The backward pass is the implicit pathwise gradient of Jankowiak &
    Karaletsos [1]_, :math:`\partial z / \partial \theta = v_\theta(z)` for a velocity
    field solving the transport equation :math:`\partial_\theta q + \nabla \cdot (q\,
    v_\theta) = 0`, as implemented in Pyro:

    * means and scales, with responsibilities :math:`r_j(z) = \pi_j q_j(z) / q(z)` and
      :math:`\tilde z_j = (z - \mu_j) / \sigma_j`:

      .. math::

          \frac{\partial L}{\partial \mu_j} = r_j(z)\, g, \qquad
          \frac{\partial L}{\partial \sigma_j} = r_j(z)\, g \odot \tilde z_j,
          \qquad g = \partial L / \partial z;

    * component weights, through a coordinate-by-coordinate transport of each
      :math:`q_j` onto :math:`N(\mu_j, \mathrm{diag}\,\sigma_0^2)`,
      :math:`\sigma_{0i} = \min_j \sigma_{ji}`, with :math:`s_j = (z - \mu_j) /
      \sigma_0`, plus a transport between components along the unit vectors
      :math:`u_{cd} = (\mu_c - \mu_d) / \lVert \mu_c - \mu_d \rVert`. With
      :math:`\operatorname{erf}_2(x) = \operatorname{erf}(x / \sqrt 2)`,
      :math:`z_{\perp cd} = z - (z \cdot u_{cd}) u_{cd}` and

      .. math::

          \log w_{ji}(z) = \log \pi_j + \sum_{k<i} \log N(z_k \mid \mu_{jk}, \sigma_{jk}^2)
              + \sum_{k>i} \log N(z_k \mid \mu_{jk}, \sigma_{0k}^2) - \log q(z),

          \log w_{cd}(z) = \log \pi_c + \log \pi_d - \tfrac12 \lVert z_{\perp cd} \rVert^2
              - \tfrac{D-1}{2} \log 2\pi - \log q(z),

      the gradient is

      .. math::

          Y_j = \tfrac12 \sum_i \bigl[\operatorname{erf}_2(\tilde z_{ji})
              - \operatorname{erf}_2(s_{ji})\bigr] w_{ji}(z)\, g_i, \qquad
          \frac{\partial L}{\partial \ell_c} = -Y_c + \pi_c \sum_j Y_j
              - \tfrac12 \sum_d \bigl[\operatorname{erf}_2(z \cdot u_{cd} - \mu_c \cdot u_{cd})
              - \operatorname{erf}_2(z \cdot u_{cd} - \mu_d \cdot u_{cd})\bigr]
              (u_{cd} \cdot g)\, w_{cd}(z).

    Pyro evaluates the same expressions as products of densities, ``exp(log q_j)``,
    ``(2 pi)^{-(D-1)/2}``, ``exp(-r^2/2 - log sigma products)``, ``exp(-|z_perp|^2/2)``,
    each divided by ``q(z)``: for ``D`` beyond ~60-100 (float32) these under/overflow and
    the gradients are NaN. Here every weight ``r_j``, ``w_ji``, ``w_cd`` is one exponent,
    normalized by ``log q(z)`` (a ``logsumexp``) before exponentiating, so it is the
    ratio of two densities and stays representable; the ``erf`` differences (bounded
    by 2) stay multiplicative, computed with ``erfc`` in the tails to avoid
    cancellation. Where Pyro's gradient is finite both agree to rounding.

    Parameters
    ----------
    locs : torch.Tensor
        Component means, ``(..., K, D)``.
    coord_scale : torch.Tensor
        Component standard deviations (positive), same shape as ``locs``.
    component_logits : torch.Tensor
        Mixture logits, ``(..., K)``.

    Notes
    -----
    Like Pyro's, the gradient is not differentiable twice and needs ``D >= 2``. Two
    components with identical means contribute no cross-component term (Pyro divides
    by their zero distance). The component-weight gradient is Pyro's as it stands: its
    cross-component term takes a unit-variance Gaussian across ``u_cd`` centred on the
    line through the origin rather than on the means (and ``sigma_0``), so it is
    unbiased for ``E[a . z + b |z|^2]`` but not for every integrand (e.g.
    ``sum_i b_i z_i^2`` with unequal ``b_i``); and in high dimension the weights ``w_ji``,
    ``w_cd`` are ratios of densities whose variance grows with ``D`` unless the scales
    are close to ``1`` and alike across components (for ``sigma ~ 0.1`` the ``w_cd`` are
    negligible and the estimate misses that part of the weight gradient). Making the
    weights representable fixes the NaNs, not these properties of the estimator.

    References
    ----------
    .. [1] M. Jankowiak and T. Karaletsos, "Pathwise Derivatives for Multivariate
       Distributions", AISTATS 2019, arXiv:1806.01856 (the reference Pyro cites; see
       also M. Jankowiak and F. Obermeyer, "Pathwise Derivatives Beyond the
       Reparameterization Trick", ICML 2018, arXiv:1806.01851).
    """

    support = constraints.real_vector

    def expand(self, batch_shape, _instance=None):
        # Pyro's ``expand`` does the work; handing it our instance keeps the class explicit.
        new = self._get_checked_instance(StableMixtureOfDiagNormals, _instance)
        return super().expand(batch_shape, _instance=new)

    def rsample(self, sample_shape=torch.Size()):
        sample_shape = torch.Size(sample_shape)
        which = self.categorical.sample(sample_shape)  # (*S, *B), drawn first as in Pyro
        noise_shape = sample_shape + self.locs.shape[:-2] + (self.dim,)
        return _StableMixDiagNormalSample.apply(self.locs, self.coord_scale, self.component_logits, which, noise_shape)


def _sum_to(x: torch.Tensor, ndim: int) -> torch.Tensor:
    """Sum out the leading (sample) dimensions of ``x``, keeping the rightmost ``ndim``."""
    lead = x.dim() - ndim
    return x.sum(tuple(range(lead))) if lead > 0 else x


def _erf_diff(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``erf(x / sqrt 2) - erf(y / sqrt 2)``, via ``erfc`` when both lie in the same tail.

    There ``erf`` rounds to ``+-1`` and the plain difference loses every digit.
    """
    x, y = x * _SQRT_HALF, y * _SQRT_HALF
    plain = torch.erf(x) - torch.erf(y)
    upper = torch.erfc(y) - torch.erfc(x)
    lower = torch.erfc(-x) - torch.erfc(-y)
    return torch.where((x > 0) & (y > 0), upper, torch.where((x < 0) & (y < 0), lower, plain))


def _exclusive_cumsum(x: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    """``sum_{k<i} x_k`` (or ``sum_{k>i} x_k`` when ``reverse``) along the last dimension."""
    if reverse:
        return _exclusive_cumsum(x.flip(-1)).flip(-1)
    # shift instead of cumsum(x) - x: no cancellation between large partial sums
    return torch.nn.functional.pad(x.cumsum(-1)[..., :-1], (1, 0))


class _StableMixDiagNormalSample(torch.autograd.Function):
    """Draw ``z = mu_which + sigma_which * eps``; backward is the log-space implicit gradient."""

    @staticmethod
    def forward(ctx, locs, scales, logits, which, noise_shape):
        white = locs.new_empty(noise_shape).normal_()
        # which: (*S, *B) -> an index (*S, *B, 1, D) into locs broadcast over the sample dims
        index = which[..., None, None].expand(which.shape + (1, locs.size(-1)))
        full = which.shape + locs.shape[-2:]
        loc = torch.gather(locs.expand(full), -2, index).squeeze(-2)
        sigma = torch.gather(scales.expand(full), -2, index).squeeze(-2)
        assert loc.shape == torch.Size(noise_shape), (loc.shape, noise_shape)
        z = loc + sigma * white
        ctx.save_for_backward(z, locs, scales, logits)
        return z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_z):
        z, locs, scales, logits = ctx.saved_tensors
        D = locs.size(-1)
        keep = locs.dim()  # rightmost dims of a (*S, *B, K, D) tensor that the locs gradient keeps
        log_pi = torch.log_softmax(logits, -1)  # (*B, K), exact even for tiny weights
        g = grad_z.unsqueeze(-2)  # (*S, *B, 1, D)
        zk = z.unsqueeze(-2)  # (*S, *B, 1, D)
        log_scales = scales.log()

        # Responsibilities r_j = pi_j q_j / q, normalized in log space (q_j alone underflows).
        z_tilde = (zk - locs) / scales  # (*S, *B, K, D)
        log_q_coord = -0.5 * z_tilde.square() - log_scales - 0.5 * _LOG_2PI  # log N(z_i | mu_ji, sigma_ji)
        log_joint = log_pi + log_q_coord.sum(-1)  # (*S, *B, K): log pi_j q_j(z)
        log_q = torch.logsumexp(log_joint, -1)  # (*S, *B): log q(z)
        resp = (log_joint - log_q.unsqueeze(-1)).exp().unsqueeze(-1)  # (*S, *B, K, 1)
        locs_grad = _sum_to(resp * g, keep)
        scales_grad = _sum_to(resp * g * z_tilde, keep)

        # Within-component transport of q_j onto N(mu_j, sigma_0^2), coordinate by coordinate.
        # Coordinate i's flux is a CDF difference in z_i times the density of the other
        # D - 1 coordinates (sigma_j before i, sigma_0 after i); that density over q(z) is
        # one exponent, which also absorbs pi_j and the (2 pi)^{-(D-1)/2}.
        log_sigma0 = log_scales.min(-2, keepdim=True).values  # (*B, 1, D)
        shift = (zk - locs) / log_sigma0.exp()  # (*S, *B, K, D)
        log_ref_coord = -0.5 * shift.square() - log_sigma0 - 0.5 * _LOG_2PI  # log N(z_i | mu_ji, sigma_0i)
        log_w = (
            _exclusive_cumsum(log_q_coord)
            + _exclusive_cumsum(log_ref_coord, reverse=True)
            + (log_pi - log_q.unsqueeze(-1)).unsqueeze(-1)
        )  # (*S, *B, K, D)
        flux = _erf_diff(z_tilde, shift) * log_w.exp()
        y = 0.5 * _sum_to((flux * g).sum(-1), keep - 1)  # (*B, K): pi_j dL/dpi_j of this term
        # chain rule through the softmax: dL/dl_c = pi_c (dL/dpi_c - sum_j pi_j dL/dpi_j)
        logits_grad = -y + log_pi.exp() * y.sum(-1, keepdim=True)

        # Transport between components c and d along u_cd, with Pyro's unit-variance
        # Gaussian across the direction (it needs no further softmax correction).
        diff = locs.unsqueeze(-2) - locs.unsqueeze(-3)  # (*B, K, K, D): mu_c - mu_d
        norm = diff.norm(dim=-1, keepdim=True)
        u = torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
        mu_c_u = (locs.unsqueeze(-2) * u).sum(-1)  # (*B, K, K): mu_c . u_cd
        mu_d_u = (locs.unsqueeze(-3) * u).sum(-1)  # mu_d . u_cd
        zz = z[..., None, None, :]  # (*S, *B, 1, 1, D)
        z_u = (zz * u).sum(-1)  # (*S, *B, K, K)
        z_perp_sq = (zz - z_u.unsqueeze(-1) * u).square().sum(-1)
        log_w_cd = (
            log_pi.unsqueeze(-1)
            + log_pi.unsqueeze(-2)
            - 0.5 * z_perp_sq
            - 0.5 * (D - 1) * _LOG_2PI
            - log_q[..., None, None]
        )
        g_u = (g.unsqueeze(-2) * u).sum(-1)  # (*S, *B, K, K): u_cd . g
        cross = _erf_diff(z_u - mu_c_u, z_u - mu_d_u) * g_u * log_w_cd.exp()
        logits_grad = logits_grad - 0.5 * _sum_to(cross.sum(-1), keep - 1)

        return locs_grad, scales_grad, logits_grad, None, None
