"""Training runs on Ray through the launcher with issue 15's losses: ``dro``, bypass mode and a
composed off-policy correction chain (each a few tiny steps on the session's Ray)."""

from __future__ import annotations

import math
import sys

import pytest

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import parse_config, resolve_names
from skyrl_fn.cli.plugins import ship_by_value
from skyrl_fn.distributed.ray_runner import train_on_ray

pytestmark = pytest.mark.ray

ship_by_value(sys.modules[__name__])

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--data.min-digits", "1", "--data.max-digits", "2", "--logging.no-progress", "--trainer.steps", "2",
]
CHAIN = ["--algorithm.off-policy-correction", "outlier_veto", "tis_sequence", "geo_mask", "opsm",
         "--algorithm.correction.tis-sequence.against", "current", "--algorithm.correction.geo-mask.against", "current"]


def test_dro_in_bypass_mode_with_a_correction_chain_trains_on_ray(ray_session, tmp_path):
    # update_epochs 2: in the second epoch the policy has moved, so the corrections measured
    # against the current policy (verl's bypass semantics) see a ratio other than 1.
    argv = [*TINY, "--logging.run-dir", str(tmp_path / "run"), "--algorithm.policy-loss", "dro",
            "--algorithm.loss.dro-beta", "0.1", "--algorithm.bypass-mode", "--algorithm.update-epochs", "2", *CHAIN]
    run = resolve_names(parse_config(argv, DEFAULT_TABLE), DEFAULT_TABLE)
    assert run.algorithm.names["policy_loss"] == "dro" and run.config.algorithm.bypass_mode
    history = train_on_ray(run).history
    assert len(history) == 2
    for step in history:
        assert step["skipped"] == 0.0 and math.isfinite(step["loss"])
        # every piece of the chain logged what it clipped or masked
        for key in ("outlier_masked_frac", "tis_seq_capped_frac", "geo_mask_masked_frac", "opsm_masked_frac", "masked_frac", "mismatch_k3"):
            assert key in step and 0.0 <= step[key] <= 1.0 or key == "mismatch_k3", key
        assert step["clip_frac_high"] == step["clip_frac_low"] == 0.0  # dro clips nothing
