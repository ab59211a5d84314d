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
    r"""Pyro's ``MixtureOfDiagNormals`` with a log-space, unbiased ``rsample`` gradient.

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
    v_\theta) = 0`, built as in Pyro but with a corrected cross-component term (see
    Notes):

    * means and scales, with responsibilities :math:`r_j(z) = \pi_j q_j(z) / q(z)` and
      :math:`\tilde z_j = (z - \mu_j) / \sigma_j`:

      .. math::

          \frac{\partial L}{\partial \mu_j} = r_j(z)\, g, \qquad
          \frac{\partial L}{\partial \sigma_j} = r_j(z)\, g \odot \tilde z_j,
          \qquad g = \partial L / \partial z;

    * component weights. With references :math:`\rho_j = N(\mu_j, \mathrm{diag}\,
      \sigma_0^2)`, :math:`\sigma_{0i} = \min_j \sigma_{ji}`,

      .. math::

          \frac{\partial q}{\partial \ell_c} = \pi_c (q_c - q)
          = \pi_c \Bigl[(q_c - \rho_c) - \sum_j \pi_j (q_j - \rho_j)\Bigr]
          + \pi_c \sum_d \pi_d (\rho_c - \rho_d).

      Each :math:`q_j - \rho_j = \sum_i \bigl[\prod_{k<i} N_{jk}\bigr] (N_{ji} -
      R_{ji}) \bigl[\prod_{k>i} R_{jk}\bigr]` (:math:`N_{jk} = N(z_k \mid \mu_{jk},
      \sigma_{jk}^2)`, :math:`R_{jk} = N(z_k \mid \mu_{jk}, \sigma_{0k}^2)`) is
      transported along :math:`e_i` with the CDF difference in :math:`z_i`. For
      :math:`\rho_c - \rho_d`, whiten, :math:`y = z / \sigma_0`: the references become
      :math:`N(m_j, I)`, :math:`m_j = \mu_j / \sigma_0`, which differ only along
      :math:`n_{cd} = (m_c - m_d) / \lVert m_c - m_d \rVert`. Writing :math:`y = t\,
      n_{cd} + y_\perp` and :math:`m_j = a_j n_{cd} + m_\perp` (the same
      :math:`m_\perp` for :math:`j = c, d`), the flux :math:`H = n_{cd}\,
      [\Phi(t - a_d) - \Phi(t - a_c)]\, \phi_{D-1}(y_\perp - m_\perp)` has
      :math:`\nabla_y \cdot H = \phi_D(y - m_d) - \phi_D(y - m_c)`, i.e. it carries
      mass from :math:`d`'s reference to :math:`c`'s; in :math:`z` the density gains
      :math:`\prod_i \sigma_{0i}^{-1}` and the velocity is :math:`\sigma_0 \odot
      n_{cd}` times the same magnitude, so :math:`\nabla_z \cdot (\prod_i
      \sigma_{0i}^{-1}\, \sigma_0 \odot H) = \rho_d - \rho_c`. With
      :math:`\operatorname{erf}_2(x) = \operatorname{erf}(x / \sqrt 2)`,
      :math:`s_j = (z - \mu_j) / \sigma_0 = y - m_j`, :math:`s_{\perp cd} = s_c -
      (s_c \cdot n_{cd})\, n_{cd} = y_\perp - m_\perp` and

      .. math::

          \log w_{ji}(z) = \log \pi_j + \sum_{k<i} \log N(z_k \mid \mu_{jk}, \sigma_{jk}^2)
              + \sum_{k>i} \log N(z_k \mid \mu_{jk}, \sigma_{0k}^2) - \log q(z),

          \log w_{cd}(z) = \log \pi_c + \log \pi_d - \sum_i \log \sigma_{0i}
              - \tfrac12 \lVert s_{\perp cd} \rVert^2
              - \tfrac{D-1}{2} \log 2\pi - \log q(z),

      the gradient is

      .. math::

          Y_j = \tfrac12 \sum_i \bigl[\operatorname{erf}_2(\tilde z_{ji})
              - \operatorname{erf}_2(s_{ji})\bigr] w_{ji}(z)\, g_i, \qquad
          \frac{\partial L}{\partial \ell_c} = -Y_c + \pi_c \sum_j Y_j
              + \tfrac12 \sum_d \bigl[\operatorname{erf}_2(s_d \cdot n_{cd})
              - \operatorname{erf}_2(s_c \cdot n_{cd})\bigr]
              \bigl((\sigma_0 \odot g) \cdot n_{cd}\bigr)\, w_{cd}(z).

    Pyro evaluates its expressions as products of densities, ``exp(log q_j)``,
    ``(2 pi)^{-(D-1)/2}``, ``exp(-r^2/2 - log sigma products)``, ``exp(-|z_perp|^2/2)``,
    each divided by ``q(z)``: for ``D`` beyond ~60-100 (float32) these under/overflow and
    the gradients are NaN. Here every weight ``r_j``, ``w_ji``, ``w_cd`` is one exponent,
    normalized by ``log q(z)`` (a ``logsumexp``) before exponentiating, so it is the
    ratio of two densities and stays representable; the ``erf`` differences (bounded
    by 2) stay multiplicative, computed with ``erfc`` in the tails to avoid
    cancellation. Where Pyro's gradient is finite the means and scales gradients
    agree with it to rounding; the weights gradient does only when ``sigma_0 = 1`` in
    every coordinate and each line through two means passes through the origin.

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
    by their zero distance).

    Pyro 1.9's ``MixtureOfDiagNormals`` gives a biased component-logits gradient for
    nonlinear integrands. Its cross-component flux uses ``exp(-|z_perp|^2 / 2)`` with
    ``z_perp`` the part of ``z`` itself perpendicular to ``u_cd = (mu_c - mu_d) / |mu_c -
    mu_d|``, and no ``sigma_0``: that is the flux between unit-variance references
    centred on a line through the origin, not between ``N(mu_c, sigma_0^2)`` and
    ``N(mu_d, sigma_0^2)``, so it does not solve the transport equation. The estimate
    is still right for linear ``f``. For ``D = K = 2``, ``locs = [[1, -0.5], [-1, 2]]``,
    ``coord_scale = [[0.7, 1.2], [1.5, 0.6]]``, ``component_logits = [0.3, -0.2]``
    (float64), the Monte Carlo logits gradient of ``E[f(z)]`` over 400000 draws is
    ``[-0.74, 0.74]`` for ``f = z_1^2`` (by quadrature its expectation is ``-0.758``)
    where the exact value ``pi_c (E_c f - E f)`` is ``[-0.414, 0.414]``, and ``0.43``
    against ``0.353`` for ``f = z_1 z_2``. We replace that term with the whitened
    transport above (the last sum in the logits gradient, with ``n_cd``, ``sigma_0``
    and ``m_perp``); the within-component term and the means and scales gradients are
    Pyro's.

    The estimator is unbiased but its variance can grow with ``D``: the weights
    ``w_ji``, ``w_cd`` are ratios of densities that stay near one only when the scales
    are alike across components (``sigma_j / sigma_0`` near ``1``) and the whitened
    separations ``|mu_c - mu_d| / sigma_0`` are moderate. Making the weights
    representable fixes the NaNs, not this property of the estimator.

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

        # Transport between the references N(mu_c, sigma_0^2) and N(mu_d, sigma_0^2). In
        # whitened coordinates y = z / sigma_0 they are N(m_c, I), N(m_d, I), m = mu / sigma_0,
        # which differ only along n_cd = (m_c - m_d) / |m_c - m_d|: the flux along n_cd is a
        # CDF difference in y . n_cd times the (D - 1)-dimensional unit Gaussian across it,
        # centred on the common perpendicular part of m_c and m_d. Back in z the density
        # gains prod(1 / sigma_0) and the velocity is sigma_0 * n_cd, so it pairs with
        # g * sigma_0. This term is already the full derivative in the logits.
        sigma0 = log_sigma0.exp()  # (*B, 1, D)
        m = locs / sigma0  # (*B, K, D)
        diff = m.unsqueeze(-2) - m.unsqueeze(-3)  # (*B, K, K, D): m_c - m_d
        norm = diff.norm(dim=-1, keepdim=True)
        n = torch.where(norm > 0, diff / norm.clamp_min(torch.finfo(norm.dtype).tiny), 0.0)
        shift_c = shift.unsqueeze(-2)  # (*S, *B, K, 1, D): y - m_c
        t_c = (shift_c * n).sum(-1)  # (*S, *B, K, K): (y - m_c) . n_cd
        t_d = (shift.unsqueeze(-3) * n).sum(-1)  # (y - m_d) . n_cd = t_c + |m_c - m_d|
        perp_sq = (shift_c - t_c.unsqueeze(-1) * n).square().sum(-1)  # |y_perp - m_perp|^2
        log_w_cd = (
            log_pi.unsqueeze(-1)
            + log_pi.unsqueeze(-2)
            - log_sigma0.sum(-1, keepdim=True)
            - 0.5 * perp_sq
            - 0.5 * (D - 1) * _LOG_2PI
            - log_q[..., None, None]
        )
        g_n = ((g * sigma0).unsqueeze(-2) * n).sum(-1)  # (*S, *B, K, K): (sigma_0 g) . n_cd
        cross = _erf_diff(t_d, t_c) * g_n * log_w_cd.exp()
        logits_grad = logits_grad + 0.5 * _sum_to(cross.sum(-1), keep - 1)

        return locs_grad, scales_grad, logits_grad, None, None
