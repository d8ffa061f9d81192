"""Tasks, rewards and rollout backends are table entries: chosen by name, bound once in ``resolve``."""

from __future__ import annotations

import pytest

from skyrl_fn import DEFAULT_TABLE, UnknownNameError
from skyrl_fn.trainer.run_table import RUN_BUILTINS, RUN_TABLE, with_run_builtins
from skyrl_fn.trainer.config import EvalConfig, TrainConfig
from skyrl_fn.rollout.base import HFBackend, RolloutConfig
from skyrl_fn.tasks.base import DataConfig, DigitsTask, Example, Rewarded
from skyrl_fn.trainer.evaluate import heldout_task
from skyrl_fn.trainer.run import resolve


def _cfg(**data) -> TrainConfig:
    return TrainConfig(data=DataConfig(**data))


def test_run_builtins_are_added_once_and_never_replace_an_entry():
    assert {(k, n) for k, n, _ in RUN_BUILTINS} <= {(e.kind, e.name) for e in RUN_TABLE.entries()}
    assert "digits" not in DEFAULT_TABLE.names("task")  # the algorithm table stays algorithm-only
    mine = DEFAULT_TABLE.register("digits", lambda data, *, seed=0: "mine", kind="task")
    assert with_run_builtins(mine).get("task", "digits")(DataConfig()) == "mine"
    assert len(with_run_builtins(RUN_TABLE)) == len(RUN_TABLE)


def test_resolve_binds_the_task_reward_and_backend_once():
    run = resolve(_cfg(digits_op="reverse"), DEFAULT_TABLE)  # the built-ins are added
    task = run.make_task()
    assert isinstance(task, DigitsTask) and task.op == "reverse" and task.seed == run.config.trainer.seed
    assert isinstance(run.make_backend(None, None), HFBackend)


def test_unknown_names_and_arguments_name_the_field_and_the_closest_option():
    with pytest.raises(UnknownNameError, match=r"data\.task: unknown task 'digit'; did you mean 'digits'\?"):
        resolve(_cfg(task="digit"), DEFAULT_TABLE)
    with pytest.raises(UnknownNameError, match=r"data\.reward: unknown reward 'stepcredit'; did you mean 'step_credit'\?"):
        resolve(_cfg(reward="stepcredit"), DEFAULT_TABLE)
    with pytest.raises(UnknownNameError, match=r"rollout\.backend: unknown rollout backend 'vlm'; did you mean 'vllm'\?"):
        resolve(TrainConfig(rollout=RolloutConfig(backend="vlm")), DEFAULT_TABLE)
    with pytest.raises(ValueError, match=r"data\.reward_args: reward 'arithmetic' unknown argument 'format_credits'; did you mean 'format_credit'\?"):
        resolve(_cfg(reward="arithmetic", reward_args={"format_credits": 0.1}), DEFAULT_TABLE)
    with pytest.raises(ValueError, match=r"data\.task_args: 'seed' is set by the trainer \(trainer\.seed\)"):
        resolve(_cfg(task_args={"seed": 3}), DEFAULT_TABLE)
    with pytest.raises(ValueError, match=r"data\.reward_args: expected none without --data\.reward"):
        resolve(_cfg(reward_args={"format_credit": 0.1}), DEFAULT_TABLE)


def test_a_registered_task_gets_its_own_arguments():
    def parity(data: DataConfig, *, seed: int = 0, length: int = 3) -> DigitsTask:
        return DigitsTask(op="copy", min_digits=length, max_digits=length, seed=seed)

    table = DEFAULT_TABLE.register("parity", parity, kind="task")
    task = resolve(_cfg(task="parity", task_args={"length": 5}), table).make_task()
    assert len(task.example(0).answer) == 5


def test_a_chosen_reward_scores_the_task_and_its_heldout_split():
    run = resolve(
        _cfg(task="arithmetic", reward="arithmetic", reward_args={"format_credit": 0.25}), DEFAULT_TABLE
    )
    task = run.make_task()
    assert isinstance(task, Rewarded) and task.name == "arithmetic"
    e = task.example(0)
    assert task.reward(f"#### {e.answer}", e) == 1.0 and task.reward("#### -999", e) == 0.25
    held = heldout_task(task, EvalConfig(every=1))
    assert held.task.split == "eval" and held.reward("#### -999", held.example(0)) == 0.25


def test_a_reward_replaces_the_task_own_on_a_heldout_file(tmp_path):
    path = tmp_path / "held.jsonl"
    path.write_text('{"prompt": "1+1?", "answer": "2"}\n')
    exact = lambda response, example: float(response == example.answer)  # noqa: E731
    table = DEFAULT_TABLE.register("exact", exact, kind="reward")
    task = resolve(_cfg(reward="exact"), table).make_task()
    held = heldout_task(task, EvalConfig(every=1, path=str(path)))
    assert held.reward("2", Example(index=0, prompt="", answer="2")) == 1.0
    assert held.reward("the answer is 2", Example(index=0, prompt="", answer="2")) == 0.0  # math would give 1


def test_a_task_without_a_heldout_split_has_no_heldout_attribute():
    run = resolve(_cfg(reward="char_credit"), DEFAULT_TABLE)
    task = run.make_task()
    assert not hasattr(task, "heldout")
    with pytest.raises(ValueError, match="eval.path"):
        heldout_task(task, EvalConfig(every=2))


def test_registration_checks_the_kind_call():
    with pytest.raises(TypeError, match=r"reward 'r': expected a function taking 2 positional input"):
        DEFAULT_TABLE.register("r", lambda response: 1.0, kind="reward")
    with pytest.raises(TypeError, match="rollout_backend 'b'"):
        DEFAULT_TABLE.register("b", lambda model, tokenizer: None, kind="rollout_backend")


def test_the_cli_types_the_chosen_task_and_reward_arguments():
    from skyrl_fn.cli import UsageError, build_table, parse_config

    def parity(data: DataConfig, *, seed: int = 0, length: int = 3) -> DigitsTask:
        return DigitsTask(op="copy", min_digits=length, max_digits=length, seed=seed)

    table = build_table(DEFAULT_TABLE.register("parity", parity, kind="task"))
    cfg = parse_config(["--data.task", "parity", "--data.task-args.length", "4", "--data.reward", "arithmetic",
                        "--data.reward-args.format-credit", "0.2"], table)
    assert cfg.data.task_args == {"length": 4} and type(cfg.data.task_args["length"]) is int
    assert cfg.data.reward_args == {"format_credit": 0.2}
    with pytest.raises(UsageError, match=r"--data.task-args.lenght: task 'parity' takes no hyperparameter 'lenght' \(it takes: length\)"):
        parse_config(["--data.task", "parity", "--data.task-args.lenght", "4"], table)
    with pytest.raises(SystemExit):  # tyro: not an int
        parse_config(["--data.task", "parity", "--data.task-args.length", "four"], table)
