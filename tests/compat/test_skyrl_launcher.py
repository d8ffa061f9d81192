"""User-registered SkyRL losses and estimators train through the launcher, in both eras.

A SkyRL 0.3.0 loss (``skyrl_fn.compat``) receives advantages pre-scaled by the reduction and
returns a masked sum with a metrics dict; a seed-era loss (``skyrl_fn.compat.skyrl_train``)
reduces inside and returns a float. Both, written as REINFORCE, must train exactly like the
native ``reinforce`` loss. Then the pattern of SkyRL 0.3.0's two example entry points
(``main_custom_adv_est.py``, ``main_custom_policy_loss.py``: register at import, then start the
trainer) with our launcher's ``main`` as the trainer, in a subprocess on Ray.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from skyrl_fn import DEFAULT_TABLE, PolicyLossInput
from skyrl_fn.compat import AdvantageEstimatorRegistry, PolicyLossRegistry, freeze, register_policy_loss
from skyrl_fn.compat import skyrl_train
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.cli.plugins import ship_by_value
from skyrl_fn.distributed.ray_runner import train_on_ray
from skyrl_fn.losses.reduction_weights import reduction_weights

ship_by_value(sys.modules[__name__])  # workers cannot import tests/: ship this module by value

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--data.min-digits", "1", "--data.max-digits", "2", "--logging.no-progress", "--logging.no-tensorboard",
    "--logging.no-plot",
]


@pytest.fixture(autouse=True)
def clean_registries():
    for registry in (AdvantageEstimatorRegistry, PolicyLossRegistry, skyrl_train.PolicyLossRegistry):
        registry.reset()
    yield
    for registry in (AdvantageEstimatorRegistry, PolicyLossRegistry, skyrl_train.PolicyLossRegistry):
        registry.reset()


def reinforce_030(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_logprobs=None):
    """REINFORCE under SkyRL 0.3.0's contract: advantages arrive scaled, the loss is a masked sum."""
    return (-log_probs * advantages * loss_mask).sum(), {"clip_ratio": 0.0, "seen_reduction": 1.0}


def reinforce_seed(log_probs, old_log_probs, advantages, config, loss_mask=None):
    """REINFORCE under the seed's contract: reduced inside by config.loss_reduction, a float clip ratio."""
    tok = -log_probs * advantages * loss_mask
    assert config.eps_clip_low == 0.2 and config.clip_ratio_c == 3.0  # the launcher's values reach the config
    if config.loss_reduction == "sequence_mean":
        return (tok.sum(-1) / loss_mask.sum(-1).clamp(min=1)).mean(), 0.0
    assert config.loss_reduction == "token_mean"
    return tok.sum() / loss_mask.sum().clamp(min=1), 0.0


def per_token_030(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_logprobs=None):
    """A 0.3.0-registered loss that returns the per-token loss instead of the sum."""
    return -log_probs * advantages, {"clip_ratio": 0.0}


def _batch(seed=0, b=4, t=5):
    g = torch.Generator().manual_seed(seed)
    lp = (torch.randn(b, t, generator=g) * 0.3 - 1).requires_grad_()
    adv = torch.randn(b, t, generator=g)
    mask = torch.rand(b, t, generator=g) > 0.3
    mask[:, 0] = True
    return PolicyLossInput(log_probs=lp, old_log_probs=lp.detach(), advantages=adv, loss_mask=mask)


@pytest.mark.parametrize("reduction", ["token_mean", "sequence_mean", "seq_mean_token_sum_norm", "token_mean_legacy"])
def test_presummed_wrapper_gives_the_reduced_loss_on_the_batch_and_its_share_under_micro_batching(reduction):
    register_policy_loss("r030", reinforce_030)
    table = freeze()
    batch = _batch()
    config = {"loss_reduction": reduction, "max_seq_len": 7}
    out = table.policy_loss("r030")(batch, config=config)
    m = batch.loss_mask.float()
    w = reduction_weights(batch.loss_mask, reduction=reduction, max_seq_len=7, micro_batch_size=batch.batch_size)
    want = (-batch.log_probs * batch.advantages * m * w).sum()  # SkyRL 0.3.0's loss on this mini-batch
    agg = {"sequence_mean": "seq_mean_token_mean", "token_mean_legacy": "token_mean"}.get(reduction, reduction)
    got = DEFAULT_TABLE.get("aggregation", agg)(out.token_loss, batch.loss_mask, max_seq_len=7)
    torch.testing.assert_close(got, want)
    (g_got,) = torch.autograd.grad(got, batch.log_probs)
    (g_want,) = torch.autograd.grad(want, batch.log_probs)
    torch.testing.assert_close(g_got, g_want)
    assert set(out.metrics) == {"clip_ratio", "seen_reduction"}
    if reduction != "seq_mean_token_sum_norm":  # as a policy_loss_kwargs hyperparameter (max_seq_len = T)
        again = table.policy_loss("r030")(batch, loss_reduction=reduction)
        torch.testing.assert_close(DEFAULT_TABLE.get("aggregation", agg)(again.token_loss, batch.loss_mask), want)


def test_presummed_per_token_result_is_unscaled_and_prompt_mean_is_refused():
    register_policy_loss("tok030", per_token_030)
    table = freeze()
    batch = _batch(1)
    out = table.policy_loss("tok030")(batch, config={"loss_reduction": "sequence_mean"})
    torch.testing.assert_close(out.token_loss, torch.where(batch.loss_mask, -batch.log_probs * batch.advantages, 0.0))
    with pytest.raises(ValueError, match="loss_reduction: .*'tok030'.*got 'prompt_mean'"):
        table.policy_loss("tok030")(batch, config={"loss_reduction": "prompt_mean"})


def test_the_two_eras_keep_separate_loss_registries_and_clash_only_in_the_table():
    register_policy_loss("mine", reinforce_030)
    skyrl_train.register_policy_loss("mine_seed", reinforce_seed)
    assert "mine" not in skyrl_train.PolicyLossRegistry.list_available()
    assert "mine_seed" not in PolicyLossRegistry.list_available()
    table = freeze()
    assert table.policy_loss("mine").presummed and not table.policy_loss("mine_seed").presummed
    with pytest.raises(ValueError, match="already registered"):  # (a Ray driver publishes at registration)
        skyrl_train.register_policy_loss("mine", reinforce_seed)
        freeze()


def _run(tmp_path, table, *extra):
    argv = [*TINY, "--trainer.steps", "2", "--logging.run-dir", str(tmp_path), *extra]
    return resolve_names(parse_config(argv, table), table)


@pytest.mark.slow
@pytest.mark.ray
def test_user_losses_of_both_eras_train_on_ray_exactly_like_native_reinforce(ray_session, tmp_path):
    from skyrl_fn.trainer.loop import train

    register_policy_loss("reinforce_030", reinforce_030)  # (loss, dict)
    skyrl_train.register_policy_loss("reinforce_seed", reinforce_seed)  # (loss, float)
    table = freeze()
    native = train(_run(tmp_path / "native", table, "--algorithm.policy-loss", "reinforce", "--ray.no-use-ray")).history
    for name in ("reinforce_030", "reinforce_seed"):
        summary = train_on_ray(_run(tmp_path / name, table, "--algorithm.policy-loss", name))
        assert summary.steps == 2 and len(summary.history) == 2, name
        for got, want in zip(summary.history, native):
            for key in ("reward", "loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (name, key)


def test_user_losses_follow_the_launchers_loss_reduction(tmp_path):
    from skyrl_fn.trainer.loop import train

    register_policy_loss("reinforce_030", reinforce_030)
    skyrl_train.register_policy_loss("reinforce_seed", reinforce_seed)
    table = freeze()
    args = ("--algorithm.loss-reduction", "seq_mean_token_mean", "--ray.no-use-ray")
    native = train(_run(tmp_path / "native", table, "--algorithm.policy-loss", "reinforce", *args)).history
    for name in ("reinforce_030", "reinforce_seed"):
        history = train(_run(tmp_path / name, table, "--algorithm.policy-loss", name, *args)).history
        for got, want in zip(history, native):
            for key in ("loss", "grad_norm"):
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), (name, key)
    with pytest.raises(ValueError, match="loss_reduction: the SkyRL-style policy loss 'reinforce_seed' expected one of"):
        train(_run(tmp_path / "sum", table, "--algorithm.policy-loss", "reinforce_seed", "--algorithm.loss-reduction", "token_sum", "--ray.no-use-ray"))


# -- SkyRL 0.3.0's example entry points, with our launcher as the trainer --------------------------
ENTRY_POINT = textwrap.dedent(
    '''
    import os
    import sys

    import torch
    from skyrl_fn.compat import AdvantageEstimatorRegistry, PolicyLossRegistry  # the rewritten import
    from skyrl_fn.cli import main

    # Read in the driver; cloudpickle ships the value with the functions (the joined cluster's
    # workers do not inherit this script's environment).
    MARKER = os.environ["MARKER"]


    def batch_mean_baseline(token_level_rewards, response_mask, index, **kwargs):
        with open(MARKER, "a") as f:
            f.write(f"adv {os.getpid()}\\n")
        scores = (token_level_rewards * response_mask).sum(dim=-1, keepdim=True)
        advantages = (scores - scores.mean()) * response_mask
        return advantages, advantages.clone()


    def plain_reinforce(log_probs, old_log_probs, advantages, config, loss_mask=None):
        with open(MARKER, "a") as f:
            f.write(f"loss {os.getpid()}\\n")
        return (-log_probs * advantages).mean(), {"clip_ratio": 0.0}


    AdvantageEstimatorRegistry.register("simple_baseline", batch_mean_baseline)
    PolicyLossRegistry.register("reinforce_example", plain_reinforce)

    if __name__ == "__main__":
        with open(os.environ["DRIVER_PID"], "w") as f:
            f.write(str(os.getpid()))
        main()
    '''
)


@pytest.mark.ray
def test_skyrl_example_entry_points_register_at_import_and_train_on_ray(ray_session, tmp_path):
    # The script joins the test session's Ray with --ray.address, as on a running cluster: its
    # workers are still other processes, and a second local Ray would cost ~7 s of CPU (the default
    # local start is tests/cli/test_smoke.py::test_tiny_budget_run_exits_0_reward_rises_and_writes_every_file).
    address = ray_session.get_runtime_context().gcs_address
    script = tmp_path / "main_custom_algorithms.py"
    script.write_text(ENTRY_POINT)
    marker = tmp_path / "calls.txt"
    env = dict(os.environ, MARKER=str(marker), DRIVER_PID=str(tmp_path / "driver.pid"), RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(script), *TINY, "--trainer.steps", "2", "--algorithm.advantage-estimator", "simple_baseline",
         "--algorithm.policy-loss", "reinforce_example", "--ray.address", address, "--logging.run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    calls = [line.split() for line in marker.read_text().splitlines()]
    driver = int((tmp_path / "driver.pid").read_text())
    assert {kind for kind, _ in calls} == {"adv", "loss"}
    assert all(int(pid) != driver for _, pid in calls), "a registered function ran in the driver, not a Ray worker"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["backend"] == "ray"
