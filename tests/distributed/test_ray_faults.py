"""Faults on Ray, the path users take: a non-finite loss in the policy actor is skipped and counted
there, and too many in a row stop the run with one line naming the cause; the checkpoints written
before stay intact."""

from __future__ import annotations

import math
import sys
import warnings

import attrs
import pytest

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.cli.plugins import ship_by_value
from skyrl_fn.distributed.ray_runner import train_on_ray
from skyrl_fn.trainer import checkpoint as ckpt
from skyrl_fn.trainer.nonfinite import NonFiniteStepError, SkippedStepWarning

pytestmark = pytest.mark.ray

# Importable only through pytest's sys.path edit: Ray workers get this module by value.
ship_by_value(sys.modules[__name__])

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--data.min-digits", "1", "--data.max-digits", "2", "--logging.no-progress",
]


def nan_after_first_steps(batch, **hyper):
    """``regular`` PPO clip with a NaN per-token loss from the third call on (one call per step:
    one epoch, one micro-batch), counted in the policy actor's process."""
    nan_after_first_steps.calls = getattr(nan_after_first_steps, "calls", 0) + 1
    out = DEFAULT_TABLE.policy_loss("regular")(batch, **hyper)
    return attrs.evolve(out, token_loss=out.token_loss * math.nan) if nan_after_first_steps.calls > 2 else out


@pytest.mark.slow  # make test-all; make test checks the same skip/stop rule in-process (tests/trainer)
def test_nan_loss_on_ray_is_skipped_then_stops_the_run_naming_it(ray_session, tmp_path):
    table = DEFAULT_TABLE.register("nan_after_first_steps", nan_after_first_steps, kind="policy_loss")
    argv = [*TINY, "--logging.run-dir", str(tmp_path / "run"), "--trainer.steps", "8", "--trainer.ckpt-interval", "1", "--trainer.keep-checkpoints", "8",
            "--trainer.max-consecutive-skips", "2", "--algorithm.policy-loss", "nan_after_first_steps"]
    run = resolve_names(parse_config(argv, table), table)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", SkippedStepWarning)
        with pytest.raises(NonFiniteStepError, match=r"3 consecutive steps skipped \(limit 2\), the last, step 5, for a non-finite loss"):
            train_on_ray(run)
    skipped = [str(w.message) for w in caught if w.category is SkippedStepWarning]
    assert [m.split(": a non-finite loss")[0] for m in skipped] == ["step 3 skipped (1 so far)", "step 4 skipped (2 so far)"]
    # Steps 3 and 4 were saved with the weights of step 2: the NaN never reached them.
    c2, c4 = (ckpt.load(f"{run.config.ckpt_dir}/step_0000000{i}") for i in (2, 4))
    assert all(bool((c2.weights["policy"][k] == c4.weights["policy"][k]).all()) for k in c2.weights["policy"])
