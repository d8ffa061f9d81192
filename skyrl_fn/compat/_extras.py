"""Per-sample fields from SkyRL/verl keyword calls into ``AdvantageInput.extras``.

The peers hand an estimator its per-sample data in their own words:

- SkyRL (PR #2104, GDPO): ``reward_components`` ``[B, K]`` (or ``[B, K, T]``) with
  ``reward_component_names`` (``K`` names, from the batch metadata);
- verl: ``non_tensor_batch`` (name -> per-sample array ``[B]``, e.g. GDPO's reward components) and
  the estimator's own tensor keywords (``old_log_probs``, ``sum_pi_squared``,
  ``rollout_is_weights`` for the optimal token baseline); GDPO's keys and weights sit in
  ``config.gdpo_reward_keys`` / ``config.gdpo_reward_weights``.

Every one becomes an ``extras`` entry under its own name; no key is special to the façade except
the two containers above. Notation: ``B`` sequences, ``T`` response tokens, ``K`` components.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from skyrl_fn.compat._calls import config_value

__all__ = ["EXTRAS_KEYWORDS", "keyword_extras", "config_hyperparameters"]

#: Keywords that carry per-sample fields in containers (never hyperparameters).
EXTRAS_KEYWORDS = frozenset({"reward_components", "reward_component_names", "non_tensor_batch", "extras"})

#: verl's ``algorithm`` config fields an estimator reads -> the native hyperparameter.
_CONFIG_FIELDS = {"gdpo_reward_keys": "reward_keys", "gdpo_reward_weights": "reward_weights"}


def _per_sample(value: Any, b: int) -> torch.Tensor | None:
    """``value`` as a tensor if it is a numeric per-sample array with leading dim ``B``, else None."""
    if isinstance(value, torch.Tensor):
        return value if value.dim() >= 1 and value.shape[0] == b and not value.dtype.is_complex else None
    if isinstance(value, np.ndarray) and value.ndim >= 1 and value.shape[0] == b and value.dtype.kind in "biuf":
        return torch.as_tensor(value)
    return None


def _components(kwargs: Mapping[str, Any], b: int) -> dict[str, torch.Tensor]:
    comps = kwargs.get("reward_components")
    if comps is None:
        return {}
    if not isinstance(comps, torch.Tensor) or comps.dim() not in (2, 3) or comps.shape[0] != b:
        got = tuple(comps.shape) if isinstance(comps, torch.Tensor) else type(comps).__name__
        raise ValueError(f"reward_components: expected a [B, K] (or [B, K, T]) tensor with B = {b}, got {got}")
    k = comps.shape[1]
    names = kwargs.get("reward_component_names")
    names = [f"reward_component_{j}" for j in range(k)] if names is None else [str(n) for n in names]
    if len(names) != k:
        raise ValueError(f"reward_component_names: expected {k} names (one per component of reward_components), got {len(names)}")
    return {name: comps[:, j] for j, name in enumerate(names)}


def keyword_extras(kwargs: Mapping[str, Any], b: int, claimed: frozenset[str]) -> dict[str, torch.Tensor]:
    """The per-sample fields among SkyRL/verl keywords: ``extras`` as given, the named reward
    components, the numeric arrays of ``non_tensor_batch``, and every other keyword holding a
    ``[B, ...]`` numeric tensor that is not in ``claimed`` (record fields and hyperparameters).

    Raises:
        ValueError: ``reward_components`` of the wrong shape, or a name count that differs.
    """
    out: dict[str, torch.Tensor] = dict(kwargs.get("extras") or {})
    out.update(_components(kwargs, b))
    for name, value in (kwargs.get("non_tensor_batch") or {}).items():
        tensor = _per_sample(value, b)
        if tensor is not None:  # strings and objects (uids, raw prompts) are not tensors
            out[str(name)] = tensor
    for name, value in kwargs.items():
        if name in claimed or name in EXTRAS_KEYWORDS or name in out:
            continue
        tensor = _per_sample(value, b)
        if tensor is not None:
            out[name] = tensor
    return out


def config_hyperparameters(kwargs: Mapping[str, Any], accepted: Mapping[str, Any] | None) -> dict[str, Any]:
    """Native hyperparameters read from a verl-style ``config`` keyword (``gdpo_reward_keys`` ->
    ``reward_keys``, ``gdpo_reward_weights`` -> ``reward_weights``), for a function that takes them;
    the components' names from ``reward_component_names`` when no keys are configured."""
    out: dict[str, Any] = {}
    config = kwargs.get("config")
    for field, native in _CONFIG_FIELDS.items():
        value = config_value(config, (field,))
        if value is not None and (accepted is None or native in accepted):
            out[native] = tuple(value)
    takes_keys = accepted is not None and "reward_keys" in accepted
    if takes_keys and "reward_keys" not in out and kwargs.get("reward_components") is not None:
        comps = kwargs["reward_components"]
        names = kwargs.get("reward_component_names")
        k = comps.shape[1] if isinstance(comps, torch.Tensor) and comps.dim() >= 2 else 0
        out["reward_keys"] = tuple(str(n) for n in names) if names is not None else tuple(f"reward_component_{j}" for j in range(k))
    return out
