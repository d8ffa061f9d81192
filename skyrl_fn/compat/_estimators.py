"""SkyRL's ``compute_*`` advantage estimator functions, exact to SkyRL on every position.

Each function has SkyRL's signature (keywords, ``**kwargs`` ignored) and returns
``(advantages [B, T], returns [B, T])``. The maths is the native estimator's; what is SkyRL's here
is the convention around it, reproduced exactly:

- outcome estimators (GRPO, RLOO, MaxRL) score a sample by the sum of *all* its token rewards
  (``token_level_rewards.sum(-1)``, padding included) and multiply the per-sample advantage by the
  float ``response_mask`` (a soft mask scales it). The native group maths runs on the ``[B, 1]``
  scores, so it never touches the ``T`` axis.
- REINFORCE++ and GAE leave SkyRL's values on the padding: the REINFORCE++ return-to-go at a masked
  position is ``r_t + gamma * m_{t+1} x_{t+1}`` (SkyRL's loop), GAE runs its recursion over every
  position (ignoring the mask) and whitens with the mask's statistics without re-masking.

The registry's built-ins (``AdvantageEstimatorRegistry.get("gae")``) are the native estimators,
which zero the padding and skip masked positions in the GAE recursion; see docs/skyrl-deviations.md.
Notation: ``B`` sequences, ``T`` response tokens, ``m`` the response mask.
"""

from __future__ import annotations

import enum
from typing import Any

import numpy as np
import torch

from skyrl_fn.compat._calls import caller_names
from skyrl_fn.estimators import gae, grpo, maxrl, reinforce_plus_plus, rloo
from skyrl_fn.estimators._whiten import whiten_stats
from skyrl_fn.core.records import AdvantageInput

__all__ = [
    "AdvantageEstimator",
    "compute_grpo_outcome_advantage",
    "compute_rloo_outcome_advantage",
    "compute_maxrl_advantage",
    "compute_reinforce_plus_plus_outcome_advantage",
    "compute_gae_advantage_return",
    "SKYRL_ESTIMATORS",
]

#: Native record field -> the SkyRL keyword the caller used (for error messages).
_NAMES = {"group_ids": "index"}


class AdvantageEstimator(enum.StrEnum):
    """SkyRL 0.3.0's built-in estimator names (``AdvantageEstimator("grpo")``, ``list(AdvantageEstimator)``)."""

    GAE = "gae"
    GRPO = "grpo"
    RLOO = "rloo"
    REINFORCE_PP = "reinforce++"
    MAXRL = "maxrl"


def _check_pair(token_level_rewards: Any, response_mask: Any) -> None:
    for key, value in (("token_level_rewards", token_level_rewards), ("response_mask", response_mask)):
        if not isinstance(value, torch.Tensor) or value.dim() != 2:
            got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
            raise ValueError(f"{key}: expected a [B, T] tensor, got {got}")


def _outcome(native, token_level_rewards, response_mask, index, **hyper):
    """The native group estimator on the ``[B, 1]`` scores, broadcast SkyRL's way."""
    _check_pair(token_level_rewards, response_mask)
    if index is None:
        raise ValueError("index: expected a [B] array of prompt ids (uids), got None")
    scores = token_level_rewards.sum(dim=-1, keepdim=True)  # [B, 1]: SkyRL sums every position
    ones = torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
    with caller_names(_NAMES):
        batch = AdvantageInput(token_level_rewards=scores, response_mask=ones, group_ids=index)
    adv = native(batch, **hyper).advantages  # [B, 1]
    out = adv * response_mask
    return out, out


@torch.no_grad()
def compute_grpo_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    grpo_norm_by_std: bool = True,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GRPO: ``A_i = (s_i - mean_g(s)) / (std_g(s) + epsilon) * m`` with ``s_i = sum_t r_{i,t}``
    (``grpo_norm_by_std=False``: no division); a size-1 group gets mean 0, std 1. Native
    ``skyrl_fn.estimators.grpo``. ``token_level_rewards [B, T]``, ``response_mask [B, T]``,
    ``index [B]`` (uids: str or int). Returns ``(advantages, returns)``, the same tensor."""
    return _outcome(grpo, token_level_rewards, response_mask, index, epsilon=epsilon, norm_by_std=bool(grpo_norm_by_std))


@torch.no_grad()
def compute_rloo_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index: np.ndarray, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """RLOO: ``A_i = (s_i - mean_g(s)) * n / (n - 1) * m``, 0 for a size-1 group (SkyRL logs a
    warning there; this does not). Native ``skyrl_fn.estimators.rloo``. Shapes as GRPO."""
    return _outcome(rloo, token_level_rewards, response_mask, index)


@torch.no_grad()
def compute_maxrl_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index: np.ndarray,
    epsilon: float = 1e-6,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MaxRL: ``A_i = (s_i - mean_g(s)) / (mean_g(s) + epsilon) * m``; a size-1 group gets
    ``A = s``. Native ``skyrl_fn.estimators.maxrl`` (a group with ``mean + epsilon = 0`` gets 0
    where SkyRL divides by zero). Shapes as GRPO."""
    return _outcome(maxrl, token_level_rewards, response_mask, index, epsilon=epsilon)


def _one_group(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, values=None) -> AdvantageInput:
    b = token_level_rewards.shape[0]
    with caller_names(_NAMES):
        return AdvantageInput(
            token_level_rewards=token_level_rewards,
            response_mask=response_mask,
            group_ids=torch.zeros(b, dtype=torch.long, device=token_level_rewards.device),
            values=values,
        )


@torch.no_grad()
def compute_reinforce_plus_plus_outcome_advantage(
    token_level_rewards: torch.Tensor, response_mask: torch.Tensor, gamma: float, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor]:
    """REINFORCE++: discounted return-to-go that restarts after every masked token, whitened over
    the valid tokens of the batch and masked::

        x_t = r_t + gamma * m_{t+1} * x_{t+1}          (every position, x_T = 0)
        A_t = (x_t - mean_m(x)) / sqrt(var_m(x) + 1e-8) * m_t

    Native ``skyrl_fn.estimators.reinforce_plus_plus`` on the valid tokens; at a masked position
    the return is SkyRL's ``r_t + gamma * x_{t+1}`` (``x_{t+1}`` is 0 unless ``m_{t+1}``).
    ``[B, T]`` in, ``(advantages [B, T], returns [B, T])`` out.
    """
    _check_pair(token_level_rewards, response_mask)
    out = reinforce_plus_plus(_one_group(token_level_rewards, response_mask), gamma=gamma)
    ret = out.returns  # 0 off the mask, x_t on it
    nxt = torch.nn.functional.pad(ret[:, 1:], (0, 1))
    mask = response_mask != 0
    returns = torch.where(mask, ret, token_level_rewards + gamma * nxt)
    return out.advantages * response_mask, returns


@torch.no_grad()
def compute_gae_advantage_return(
    token_level_rewards: torch.Tensor,
    values: torch.Tensor,
    response_mask: torch.Tensor,
    gamma: float,
    lambd: float,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE as SkyRL runs it: the recursion over *every* position, whitened with the mask::

        delta_t = r_t + gamma * V_{t+1} - V_t          (V_T = 0)
        Ahat_t  = delta_t + gamma * lambd * Ahat_{t+1}
        returns = Ahat + V;   A = (Ahat - mean_m(Ahat)) / sqrt(var_m(Ahat) + 1e-8)   (not re-masked)

    Native ``skyrl_fn.estimators.gae`` with an all-ones mask gives ``returns`` (its recursion then
    skips nothing); ``Ahat = returns - V`` (equal to SkyRL's up to one rounding) is whitened with the
    statistics of ``response_mask`` (``skyrl_fn.estimators._whiten.whiten_stats``).
    ``[B, T]`` in, ``(advantages [B, T], returns [B, T])`` out.
    """
    _check_pair(token_level_rewards, response_mask)
    if not isinstance(values, torch.Tensor):
        raise ValueError(f"values: expected a [B, T] tensor of critic values, got {type(values).__name__}")
    full = torch.ones(token_level_rewards.shape, dtype=torch.bool, device=token_level_rewards.device)
    returns = gae(_one_group(token_level_rewards, full, values), gamma=gamma, lambd=lambd).returns
    ahat = returns - values
    mean, rstd = whiten_stats(ahat, response_mask != 0)
    return (ahat - mean) * rstd, returns


#: SkyRL's built-in name -> its function here.
SKYRL_ESTIMATORS = {
    "grpo": compute_grpo_outcome_advantage,
    "rloo": compute_rloo_outcome_advantage,
    "maxrl": compute_maxrl_advantage,
    "reinforce++": compute_reinforce_plus_plus_outcome_advantage,
    "gae": compute_gae_advantage_return,
}
