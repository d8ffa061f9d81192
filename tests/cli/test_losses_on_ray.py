"""Training runs on Ray through the launcher with issue 15's losses: ``dro``, bypass mode and a
composed off-policy correction chain (a few tiny steps on the session's Ray).

The same run also carries the loop-level batch transforms ``overlong_filter`` + ``dynamic_sampling``
(``tests/cli/test_batch_transforms_on_ray.py`` checks their counts; its own runs are in make
test-all), and it is ``tests/distributed/test_ray_runner.py``'s Ray == in-process run of the fast
suite: a chained critic estimator (``gae`` then clipping, registered in the driver) with a
reference model and KL in the reward and in the loss, so a critic and a reference actor. Each Ray
run starts actor processes that import torch and transformers (~9 s of CPU each), and the fast
suite has a CPU budget (docs/contributing.md). Each test below asserts one feature of the shared
run.
"""

from __future__ import annotations

import math
import sys

import pytest

from skyrl_fn.cli import main, parse_config, resolve_names
from skyrl_fn.cli.plugins import ship_by_value
from skyrl_fn.trainer.loop import train
from tests.cli.test_batch_transforms_on_ray import CASES, TINY, check_transform_counts
from tests.distributed.test_ray_runner import ALGORITHMS, CHAINED, check_same_metrics

# make test runs pytest-xdist with --dist loadscope: one process runs the module, so the module's
# one run serves every test.
pytestmark = pytest.mark.ray

ship_by_value(sys.modules[__name__])

CHAIN = ["--algorithm.off-policy-correction", "outlier_veto", "tis_sequence", "geo_mask", "opsm",
         "--algorithm.correction.tis-sequence.against", "current", "--algorithm.correction.geo-mask.against", "current"]


STEPS = 3  # TINY's
TRANSFORMS = "dynamic_sampling+overlong_filter"
# update_epochs 2: in the second epoch the policy has moved, so the corrections measured against
# the current policy (verl's bypass semantics) see a ratio other than 1.
DRO = ["--algorithm.policy-loss", "dro", "--algorithm.loss.dro-beta", "0.1", "--algorithm.bypass-mode", "--algorithm.update-epochs", "2", *CHAIN]


#: The estimator, reference and KL of test_ray_runner.py's "gae_clipped+kl" (a critic and a reference
#: actor), and a checkpoint at the last step (the critic's weights in it). Seed 2: with seed 0 the
#: transforms keep no prompt group of step 3's three sampled batches (a skipped step).
CRITIC = [*ALGORITHMS["gae_clipped+kl"], "--trainer.ckpt-interval", str(STEPS), "--trainer.seed", "2"]


@pytest.fixture(scope="module")
def dro_run(ray_session, tmp_path_factory):
    """``(summary, run_dir, run, in-process history)``: one launcher run on Ray (dro in bypass mode
    with the correction chain, the batch transforms, a critic and a reference) and the same run
    in-process."""
    tmp = tmp_path_factory.mktemp("dro")
    argv = [*TINY, *DRO, *CASES[TRANSFORMS], *CRITIC]
    run = resolve_names(parse_config([*argv, "--logging.run-dir", str(tmp / "run")], CHAINED), CHAINED)
    assert run.algorithm.names["policy_loss"] == "dro" and run.config.algorithm.bypass_mode
    assert run.uses_critic and run.uses_reference
    summary = main([*argv, "--logging.run-dir", str(tmp / "run")], CHAINED)
    local = train(resolve_names(parse_config([*argv, "--logging.run-dir", str(tmp / "local"), "--ray.no-use-ray"], CHAINED), CHAINED))
    return summary, tmp / "run", run, local.history


def test_dro_in_bypass_mode_with_a_correction_chain_trains_on_ray(dro_run):
    history = dro_run[0].history
    assert len(history) == STEPS
    for step in history:
        assert step["skipped"] == 0.0 and math.isfinite(step["loss"])
        # every piece of the chain logged what it clipped or masked
        for key in ("outlier_masked_frac", "tis_seq_capped_frac", "geo_mask_masked_frac", "opsm_masked_frac", "masked_frac", "mismatch_k3"):
            assert key in step and 0.0 <= step[key] <= 1.0 or key == "mismatch_k3", key
        assert step["clip_frac_high"] == step["clip_frac_low"] == 0.0  # dro clips nothing


def test_loop_level_batch_transforms_train_on_ray_and_log_their_counts(dro_run):
    check_transform_counts(*dro_run[:2], STEPS, TRANSFORMS)


def test_ray_gives_the_in_process_metrics_with_a_critic_a_reference_and_a_chained_estimator(dro_run):
    summary, _, run, local = dro_run
    check_same_metrics(run, summary.history, local)
