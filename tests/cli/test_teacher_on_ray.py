"""On-policy distillation through the launcher: the teacher runs as its own Ray actor and the run
matches the in-process one; a teacher with another vocabulary ends in one ``error:`` line (exit 2)
before Ray starts."""

from __future__ import annotations

import pytest

from trainer.teachers import save_teacher

from skyrl_fn.cli import main

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--data.min-digits", "1", "--data.max-digits", "2", "--logging.no-progress", "--logging.no-tensorboard",
    "--logging.no-plot", "--trainer.steps", "2", "--trainer.ckpt-interval", "0",
]
_TIMING = {"step_seconds", "rollout_seconds", "rollout_tokens_per_s", "tokens_per_s", "update_seconds", "update_cpu_seconds", "update_queue_seconds"}


@pytest.mark.slow
@pytest.mark.ray
def test_distillation_on_ray_matches_in_process(ray_session, tmp_path):
    path = save_teacher(tmp_path / "teacher")
    args = [*TINY, "--teacher.model", path, "--algorithm.advantage-estimator", "distill", "--algorithm.batch-transforms", "overlong_filter"]
    on_ray = main([*args, "--logging.run-dir", str(tmp_path / "ray")]).history
    local = main([*args, "--logging.run-dir", str(tmp_path / "local"), "--ray.no-use-ray"]).history
    assert len(on_ray) == len(local) == 2
    for a, b in zip(on_ray, local):
        assert "teacher_kl" in a and set(a) == set(b)
        for k, v in b.items():
            if k not in _TIMING and isinstance(v, float):
                assert a[k] == pytest.approx(v, rel=1e-4, abs=1e-6), k


def test_a_teacher_with_another_vocabulary_is_one_error_line(tmp_path, capsys):
    path = save_teacher(tmp_path / "letters", alphabet="abcdefghij")
    with pytest.raises(SystemExit) as exit_info:
        main([*TINY, "--teacher.model", path, "--logging.run-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: teacher.model") and "expected the policy's tokenizer" in err[-1]
