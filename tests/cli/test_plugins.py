"""The four ways a custom algorithm reaches the launcher, at the level of name resolution.

(0) ``module:function`` / ``file.py:function`` names, (a) the compat façade (custom entry point),
(b) ``--plugin`` files and modules, (c) the ``skyrl_fn.algorithms`` entry-point group. The
end-to-end versions (a real training run) are in test_smoke.py and test_ray_runner.py.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import cloudpickle
import pytest

from skyrl_fn import DEFAULT_TABLE
from skyrl_fn.cli import PluginError, UsageError, build_table, parse_config, resolve_names
import ray.cloudpickle

from skyrl_fn.cli.app import split_launcher_args
from skyrl_fn.cli.plugins import ENTRY_POINT_GROUP, check_shippable, import_path_or_module, load_entry_points, ship_by_value

NATIVE = textwrap.dedent(
    '''
    import torch
    from skyrl_fn import AdvantageInput, AdvantageOutput

    @torch.no_grad()
    def my_adv(batch: AdvantageInput, *, scale: float = 1.0) -> AdvantageOutput:
        """Outcome score minus the batch mean. [B, T] -> [B, T]."""
        m = batch.response_mask
        s = torch.where(m, batch.token_level_rewards, 0).sum(-1)
        a = torch.where(m, scale * (s - s.mean())[:, None], 0)
        return AdvantageOutput(advantages=a, returns=a)
    '''
)


def _write(path, text):
    path.write_text(text)
    return path


def _config(argv, table):
    return parse_config(argv, table)


# -- (0) module:function and file.py:function ---------------------------------------------------


def test_file_colon_function_is_imported_registered_and_shipped_by_value(tmp_path):
    f = _write(tmp_path / "est_file.py", NATIVE)
    name = f"{f}:my_adv"
    config = _config(["--algorithm.advantage-estimator", name], DEFAULT_TABLE)
    run = resolve_names(config, DEFAULT_TABLE)
    fn = run.table.estimator(name)
    assert fn.__name__ == "my_adv"
    # A fresh interpreter that cannot see tmp_path unpickles the table: the module went by value.
    blob = cloudpickle.dumps(run.table)
    code = "import pickle, sys; t = pickle.loads(sys.stdin.buffer.read()); print(t.estimator(sys.argv[1]).__name__)"
    out = subprocess.run([sys.executable, "-c", code, name], input=blob, capture_output=True, cwd="/", timeout=120)
    assert out.returncode == 0, out.stderr.decode()[-2000:]
    assert out.stdout.decode().strip() == "my_adv"


def test_module_colon_function(tmp_path, monkeypatch):
    _write(tmp_path / "skyrl_fn_test_mod_est.py", NATIVE)
    monkeypatch.syspath_prepend(str(tmp_path))
    name = "skyrl_fn_test_mod_est:my_adv"
    run = resolve_names(_config(["--algorithm.advantage-estimator", name], DEFAULT_TABLE), DEFAULT_TABLE)
    assert run.table.estimator(name).__name__ == "my_adv"
    assert sys.modules["skyrl_fn_test_mod_est"].__name__ in cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES


def test_module_colon_missing_function_lists_callables(tmp_path):
    f = _write(tmp_path / "est_missing.py", NATIVE)
    with pytest.raises(UsageError, match="has no attribute 'nope'.*my_adv"):
        resolve_names(_config(["--algorithm.advantage-estimator", f"{f}:nope"], DEFAULT_TABLE), DEFAULT_TABLE)


def test_skyrl_style_function_by_name_is_wrapped(tmp_path):
    f = _write(tmp_path / "est_skyrl.py", textwrap.dedent(
        """
        import torch
        def simple_baseline(token_level_rewards, response_mask, index, **kwargs):
            r = (token_level_rewards * response_mask).sum(-1, keepdim=True)
            adv = (r - r.mean()) * response_mask
            return adv, adv.clone()
        """
    ))
    name = f"{f}:simple_baseline"
    run = resolve_names(_config(["--algorithm.advantage-estimator", name], DEFAULT_TABLE), DEFAULT_TABLE)
    import torch
    from skyrl_fn import AdvantageInput

    batch = AdvantageInput(
        token_level_rewards=torch.tensor([[0.0, 1.0], [0.0, 0.0]]), response_mask=torch.ones(2, 2, dtype=torch.bool),
        group_ids=[0, 0],
    )
    out = run.table.compute_advantages(name, batch)
    assert torch.allclose(out.advantages, torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))


# -- (a) the compat façade ----------------------------------------------------------------------


def test_compat_registrations_are_frozen_into_the_table():
    compat = pytest.importorskip("skyrl_fn.compat")

    def facade_est(token_level_rewards, response_mask, index, **kwargs):
        return token_level_rewards * 0, token_level_rewards * 0

    compat.register_advantage_estimator("launcher_test_facade_est", facade_est)
    try:
        table = build_table()
        assert "launcher_test_facade_est" in table.names("advantage_estimator")
    finally:
        compat.AdvantageEstimatorRegistry.unregister("launcher_test_facade_est")
    assert "launcher_test_facade_est" not in build_table().names("advantage_estimator")


# -- (b) --plugin ---------------------------------------------------------------------------------


def test_plugin_file_with_register_hook(tmp_path):
    f = _write(tmp_path / "my_plugin.py", NATIVE + "\n\ndef register(table):\n    return table.register('plugged', my_adv)\n")
    args = split_launcher_args(["--plugin", str(f), "--algorithm.advantage-estimator", "plugged"])
    assert args.plugins == (str(f),) and args.rest == ("--algorithm.advantage-estimator", "plugged")
    table = build_table(plugins=args.plugins)
    run = resolve_names(_config(args.rest, table), table)
    assert run.config.algorithm.advantage_estimator == "plugged"
    assert cloudpickle.loads(cloudpickle.dumps(run.table)).estimator("plugged").__name__ == "my_adv"


def test_plugin_module_name_registering_through_compat(tmp_path, monkeypatch):
    compat = pytest.importorskip("skyrl_fn.compat")
    _write(tmp_path / "skyrl_fn_test_compat_plugin.py", textwrap.dedent(
        """
        from skyrl_fn.compat import register_advantage_estimator

        @register_advantage_estimator("launcher_test_plugin_est")
        def est(token_level_rewards, response_mask, index, **kwargs):
            return token_level_rewards * 0, token_level_rewards * 0
        """
    ))
    monkeypatch.syspath_prepend(str(tmp_path))
    try:
        table = build_table(plugins=["skyrl_fn_test_compat_plugin"])
        assert "launcher_test_plugin_est" in table.names("advantage_estimator")
        assert ship_by_value.__name__  # module found only through sys.path edit: shipped by value
        assert "skyrl_fn_test_compat_plugin" in cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES
    finally:
        compat.AdvantageEstimatorRegistry.unregister("launcher_test_plugin_est")


def test_plugin_errors_are_usage_errors(tmp_path):
    with pytest.raises(PluginError, match="expected an existing .py file"):
        build_table(plugins=[str(tmp_path / "absent.py")])
    with pytest.raises(PluginError, match="importable module"):
        build_table(plugins=["skyrl_fn_no_such_module_xyz"])
    bad = _write(tmp_path / "bad_plugin.py", "def register(table):\n    return None\n")
    with pytest.raises(PluginError, match="return an AlgorithmTable"):
        build_table(plugins=[str(bad)])
    with pytest.raises(UsageError, match="--plugin"):
        split_launcher_args(["--plugin"])


# -- (c) the entry-point group --------------------------------------------------------------------


def _fake_distribution(root, module="skyrl_fn_fake_algos"):
    _write(root / f"{module}.py", NATIVE + "\n\ndef register(table):\n    return table.register('from_entry_point', my_adv)\n")
    info = root / "skyrl_fn_fake_algos-0.1.dist-info"
    info.mkdir()
    _write(info / "METADATA", "Metadata-Version: 2.1\nName: skyrl-fn-fake-algos\nVersion: 0.1\n")
    _write(info / "entry_points.txt", f"[{ENTRY_POINT_GROUP}]\nfake = {module}:register\n")


def test_entry_point_group_of_an_installed_distribution(tmp_path, monkeypatch):
    _fake_distribution(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    table = build_table()
    assert "from_entry_point" in table.names("advantage_estimator")
    run = resolve_names(_config(["--algorithm.advantage-estimator", "from_entry_point"], table), table)
    assert run.table.estimator("from_entry_point").__name__ == "my_adv"
    assert "skyrl_fn_fake_algos" in cloudpickle.cloudpickle._PICKLE_BY_VALUE_MODULES


def test_no_entry_points_leaves_the_table_alone():
    assert load_entry_points(DEFAULT_TABLE, group="skyrl_fn.no_such_group").names("advantage_estimator") == (
        DEFAULT_TABLE.names("advantage_estimator")
    )


# -- end to end through main() (in-process training, one tiny step) -------------------------------

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--trainer.steps", "1", "--ray.no-use-ray", "--logging.no-progress", "--logging.no-tensorboard", "--logging.no-plot",
]


def test_main_trains_with_a_plugin_an_entry_point_and_a_path_name(tmp_path, monkeypatch):
    from skyrl_fn.cli import main

    _fake_distribution(tmp_path, module="skyrl_fn_fake_algos_e2e")
    monkeypatch.syspath_prepend(str(tmp_path))
    plugin = _write(tmp_path / "e2e_plugin.py", NATIVE + "\n\ndef register(table):\n    return table.register('plugged_e2e', my_adv)\n")
    est_file = _write(tmp_path / "e2e_est.py", NATIVE)
    for i, (extra, name) in enumerate([
        (["--plugin", str(plugin)], "plugged_e2e"),
        ([], "from_entry_point"),
        ([], f"{est_file}:my_adv"),
    ]):
        summary = main([*extra, *TINY, "--algorithm.advantage-estimator", name, "--logging.run-dir", str(tmp_path / f"run{i}")])
        assert summary.steps == 1 and len(summary.history) == 1, name


# -- shipping to Ray workers ---------------------------------------------------------------------


def test_plugin_modules_are_registered_with_rays_own_cloudpickle(tmp_path):
    """Ray serialises with its vendored ``ray.cloudpickle``, which has its own by-value registry."""
    module = import_path_or_module(str(_write(tmp_path / "ray_by_value.py", NATIVE)))
    assert module.__name__ in ray.cloudpickle.list_registry_pickle_by_value()
    assert module.__name__ in cloudpickle.list_registry_pickle_by_value()


def test_split_launcher_args_takes_plugins_and_app_dir(tmp_path):
    args = split_launcher_args(["--plugin", "a.py", "--app-dir", str(tmp_path), "--plugin=b", "--trainer.steps", "3"])
    assert args.plugins == ("a.py", "b") and args.app_dir == str(tmp_path)
    assert args.rest == ("--trainer.steps", "3")
    with pytest.raises(UsageError, match="--app-dir: expected an existing directory"):
        split_launcher_args(["--app-dir", str(tmp_path / "absent")])
    with pytest.raises(UsageError, match="--app-dir: expected a directory"):
        split_launcher_args(["--app-dir", "--trainer.steps"])


def test_module_names_are_searched_in_the_working_directory_first(tmp_path, monkeypatch):
    (tmp_path / "cwd").mkdir()
    (tmp_path / "other").mkdir()
    _write(tmp_path / "cwd" / "skyrl_fn_test_cwd_est.py", NATIVE)
    _write(tmp_path / "other" / "skyrl_fn_test_app_est.py", NATIVE)
    monkeypatch.chdir(tmp_path / "cwd")
    name = "skyrl_fn_test_cwd_est:my_adv"
    run = resolve_names(_config(["--algorithm.advantage-estimator", name], DEFAULT_TABLE), DEFAULT_TABLE)
    assert run.table.estimator(name).__name__ == "my_adv"
    assert "skyrl_fn_test_cwd_est" in ray.cloudpickle.list_registry_pickle_by_value()
    assert str(tmp_path / "cwd") not in sys.path, "the working directory stays off sys.path afterwards"
    # --app-dir replaces the working directory as the first place searched.
    other = "skyrl_fn_test_app_est:my_adv"
    with pytest.raises(UsageError, match=r"No module named 'skyrl_fn_test_app_est'.*searched .*cwd first"):
        resolve_names(_config(["--algorithm.advantage-estimator", other], DEFAULT_TABLE), DEFAULT_TABLE)
    run = resolve_names(
        _config(["--algorithm.advantage-estimator", other], DEFAULT_TABLE), DEFAULT_TABLE, app_dir=str(tmp_path / "other")
    )
    assert run.table.estimator(other).__name__ == "my_adv"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("x = 1\ndef f(:\n    pass\n", r"plugin_err\.py:2: SyntaxError"),
        ("import os\n\nraise RuntimeError('no GPU here')\n", r"plugin_err\.py:3: RuntimeError: no GPU here"),
        ("import skyrl_fn_absent_dependency\n", r"plugin_err\.py:1: ModuleNotFoundError"),
        ("def register(table):\n    return table.nope()\n", r"register\(table\) raised at .*plugin_err\.py:2: AttributeError"),
    ],
    ids=["syntax", "raises", "missing-dependency", "hook-raises"],
)
def test_plugin_errors_name_the_file_and_line(tmp_path, text, expected):
    with pytest.raises(PluginError, match=expected):
        build_table(plugins=[str(_write(tmp_path / "plugin_err.py", text))])


def test_check_shippable_ships_helpers_by_value_and_names_what_cannot_be_pickled(tmp_path, monkeypatch):
    # A helper module imported outside any plugin loader (e.g. by a custom entry point script).
    _write(tmp_path / "skyrl_fn_test_helper_mod.py", "def centre(s):\n    return s - s.mean()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import skyrl_fn_test_helper_mod as helper

    def uses_helper(batch):
        return helper.centre(batch)

    assert "skyrl_fn_test_helper_mod" not in ray.cloudpickle.list_registry_pickle_by_value()
    assert check_shippable({"fn": uses_helper}) > 0
    assert "skyrl_fn_test_helper_mod" in ray.cloudpickle.list_registry_pickle_by_value()

    import threading

    lock = threading.Lock()

    def locked(batch):
        with lock:
            return batch

    with pytest.raises(PluginError, match=r"^advantage_estimator 'locked' cannot be sent to Ray workers: TypeError"):
        check_shippable({"fn": locked, "ok": uses_helper}, parts={"advantage_estimator 'locked'": locked, "ok": uses_helper})
