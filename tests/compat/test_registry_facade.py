"""The SkyRL-Train façade: registry behaviour, built-ins with SkyRL's keywords, freeze(), sync."""

from __future__ import annotations

import enum
import functools
import sys
import threading
import types

import cloudpickle
import numpy as np
import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, AdvantageInput, AdvantageOutput, AlgorithmTable, PolicyLossInput, PolicyLossOutput
from skyrl_fn.compat import (
    AdvantageEstimatorRegistry,
    LossConfig,
    NativeFromSkyRL,
    NativeFromSkyRLLoss,
    PolicyLossRegistry,
    PolicyLossType,
    SkyRLPolicyLoss,
    UnknownNameError,
    compute_advantages_and_returns,
    config_from_hyperparameters,
    freeze,
    register_advantage_estimator,
    register_policy_loss,
    repopulate_all_registries,
    sync_registries,
)
from skyrl_fn.compat.advantage_estimators import AdvantageEstimator  # the seed's class-based base
from skyrl_fn.compat.skyrl_train import PolicyLossRegistry as SeedPolicyLossRegistry
from skyrl_fn.compat.skyrl_train import register_policy_loss as register_seed_policy_loss
from skyrl_fn.core.requires import extras_required

ESTIMATORS = DEFAULT_TABLE.names("advantage_estimator")


@pytest.fixture(autouse=True)
def clean_registries():
    """The façade is global state: start and end every test with only the built-ins."""
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()
    SeedPolicyLossRegistry.reset()
    yield
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()
    SeedPolicyLossRegistry.reset()


def skyrl_kwargs(dtype=torch.float32) -> dict:
    """What SkyRL-Train's trainer passes: float masks, uid strings as a numpy index, values, extras."""
    g = torch.Generator().manual_seed(0)
    rewards = torch.zeros(6, 4, dtype=dtype)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]], dtype=dtype)
    last = mask.sum(-1).long() - 1
    rewards[torch.arange(6), last] = torch.tensor([1.0, 0.0, 1.0, 0.5, 0.0, 1.0], dtype=dtype)
    return dict(
        token_level_rewards=rewards,
        response_mask=mask,
        index=np.array(["u1", "u1", "u1", "u2", "u2", "u2"]),
        values=(torch.rand(6, 4, generator=g, dtype=dtype) * mask),
        reward_baselines=torch.tensor([0.5, 0.5, 0.5, 0.2, 0.2, 0.2], dtype=dtype),
        gamma=0.9,
        lambd=0.95,
        epsilon=1e-6,
        grpo_norm_by_std=True,
        config=types.SimpleNamespace(advantage_estimator="whatever", kl_ctrl={"kl_coef": 0.1}),
        batch_size=6,  # junk extra, as SkyRL-Train passes a superset
    )


def as_batch(kw: dict, extras=()) -> AdvantageInput:
    return AdvantageInput(
        token_level_rewards=kw["token_level_rewards"],
        response_mask=kw["response_mask"],
        group_ids=kw["index"],
        values=kw["values"],
        reward_baselines=kw["reward_baselines"],
        extras={k: kw[k] for k in extras},
    )


# -- the registry ------------------------------------------------------------------------------
def test_decorator_registers_and_returns_a_wraps_wrapper():
    def my_adv(token_level_rewards, response_mask, index, **kwargs):
        """doc"""
        return token_level_rewards, token_level_rewards

    wrapped = register_advantage_estimator("mine")(my_adv)
    assert wrapped.__wrapped__ is my_adv and wrapped.__name__ == "my_adv" and wrapped.__doc__ == "doc"
    assert AdvantageEstimatorRegistry.get("mine") is wrapped
    available = AdvantageEstimatorRegistry.list_available()
    assert available[-1] == "mine" and set(ESTIMATORS) <= set(available)


def test_reset_drops_user_entries_and_keeps_the_builtins():
    builtin_estimators = set(AdvantageEstimatorRegistry.list_available())
    builtin_losses = set(PolicyLossRegistry.list_available())
    assert set(ESTIMATORS) <= builtin_estimators
    AdvantageEstimatorRegistry.register("leak_probe", lambda **kw: None)
    PolicyLossRegistry.register("leak_probe", lambda log_probs, old_log_probs, advantages, config, loss_mask=None: None)
    assert "leak_probe" in AdvantageEstimatorRegistry.list_available() and "leak_probe" in PolicyLossRegistry.list_available()
    AdvantageEstimatorRegistry.reset()
    PolicyLossRegistry.reset()
    assert set(AdvantageEstimatorRegistry.list_available()) == builtin_estimators
    assert set(PolicyLossRegistry.list_available()) == builtin_losses
    AdvantageEstimatorRegistry.register("leak_probe", lambda **kw: None)  # no duplicate error


def test_every_test_starts_with_only_the_builtins():
    # clean_registries (autouse) resets before each test, whatever ran before: in any order, a
    # test sees exactly the table's built-in names.
    assert set(AdvantageEstimatorRegistry.list_available()) == set(ESTIMATORS)
    assert set(PolicyLossRegistry.list_available()) == set(DEFAULT_TABLE.names("policy_loss"))


def test_duplicates_raise_value_error_also_for_builtins():
    AdvantageEstimatorRegistry.register("x", lambda **kw: None)
    with pytest.raises(ValueError, match="advantage estimator 'x' already registered"):
        AdvantageEstimatorRegistry.register("x", lambda **kw: None)
    with pytest.raises(ValueError, match="'grpo' already registered"):
        register_advantage_estimator("grpo")(lambda **kw: None)


def test_skyrl_only_names_of_our_extra_builtins_can_be_shadowed():
    with pytest.raises(ValueError, match="policy loss 'regular' already registered"):
        register_policy_loss(PolicyLossType.REGULAR)(lambda *a, **k: None)
    extra = next(n for n in DEFAULT_TABLE.names("advantage_estimator") if n not in {"gae", "grpo", "rloo", "reinforce++", "maxrl"})
    mine = register_advantage_estimator(extra)(leaky_fn)  # SkyRL code may use a name only we ship
    assert AdvantageEstimatorRegistry.get(extra) is mine
    assert AdvantageEstimatorRegistry.list_available().count(extra) == 1
    assert isinstance(freeze().estimator(extra), NativeFromSkyRL)
    AdvantageEstimatorRegistry.unregister(extra)
    assert AdvantageEstimatorRegistry.get(extra).name == extra and freeze().estimator(extra) is DEFAULT_TABLE.estimator(extra)


def test_unknown_get_is_key_and_value_error_with_closest_and_available():
    with pytest.raises(UnknownNameError) as err:
        AdvantageEstimatorRegistry.get("grop")
    assert isinstance(err.value, KeyError) and isinstance(err.value, ValueError)
    assert "did you mean 'grpo'" in str(err.value) and "Available" in str(err.value)
    with pytest.raises(ValueError, match="Unknown policy loss 'nope'"):  # SkyRL's wording (issue 11.4)
        PolicyLossRegistry.get("nope")


def test_unregister_user_and_builtin_then_reset_and_repopulate():
    PolicyLossRegistry.register("mine", lambda *a, **k: None)
    PolicyLossRegistry.unregister("mine")
    assert "mine" not in PolicyLossRegistry.list_available()
    with pytest.raises(ValueError, match="'mine' not registered"):
        PolicyLossRegistry.unregister("mine")
    AdvantageEstimatorRegistry.unregister("grpo")  # SkyRL lets you replace a default this way
    assert "grpo" not in AdvantageEstimatorRegistry.list_available()
    with pytest.raises(KeyError):
        AdvantageEstimatorRegistry.get("grpo")
    repopulate_all_registries()
    assert "grpo" in AdvantageEstimatorRegistry.list_available()
    AdvantageEstimatorRegistry.unregister("grpo")
    AdvantageEstimatorRegistry.register("grpo", lambda **kw: "mine")
    repopulate_all_registries()  # a user function took the name: it stays
    assert AdvantageEstimatorRegistry.get("grpo")() == "mine"
    AdvantageEstimatorRegistry.reset()
    assert AdvantageEstimatorRegistry.list_available() == list(ESTIMATORS)


def test_strenum_names_are_accepted_and_stored_as_plain_strings():
    class Mine(enum.StrEnum):
        A = "mine_a"

    register_policy_loss(Mine.A)(lambda *a, **k: None)
    assert PolicyLossRegistry.get("mine_a") is PolicyLossRegistry.get(Mine.A)
    assert type(PolicyLossRegistry.list_available()[-1]) is str
    PolicyLossRegistry.unregister(Mine.A)
    assert PolicyLossType.REGULAR == "regular" and AdvantageEstimator.GRPO == "grpo"
    assert AdvantageEstimatorRegistry.get(AdvantageEstimator.GRPO).name == "grpo"


def test_bad_registrations_are_rejected_at_register_time():
    with pytest.raises(ValueError, match="name"):
        AdvantageEstimatorRegistry.register("two words", lambda **kw: None)
    with pytest.raises(TypeError, match="expected a callable"):
        AdvantageEstimatorRegistry.register("x", 3)
    with pytest.raises(TypeError, match="AdvantageEstimator subclass"):
        AdvantageEstimatorRegistry.register("x", dict)

    def native(batch: AdvantageInput) -> AdvantageOutput:
        return AdvantageOutput(advantages=batch.token_level_rewards, returns=batch.token_level_rewards)

    with pytest.raises(TypeError, match="AlgorithmTable.register"):
        AdvantageEstimatorRegistry.register("x", native)


# -- built-ins with SkyRL-Train's keywords -------------------------------------------------------
@pytest.mark.parametrize("name", ESTIMATORS)
def test_every_builtin_runs_with_skyrl_keywords_and_ignores_extras(name):
    kw = skyrl_kwargs()
    entry = DEFAULT_TABLE.entry("advantage_estimator", name)
    # Per-sample fields an estimator requires arrive as keywords of their own name (verl's style).
    fields = sorted(extras_required(entry.requires))
    g = torch.Generator().manual_seed(1)
    kw.update({k: -torch.rand(6, 4, generator=g) for k in fields})
    accepted = entry.hyperparameters() or {}
    fixed = entry.fn.keywords if isinstance(entry.fn, functools.partial) else {}
    native = {"gamma": 0.9, "lambd": 0.95, "epsilon": 1e-6, "norm_by_std": True}
    want = DEFAULT_TABLE.compute_advantages(
        name, as_batch(kw, fields), **{k: v for k, v in native.items() if k in accepted and k not in fixed}
    )
    before = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    adv, ret = AdvantageEstimatorRegistry.get(name)(**kw)
    torch.testing.assert_close(adv, want.advantages)
    torch.testing.assert_close(ret, want.returns)
    for k, v in before.items():
        assert torch.equal(kw[k], v), f"{name} changed {k} in place"
    # one call site for every estimator, as SkyRL-Train's compute_advantages_and_returns
    kw.pop("gamma"), kw.pop("lambd")
    adv2, _ = compute_advantages_and_returns(adv_estimator=name, gamma=0.9, lambd=0.95, **kw)
    torch.testing.assert_close(adv2, adv)


@pytest.mark.parametrize("spelling", ["grpo_norm_by_std", "norm_adv_by_std_in_grpo"])
def test_std_switch_under_both_skyrl_spellings(spelling):
    kw = skyrl_kwargs()
    del kw["grpo_norm_by_std"]
    grpo = AdvantageEstimatorRegistry.get("grpo")
    centred, _ = grpo(**kw, **{spelling: False})
    want = DEFAULT_TABLE.compute_advantages("grpo", as_batch(kw), norm_by_std=False)
    torch.testing.assert_close(centred, want.advantages)
    normed, _ = grpo(**kw, **{spelling: True})
    assert not torch.allclose(centred, normed)
    torch.testing.assert_close(normed, grpo(**kw)[0])  # True is the default


def test_std_switch_spellings_must_agree_and_dr_grpo_stays_dr_grpo():
    kw = skyrl_kwargs()
    with pytest.raises(ValueError, match="grpo_norm_by_std=True and norm_adv_by_std_in_grpo=False"):
        AdvantageEstimatorRegistry.get("grpo")(**kw, norm_adv_by_std_in_grpo=False)
    if "dr_grpo" in ESTIMATORS:  # the trainer passes grpo_norm_by_std=True on every call
        dr, _ = AdvantageEstimatorRegistry.get("dr_grpo")(**kw)
        torch.testing.assert_close(dr, DEFAULT_TABLE.compute_advantages("dr_grpo", as_batch(kw)).advantages)


def test_index_none_is_one_group_and_missing_tensors_are_named():
    kw = skyrl_kwargs()
    kw["index"] = None
    adv, _ = AdvantageEstimatorRegistry.get("grpo")(**kw)
    kw["index"] = np.zeros(6, dtype=np.int64)
    torch.testing.assert_close(adv, AdvantageEstimatorRegistry.get("grpo")(**kw)[0])
    with pytest.raises(TypeError, match="response_mask"):
        AdvantageEstimatorRegistry.get("grpo")(token_level_rewards=kw["token_level_rewards"])


# -- class-based estimators ----------------------------------------------------------------------
class Leaky(AdvantageEstimator):
    """Writes 7 into the padding; returns (advantages, returns) when asked to."""

    def __init__(self, pair: bool = False):
        self.pair = pair

    def compute_advantages(self, rewards, values, masks, **kwargs):
        adv = rewards.sum(-1, keepdim=True).expand_as(rewards) + 7 * (1 - masks)
        return (adv, adv + 1) if self.pair else adv


def test_class_based_returns_equal_advantages_and_are_masked():
    register_advantage_estimator("leaky", Leaky)
    kw = skyrl_kwargs()
    adv, ret = AdvantageEstimatorRegistry.get("leaky")(**kw)
    mask = kw["response_mask"].bool()
    assert torch.equal(adv, ret) and bool((adv[~mask] == 0).all())
    torch.testing.assert_close(adv[mask], kw["token_level_rewards"].sum(-1, keepdim=True).expand(6, 4)[mask])
    register_advantage_estimator("leaky_pair", Leaky(pair=True))
    adv, ret = AdvantageEstimatorRegistry.get("leaky_pair")(**kw)
    torch.testing.assert_close(ret[mask], adv[mask] + 1)
    with pytest.raises(NotImplementedError):
        AdvantageEstimator()(**kw)


# -- freeze --------------------------------------------------------------------------------------
def leaky_fn(token_level_rewards, response_mask, index, gamma, **kwargs):
    """Non-zero padding, NaN in padding, and reads the index and gamma."""
    assert isinstance(index, np.ndarray) and index.dtype == np.int64
    adv = token_level_rewards.sum(-1, keepdim=True) * gamma + torch.zeros_like(response_mask)
    adv = torch.where(response_mask.bool(), adv, torch.nan)
    token_level_rewards.mul_(0)  # an in-place edit must not reach the caller's record
    return adv, adv


def test_freeze_wraps_user_functions_as_checked_native_estimators():
    register_advantage_estimator("leaky")(leaky_fn)
    AdvantageEstimatorRegistry.unregister("grpo")
    table = freeze()
    assert isinstance(table, AlgorithmTable) and ("advantage_estimator", "grpo") not in table
    assert ("advantage_estimator", "grpo") in DEFAULT_TABLE and isinstance(table.estimator("leaky"), NativeFromSkyRL)
    kw = skyrl_kwargs()
    batch = as_batch(kw)
    rewards = batch.token_level_rewards.clone()
    out = table.compute_advantages("leaky", batch, gamma=0.5)  # off-mask values are zeroed, valid kept
    mask = batch.response_mask
    torch.testing.assert_close(out.advantages[mask], (rewards.sum(-1, keepdim=True) * 0.5).expand(6, 4)[mask])
    assert bool((out.advantages[~mask] == 0).all()) and torch.equal(batch.token_level_rewards, rewards)
    out = table.compute_advantages("leaky", batch)  # SkyRL's default gamma=1.0 is supplied
    torch.testing.assert_close(out.advantages[mask], rewards.sum(-1, keepdim=True).expand(6, 4)[mask])
    clone = cloudpickle.loads(cloudpickle.dumps(table))
    torch.testing.assert_close(clone.compute_advantages("leaky", batch).advantages, out.advantages)


def test_freeze_is_a_snapshot_and_clashes_with_base_need_replace():
    register_advantage_estimator("first")(leaky_fn)
    table = freeze()
    register_advantage_estimator("second")(leaky_fn)
    assert "second" not in table.names("advantage_estimator") and "second" in freeze().names("advantage_estimator")
    with pytest.raises(ValueError, match="already registered"):
        freeze(base=table)
    assert freeze(base=table, replace=True).names("advantage_estimator") == freeze().names("advantage_estimator")


def test_freeze_reports_bad_user_results_by_name():
    AdvantageEstimatorRegistry.register("bad_shape", lambda token_level_rewards, **kw: (token_level_rewards[:, :1],) * 2)
    AdvantageEstimatorRegistry.register("bad_type", lambda **kw: None)
    table, batch = freeze(), as_batch(skyrl_kwargs())
    with pytest.raises(ValueError, match="'bad_shape': advantages expected shape"):
        table.compute_advantages("bad_shape", batch)
    with pytest.raises(TypeError, match="'bad_type': expected \\(advantages, returns\\)"):
        table.compute_advantages("bad_type", batch)


# -- policy losses -------------------------------------------------------------------------------
def toy_clip_loss(batch: PolicyLossInput, *, eps_clip_low: float = 0.2, eps_clip_high: float = 0.2, tau_pos: float = 1.0) -> PolicyLossOutput:
    """A native loss defined here: clipped ratio times tau_pos (to exercise a nested config field)."""
    ratio = torch.exp(batch.log_probs - batch.old_log_probs)
    clipped = torch.clamp(ratio, 1 - eps_clip_low, 1 + eps_clip_high)
    loss = -torch.minimum(ratio * batch.advantages, clipped * batch.advantages) * tau_pos
    frac = ((clipped != ratio) & batch.loss_mask).float().sum() / batch.loss_mask.sum()
    return PolicyLossOutput(token_loss=torch.where(batch.loss_mask, loss, 0.0), metrics={"clip_ratio": frac.detach()})


def _token_mean(token_loss, loss_mask, *, global_tokens=None, global_seqs=None, max_seq_len=None):
    return (token_loss * loss_mask).sum() / loss_mask.sum()


def _seq_mean_token_mean(token_loss, loss_mask, *, global_tokens=None, global_seqs=None, max_seq_len=None):
    return ((token_loss * loss_mask).sum(-1) / loss_mask.sum(-1).clamp(min=1)).mean()


def _seq_mean_token_sum_norm(token_loss, loss_mask, *, global_tokens=None, global_seqs=None, max_seq_len=None):
    return (token_loss * loss_mask).sum() / (token_loss.shape[0] * (max_seq_len or token_loss.shape[1]))


def loss_table() -> AlgorithmTable:
    table = AlgorithmTable().register("toy_clip", toy_clip_loss)
    for name, fn in [("token_mean", _token_mean), ("seq_mean_token_mean", _seq_mean_token_mean), ("seq_mean_token_sum_norm", _seq_mean_token_sum_norm)]:
        table = table.register(name, fn, kind="aggregation")
    return table


def loss_args():
    g = torch.Generator().manual_seed(1)
    lp = (torch.randn(3, 5, generator=g) * 0.3).requires_grad_()
    old = torch.randn(3, 5, generator=g) * 0.3
    adv = torch.randn(3, 5, generator=g)
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.float32)
    return lp, old, adv, mask


@pytest.mark.parametrize(
    "config",
    [
        types.SimpleNamespace(eps_clip_low=0.1, eps_clip_high=0.3, sapo=types.SimpleNamespace(tau_pos=2.0), loss_reduction="sequence_mean"),
        {"eps_clip_low": 0.1, "eps_clip_high": 0.3, "sapo": {"tau_pos": 2.0}, "loss_reduction": "sequence_mean"},
        LossConfig(eps_clip_low=0.1, eps_clip_high=0.3, sapo={"tau_pos": 2.0}, loss_reduction="sequence_mean", unrelated=1),
    ],
)
def test_loss_facade_reads_skyrl_config_and_reduces(config):
    lp, old, adv, mask = loss_args()
    fn = SkyRLPolicyLoss(loss_table(), "toy_clip")
    loss, clip = fn(lp, old, adv, config, mask)
    batch = PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask)
    out = toy_clip_loss(batch, eps_clip_low=0.1, eps_clip_high=0.3, tau_pos=2.0)
    torch.testing.assert_close(loss, _seq_mean_token_mean(out.token_loss, batch.loss_mask))
    assert isinstance(clip, float) and clip == pytest.approx(float(out.metrics["clip_ratio"]))
    loss.backward()
    assert lp.grad is not None and bool((lp.grad[mask == 0] == 0).all())


def test_loss_facade_defaults_reductions_and_errors():
    lp, old, adv, mask = loss_args()
    table, batch = loss_table(), PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask)
    fn = SkyRLPolicyLoss(table, "toy_clip")
    default = toy_clip_loss(batch)  # missing fields take the native defaults, token_mean reduction
    torch.testing.assert_close(fn(lp, old, adv, None, mask)[0], _token_mean(default.token_loss, batch.loss_mask))
    torch.testing.assert_close(fn(lp, old, adv, {"eps_clip_low": None}, mask)[0], fn(lp, old, adv, {}, mask)[0])
    norm = fn(lp, old, adv, {"loss_reduction": "seq_mean_token_sum_norm", "max_seq_len": 10}, mask)[0]
    torch.testing.assert_close(norm, (default.token_loss * mask).sum() / 30)
    full = fn(lp, old, adv, {})[0]  # loss_mask=None trains on every token
    torch.testing.assert_close(full, toy_clip_loss(attrs_evolve_mask(batch)).token_loss.mean())
    with pytest.raises(UnknownNameError, match="did you mean 'sequence_mean'"):
        fn(lp, old, adv, {"loss_reduction": "sequence_men"}, mask)


def attrs_evolve_mask(batch):
    import attrs

    return attrs.evolve(batch, loss_mask=torch.ones_like(batch.loss_mask))


BUILTIN_LOSS_HYPER = {  # SkyRL config field -> the native hyperparameter it must reach
    "regular": {"eps_clip_low": 0.1, "eps_clip_high": 0.25},
    "dual_clip": {"eps_clip_low": 0.1, "eps_clip_high": 0.25, "clip_ratio_c": 2.5},
    "gspo": {"eps_clip_low": 0.1, "eps_clip_high": 0.25},
    "sapo": {"tau_pos": 0.7, "tau_neg": 1.3},
    "cispo": {"cispo_eps_clip_low": 0.1, "cispo_eps_clip_high": 3.0},
    "clip_cov": {"eps_clip_low": 0.1, "eps_clip_high": 0.25, "clip_cov_ratio": 0.3, "clip_cov_lb": -5.0, "clip_cov_ub": 5.0},
    "kl_cov": {"kl_cov_frac": 0.3, "ppo_kl_coef": 0.5},
    "rollout_is": {"eps_clip_low": 0.1, "eps_clip_high": 0.25},
    "cross_entropy": {},
    "importance_sampling": {},
}
SKYRL_CONFIG = types.SimpleNamespace(
    eps_clip_low=0.1, eps_clip_high=0.25, clip_ratio_c=2.5, loss_reduction="token_mean", policy_loss_type="regular",
    sapo=types.SimpleNamespace(tau_pos=0.7, tau_neg=1.3),
    cispo=types.SimpleNamespace(cispo_eps_clip_low=0.1, cispo_eps_clip_high=3.0),
    clip_cov=types.SimpleNamespace(clip_ratio=0.3, clip_cov_lb=-5.0, clip_cov_ub=5.0),
    kl_cov=types.SimpleNamespace(kl_cov_frac=0.3, ppo_kl_coef=0.5),
)


ALL_HYPER = {k: v for hyper in BUILTIN_LOSS_HYPER.values() for k, v in hyper.items()}


def _needs_builtin(kind: str, name: str) -> None:
    if (kind, name) not in DEFAULT_TABLE:
        pytest.skip(f"built-in {kind} {name!r} is not in DEFAULT_TABLE yet (losses not integrated)")


@pytest.mark.parametrize("name", sorted(set(BUILTIN_LOSS_HYPER) | set(DEFAULT_TABLE.names("policy_loss"))))
def test_builtin_losses_through_the_facade_with_a_skyrl_config(name):
    _needs_builtin("policy_loss", name)
    _needs_builtin("aggregation", "token_mean")
    lp, old, adv, mask = loss_args()
    rollout = old + 0.05
    batch = PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask, rollout_log_probs=rollout)
    accepted = DEFAULT_TABLE.entry("policy_loss", name).hyperparameters() or {}
    hyper = {k: v for k, v in ALL_HYPER.items() if k in accepted}  # each value differs from the default
    native = DEFAULT_TABLE.policy_loss(name)(batch, **hyper)
    want = DEFAULT_TABLE.get("aggregation", "token_mean")(native.token_loss, batch.loss_mask)
    if name == "clip_cov":  # SkyRL draws the clipped tokens from the global RNG; so does the façade
        torch.manual_seed(0)
        hyper["clip_cov_seed"] = int(torch.randint(0, 2**31 - 1, (1,)).item())
        native = DEFAULT_TABLE.policy_loss(name)(batch, **hyper)
        want = DEFAULT_TABLE.get("aggregation", "token_mean")(native.token_loss, batch.loss_mask)
        torch.manual_seed(0)
    facade = SeedPolicyLossRegistry.get(name)  # the seed era: reduced loss and a float clip ratio
    loss, clip = facade(lp, old, adv, SKYRL_CONFIG, mask, rollout_logprobs=rollout)
    torch.testing.assert_close(loss, want)
    assert isinstance(clip, float)
    assert clip == pytest.approx(float(native.metrics.get("clip_ratio", 0.0)))
    loss.backward()
    assert torch.isfinite(lp.grad).all()
    if hyper:  # the config really reached the loss: the native defaults give another value
        default = DEFAULT_TABLE.policy_loss(name)(batch).token_loss
        assert not torch.allclose(DEFAULT_TABLE.get("aggregation", "token_mean")(default, batch.loss_mask), want)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "seq_mean_token_sum_norm"])
def test_builtin_loss_reductions_follow_skyrl_loss_reduction(reduction):
    native_name = {"sequence_mean": "seq_mean_token_mean"}.get(reduction, reduction)
    _needs_builtin("policy_loss", "regular")
    _needs_builtin("aggregation", native_name)
    lp, old, adv, mask = loss_args()
    batch = PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask)
    config = {"loss_reduction": reduction, "max_seq_len": 8}
    loss, _ = SeedPolicyLossRegistry.get("regular")(lp, old, adv, config, mask)
    agg = DEFAULT_TABLE.get("aggregation", native_name)
    extra = {"max_seq_len": 8} if reduction == "seq_mean_token_sum_norm" else {}
    torch.testing.assert_close(loss, agg(DEFAULT_TABLE.policy_loss("regular")(batch).token_loss, batch.loss_mask, **extra))


def user_loss(log_probs, old_log_probs, advantages, config, loss_mask=None):
    """Per-token [B, T] result and a metrics dict (SkyRL-Train's newer return)."""
    return -log_probs * advantages * config.sapo.tau_pos, {"clip_ratio": 0.25, "other": torch.tensor(2.0), "none": None}


def test_freeze_wraps_user_losses_into_per_token_native_losses():
    # the seed era's contract (a reduced loss, or per-token); SkyRL 0.3.0's is in test_skyrl_launcher.py
    register_seed_policy_loss("per_token")(user_loss)
    register_seed_policy_loss("scalar")(lambda lp, old, adv, config, loss_mask=None: ((-(lp * adv) * loss_mask).sum() / loss_mask.sum(), 0.5))
    table = freeze()
    lp, old, adv, mask = loss_args()
    batch = PolicyLossInput(log_probs=lp, old_log_probs=old, advantages=adv, loss_mask=mask)
    out = table.policy_loss("per_token")(batch, tau_pos=2.0)  # config built from hyperparameters
    assert isinstance(table.policy_loss("per_token"), NativeFromSkyRLLoss)
    torch.testing.assert_close(out.token_loss, torch.where(batch.loss_mask, -lp * adv * 2.0, 0.0))
    assert set(out.metrics) == {"clip_ratio", "other"} and float(out.metrics["clip_ratio"]) == 0.25
    given = table.policy_loss("per_token")(batch, config={"sapo": LossConfig(tau_pos=3.0)})
    torch.testing.assert_close(given.token_loss, torch.where(batch.loss_mask, -lp * adv * 3.0, 0.0))
    scalar = table.policy_loss("scalar")(batch)  # a reduced loss comes back exactly under token_mean
    torch.testing.assert_close(_token_mean(scalar.token_loss, mask), (-(lp * adv) * mask).sum() / mask.sum())
    torch.testing.assert_close(_seq_mean_token_mean(scalar.token_loss, mask), _token_mean(scalar.token_loss, mask))
    # Without a config the loss reads SkyRL's defaults (sapo.tau_pos = 1.0), as under SkyRL's own config.
    default = table.policy_loss("per_token")(batch)
    torch.testing.assert_close(default.token_loss, torch.where(batch.loss_mask, -lp * adv * 1.0, 0.0))
    assert cloudpickle.loads(cloudpickle.dumps(table)).names("policy_loss") == table.names("policy_loss")


def test_config_from_hyperparameters_is_the_inverse_mapping():
    cfg = config_from_hyperparameters({"tau_neg": 1.1, "clip_cov_ratio": 0.1, "eps_clip_low": 0.2}, loss_reduction="token_mean")
    assert cfg.sapo.tau_neg == 1.1 and cfg.clip_cov.clip_ratio == 0.1 and cfg["eps_clip_low"] == 0.2
    assert cloudpickle.loads(cloudpickle.dumps(cfg)).sapo["tau_neg"] == 1.1
    with pytest.raises(AttributeError, match="read-only"):
        cfg.eps_clip_low = 0.3


# -- sync_registries and Ray ---------------------------------------------------------------------
def test_sync_registries_validates_pickling_and_names_the_culprit(monkeypatch):
    # As before ray.init() (with Ray up, register itself refuses it: see test_compat_ray.py).
    monkeypatch.setitem(sys.modules, "ray", None)
    register_advantage_estimator("fine")(leaky_fn)
    assert "fine" in sync_registries().names("advantage_estimator")
    lock = threading.Lock()

    def holds_a_lock(**kwargs):
        with lock:
            return None

    PolicyLossRegistry.register("locked", holds_a_lock)
    with pytest.raises(TypeError, match="policy loss 'locked' .*holds_a_lock.*cloudpickle"):
        sync_registries()
    PolicyLossRegistry.unregister("locked")  # while Ray is still hidden (a driver would publish)


def test_sync_registries_needs_no_ray(monkeypatch):
    # With sys.modules["ray"] = None, any `import ray` raises: sync must not touch Ray at all.
    monkeypatch.setitem(sys.modules, "ray", None)
    register_advantage_estimator("mine")(leaky_fn)
    assert "mine" in sync_registries().names("advantage_estimator")


def ray_baseline(token_level_rewards, response_mask, index, **kwargs):
    """Batch-mean baseline, registered from this test module and run inside a Ray task."""
    scores = (token_level_rewards * response_mask).sum(-1, keepdim=True)
    adv = (scores - scores.mean()) * response_mask
    return adv, adv


def _in_worker(table, batch):
    from skyrl_fn.compat import AdvantageEstimatorRegistry as worker_registry

    out = table.compute_advantages("ray_baseline", batch)
    return out.advantages, "ray_baseline" in worker_registry.list_available()


@pytest.mark.ray
def test_registered_function_runs_in_a_ray_task_through_the_frozen_table(ray_session):
    ray = ray_session
    module = sys.modules[__name__]
    picklers = (cloudpickle, ray.cloudpickle)  # Ray pickles task arguments with its vendored copy
    for p in picklers:
        p.register_pickle_by_value(module)  # workers cannot import tests/: ship it by value
    try:
        AdvantageEstimatorRegistry.register("ray_baseline", ray_baseline)
        table = sync_registries()  # works with Ray initialised too; returns freeze()
        batch = as_batch(skyrl_kwargs())
        remote = ray.remote(num_cpus=0.25)(_in_worker)
        adv, in_worker_registry = ray.get(remote.remote(table, batch))
    finally:
        for p in picklers:
            p.unregister_pickle_by_value(module)
    torch.testing.assert_close(adv, table.compute_advantages("ray_baseline", batch).advantages)
    assert in_worker_registry  # sync_registries() also published it to the job's workers
