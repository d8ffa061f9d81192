"""KL to a reference policy: per-token estimators, the KL loss term, the KL reward penalty and the
fixed / adaptive coefficient controller.

Notation: ``B`` sequences, ``T`` tokens, ``d_t = log_probs_t - ref_log_probs_t`` (the log-ratio of
the trained policy to the reference, on the sampled tokens). Estimators of ``KL(pi || pi_ref)``
(Schulman, "Approximating KL divergence", http://joschu.net/blog/kl-approx.html)::

    k1   d                                        unbiased, high variance, can be negative
    abs  |d|
    k2   d^2 / 2                                  ("mse"); its gradient is the KL's gradient
    k3   clamp(e^{-d'} - 1 + d', -10, 10),  d' = clamp(d, -20, 20)    (low variance, >= 0)

and the straight-through variants ``k1+``, ``abs+``, ``k2+``, ``k3+``: the forward value of the
estimator with the gradient of ``k2`` (verl's ``+`` suffix): ``k2 - sg[k2] + sg[est]``. The clamps
are SkyRL-Train's / verl's.

Estimator kind convention: ``fn(log_probs [B, T], ref_log_probs [B, T]) -> [B, T]``; masking and
reduction happen outside (``kl_token_loss`` / an aggregation).
"""

from __future__ import annotations

from typing import Callable

import attrs
import numpy as np
import torch

from skyrl_fn.core._checks import check_finite, check_floating, check_shape

__all__ = [
    "k1",
    "kl_abs",
    "k2",
    "k3",
    "k1_plus",
    "kl_abs_plus",
    "k2_plus",
    "k3_plus",
    "KL_ESTIMATORS",
    "kl_token_loss",
    "kl_penalty_rewards",
    "KLController",
    "kl_controller",
]


def _pair(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    check_floating("log_probs", log_probs)
    check_floating("ref_log_probs", ref_log_probs)
    check_shape("ref_log_probs", ref_log_probs, tuple(log_probs.shape), "[B, T] (as log_probs)")
    return log_probs - ref_log_probs


def k1(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``d = log_probs - ref_log_probs``. [B, T] -> [B, T]."""
    return _pair(log_probs, ref_log_probs)


def kl_abs(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``|d|`` (registered as ``abs``). [B, T] -> [B, T]."""
    return _pair(log_probs, ref_log_probs).abs()


def k2(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``d^2 / 2`` (also registered as ``mse``). [B, T] -> [B, T]."""
    return 0.5 * _pair(log_probs, ref_log_probs).square()


def k3(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """Low-variance KL: ``clamp(e^x - x - 1, -10, 10)`` with ``x = clamp(ref - log_probs, -20, 20)``
    (SkyRL-Train's / verl's ``k3`` / ``low_var_kl``). [B, T] -> [B, T]."""
    x = torch.clamp(-_pair(log_probs, ref_log_probs), -20.0, 20.0)
    return torch.clamp(torch.exp(x) - x - 1.0, -10.0, 10.0)


def _straight_through(estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]):
    def fn(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
        grad_part = k2(log_probs, ref_log_probs)
        value = estimator(log_probs, ref_log_probs)
        return grad_part - grad_part.detach() + value.detach()

    return fn


def k1_plus(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``k1+``: value of ``k1``, gradient of ``k2``. [B, T] -> [B, T]."""
    return _straight_through(k1)(log_probs, ref_log_probs)


def kl_abs_plus(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``abs+``: value of ``abs``, gradient of ``k2``. [B, T] -> [B, T]."""
    return _straight_through(kl_abs)(log_probs, ref_log_probs)


def k2_plus(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``k2+``: identical to ``k2`` (its own gradient already is k2's). [B, T] -> [B, T]."""
    return k2(log_probs, ref_log_probs)


def k3_plus(log_probs: torch.Tensor, ref_log_probs: torch.Tensor) -> torch.Tensor:
    """``k3+``: value of ``k3``, gradient of ``k2``. [B, T] -> [B, T]."""
    return _straight_through(k3)(log_probs, ref_log_probs)


#: Registered name -> estimator (the table's ``kl_estimator`` kind holds the same).
KL_ESTIMATORS = {
    "k1": k1,
    "abs": kl_abs,
    "k2": k2,
    "mse": k2,
    "k3": k3,
    "k1+": k1_plus,
    "abs+": kl_abs_plus,
    "k2+": k2_plus,
    "k3+": k3_plus,
}


def kl_token_loss(
    log_probs: torch.Tensor,
    ref_log_probs: torch.Tensor,
    loss_mask: torch.Tensor,
    *,
    estimator: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = k3,
) -> torch.Tensor:
    """The KL loss term per token (SkyRL's ``use_kl_loss``), zero where ``loss_mask`` is 0.

    The estimator sees its inputs masked (0 where ``loss_mask`` is 0), so padding can never put a
    NaN or inf into it. Multiply the aggregated result by ``kl_loss_coef`` (SkyRL default 0.001)
    and add it to the policy loss; ``policy_objective(..., kl_loss_coef=...)`` does exactly that.

    Args:
        log_probs, ref_log_probs: ``[B, T]``.
        loss_mask: ``[B, T]`` bool.
        estimator: a KL estimator ``fn(log_probs, ref_log_probs) -> [B, T]`` (default ``k3``,
            SkyRL's ``kl_estimator_type`` default); a registered one is
            ``table.get("kl_estimator", name)``.

    Returns:
        ``[B, T]``; the gradient is exactly zero where ``loss_mask`` is 0.
    """
    if not callable(estimator):
        raise TypeError(f"estimator: expected a KL estimator function, got {type(estimator).__name__}")
    m = loss_mask if loss_mask.dtype == torch.bool else loss_mask != 0
    check_shape("loss_mask", m, tuple(log_probs.shape), "[B, T] (as log_probs)")
    zero = torch.zeros((), dtype=log_probs.dtype, device=log_probs.device)
    kl = estimator(torch.where(m, log_probs, zero), torch.where(m, ref_log_probs, zero))
    return torch.where(m, kl, zero)


@torch.no_grad()
def kl_penalty_rewards(
    token_level_rewards: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, *, coef: float
) -> torch.Tensor:
    """KL as a reward penalty (SkyRL's ``use_kl_in_reward``; Ziegler et al. 2019, arXiv:1909.08593)::

        r'_t = (r_t - coef * kl_t) * m_t

    Args:
        token_level_rewards: ``[B, T]``.
        kl: ``[B, T]`` per-token KL estimate (any estimator; it is detached).
        response_mask: ``[B, T]`` bool (0/1 numeric accepted).
        coef: the KL coefficient (e.g. ``controller.coef``), >= 0.

    Returns:
        ``[B, T]`` new rewards, zero where the mask is 0. Inputs are not modified.
    """
    check_floating("token_level_rewards", token_level_rewards)
    shape = tuple(token_level_rewards.shape)
    check_shape("kl", kl, shape, "[B, T] (as token_level_rewards)")
    check_shape("response_mask", response_mask, shape, "[B, T] (as token_level_rewards)")
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
        raise ValueError(f"coef: expected a number >= 0, got {coef!r}")
    m = response_mask if response_mask.dtype == torch.bool else response_mask != 0
    check_finite("kl", kl.detach(), m)
    out = token_level_rewards - coef * kl.detach().to(token_level_rewards.dtype)
    return torch.where(m, out, torch.zeros((), dtype=out.dtype, device=out.device))


@attrs.frozen(kw_only=True)
class KLController:
    """The KL coefficient: fixed, or adaptive (Ziegler et al. 2019, arXiv:1909.08593; SkyRL's
    ``kl_ctrl.type``). A frozen value; :meth:`update` returns the next one::

        fixed:     coef' = coef
        adaptive:  e = clip(kl / target - 1, -0.2, 0.2);   coef' = coef * (1 + e * n / horizon)

    Attributes:
        coef: the current coefficient (SkyRL's ``kl_loss_coef``, default 0.001), >= 0.
        kind: ``"fixed"`` or ``"adaptive"``.
        target: target KL of the adaptive rule (``kl_ctrl.kl_target``, default 0.1), > 0.
        horizon: horizon in samples of the adaptive rule (``kl_ctrl.horizon``, default 10000), > 0.
    """

    coef: float = 0.001
    kind: str = "fixed"
    target: float = 0.1
    horizon: int = 10000

    def __attrs_post_init__(self) -> None:
        if self.kind not in ("fixed", "adaptive"):
            raise ValueError(f"kind: expected 'fixed' or 'adaptive', got {self.kind!r}")
        if isinstance(self.coef, bool) or not isinstance(self.coef, (int, float)) or not self.coef >= 0:
            raise ValueError(f"coef: expected a number >= 0, got {self.coef!r}")
        if not self.target > 0:
            raise ValueError(f"target: expected a KL target > 0, got {self.target!r}")
        if not self.horizon > 0:
            raise ValueError(f"horizon: expected > 0, got {self.horizon!r}")

    def update(self, current_kl: float, n_samples: int) -> "KLController":
        """The controller after observing mean KL ``current_kl`` (a float or 0-dim tensor, read
        once, outside any loss) over ``n_samples`` samples (SkyRL passes the batch size)."""
        if self.kind == "fixed":
            return self
        err = float(np.clip(float(current_kl) / self.target - 1.0, -0.2, 0.2))
        return attrs.evolve(self, coef=self.coef * (1.0 + err * n_samples / self.horizon))


def kl_controller(kind: str = "fixed", *, kl_loss_coef: float = 0.001, kl_target: float = 0.1, horizon: int = 10000) -> KLController:
    """A :class:`KLController` from SkyRL's ``kl_ctrl.type`` / ``kl_loss_coef`` /
    ``kl_ctrl.kl_target`` / ``kl_ctrl.horizon``.

    Raises:
        ValueError: ``kind`` not ``"fixed"`` or ``"adaptive"``; non-positive target or horizon.
    """
    return KLController(coef=kl_loss_coef, kind=kind, target=kl_target, horizon=horizon)
