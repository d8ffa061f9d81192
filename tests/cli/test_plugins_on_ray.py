"""Every way of bringing a custom algorithm, end to end on Ray as users run it.

Routes: ``--plugin file.py``, ``--plugin module``, ``file.py:function``, ``module:function``
(found in the working directory, as ``uvicorn module:app``), the ``skyrl_fn.algorithms``
entry-point group, and a custom entry point that registers and calls ``main()``. Each trains two
steps on Ray in the default (hybrid) layout and with one separate rollout worker, once with a
SkyRL-style estimator and policy loss (the seed's decorated function or its class-based
``AdvantageEstimator``) and once with a native estimator.

Every plugin module deletes its own file as soon as it is imported: the workers cannot read it,
as on the other nodes of a cluster, so the functions must travel by value. Each custom function
appends its process id to a marker file, which proves it ran in a Ray worker, not in the driver.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from skyrl_fn.cli import main

pytestmark = pytest.mark.ray

TINY = [
    "--model.hidden-size", "32", "--model.num-layers", "1", "--model.intermediate-size", "64",
    "--trainer.prompts-per-step", "2", "--rollout.samples-per-prompt", "4", "--rollout.max-new-tokens", "4",
    "--data.min-digits", "1", "--data.max-digits", "2", "--trainer.steps", "2",
    "--logging.no-progress", "--logging.no-tensorboard", "--logging.no-plot",
]
LAYOUTS = {"hybrid": [], "rollout-worker": ["--ray.rollout-workers", "1"]}

HEADER = '''
import os
import torch
from skyrl_fn import AdvantageInput, AdvantageOutput
from skyrl_fn.compat.advantage_estimators import AdvantageEstimator
from skyrl_fn.compat.skyrl_train import register_advantage_estimator, register_policy_loss

def _mark(what):
    import ray
    with open({marker!r}, "a") as f:
        f.write(f"{{what}} {{os.getpid()}} {{ray.get_runtime_context().get_node_id()}}\\n")
'''

#: The seed's decorated estimator, a seed-era policy loss (returns ``(loss, clip_ratio)``).
SKYRL_DECORATED = '''
@register_advantage_estimator("{name}_skyrl")
def skyrl_est(token_level_rewards, response_mask, index, **kwargs):
    _mark("estimator")
    s = (token_level_rewards * response_mask).sum(-1, keepdim=True)
    adv = (s - s.mean()) * response_mask
    return adv, adv.clone()

@register_policy_loss("{name}_loss")
def reinforce_loss(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_log_probs=None):
    _mark("loss")
    loss = -(log_probs * advantages * loss_mask).sum() / loss_mask.sum().clamp(min=1)
    return loss, 0.0
'''

#: The seed's class-based estimator (reward-to-go, normalised).
SKYRL_CLASS = '''
class RewardToGo(AdvantageEstimator):
    def compute_advantages(self, rewards, values, masks, **kwargs):
        _mark("estimator")
        adv = torch.zeros_like(rewards)
        running = torch.zeros(rewards.shape[0])
        for t in reversed(range(rewards.shape[1])):
            running = rewards[:, t] + 0.99 * running * masks[:, t]
            adv[:, t] = running
        return (adv - adv.mean()) / (adv.std() + 1e-8)

register_advantage_estimator("{name}_skyrl", RewardToGo)
'''

NATIVE = '''
@torch.no_grad()
def native_est(batch: AdvantageInput, *, scale: float = 1.0) -> AdvantageOutput:
    """Outcome score minus the batch mean. [B, T] -> [B, T]."""
    _mark("estimator")
    m = batch.response_mask
    s = torch.where(m, batch.token_level_rewards, 0).sum(-1)
    a = torch.where(m, scale * (s - s.mean())[:, None], 0)
    return AdvantageOutput(advantages=a, returns=a)
'''

#: Plain SkyRL-style functions, not registered anywhere (reached as ``file.py:function``).
SKYRL_PLAIN = '''
def skyrl_est(token_level_rewards, response_mask, index, **kwargs):
    _mark("estimator")
    s = (token_level_rewards * response_mask).sum(-1, keepdim=True)
    adv = (s - s.mean()) * response_mask
    return adv, adv.clone()

def reinforce_loss(log_probs, old_log_probs, advantages, config, loss_mask=None, rollout_log_probs=None):
    _mark("loss")
    return -(log_probs * advantages * loss_mask).sum() / loss_mask.sum().clamp(min=1), 0.0
'''

REGISTER_NATIVE = '''
def register(table):
    return table.register("{name}_native", native_est)
'''

SELF_DELETE = "\nos.remove(__file__)  # like a file that exists on the driver's node only\n"


def _module(path, marker, name, *parts):
    text = HEADER.format(marker=str(marker)) + "".join(p.format(name=name) for p in parts) + SELF_DELETE
    path.write_text(textwrap.dedent(text))
    return path


def _fake_distribution(root, module, marker, name):
    """A pip-installed distribution (found on sys.path) declaring a ``skyrl_fn.algorithms`` entry point."""
    _module(root / f"{module}.py", marker, name, NATIVE, REGISTER_NATIVE)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module.replace('_', '-')}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[skyrl_fn.algorithms]\n{module} = {module}:register\n")


def _route(route, tmp_path, marker, name, style, monkeypatch):
    """(extra argv, estimator name, policy loss name or None) for ``route`` and ``style``."""
    skyrl = style == "skyrl"
    if route == "plugin-file":
        _module(tmp_path / "my_est.py", marker, name, NATIVE, REGISTER_NATIVE, SKYRL_DECORATED)
        return ["--plugin", str(tmp_path / "my_est.py")], f"{name}_{style}", f"{name}_loss" if skyrl else None
    if route == "plugin-module":
        monkeypatch.chdir(tmp_path)  # found in the working directory, not on sys.path
        _module(tmp_path / f"{name}_mod.py", marker, name, NATIVE, REGISTER_NATIVE, SKYRL_CLASS)
        return ["--plugin", f"{name}_mod"], f"{name}_{style}", None
    if route == "file-colon":
        path = _module(tmp_path / "my_fns.py", marker, name, NATIVE, SKYRL_PLAIN)
        fn = "skyrl_est" if skyrl else "native_est"
        return [], f"{path}:{fn}", f"{path}:reinforce_loss" if skyrl else None
    if route == "module-colon":
        monkeypatch.chdir(tmp_path)
        _module(tmp_path / f"{name}_fns.py", marker, name, NATIVE, SKYRL_PLAIN)
        fn = "skyrl_est" if skyrl else "native_est"
        return [], f"{name}_fns:{fn}", f"{name}_fns:reinforce_loss" if skyrl else None
    if route == "entry-point":
        dist = tmp_path / "site"
        dist.mkdir()
        _fake_distribution(dist, f"{name}_dist", marker, name)
        monkeypatch.syspath_prepend(str(dist))
        return [], f"{name}_native", None
    raise AssertionError(route)


def compat_clean(name):
    from skyrl_fn import compat

    for registry, suffix in ((compat.AdvantageEstimatorRegistry, "_skyrl"), (compat.PolicyLossRegistry, "_loss")):
        if f"{name}{suffix}" in registry.list_available():
            registry.unregister(f"{name}{suffix}")


def _check_ran_in_workers(marker, *, loss: bool):
    rows = [line.split() for line in marker.read_text().splitlines()]
    roles = {role for role, _, _ in rows}
    pids = {int(pid) for _, pid, _ in rows}
    assert "estimator" in roles and (not loss or "loss" in roles), roles
    assert os.getpid() not in pids, "a custom function ran in the driver, not in a Ray worker"


ROUTES = [
    ("plugin-file", "skyrl"), ("plugin-file", "native"),
    ("plugin-module", "skyrl"), ("plugin-module", "native"),
    ("file-colon", "skyrl"), ("file-colon", "native"),
    ("module-colon", "skyrl"), ("module-colon", "native"),
    ("entry-point", "native"),
]


def _cases():
    """Every (route, style) in both layouts, all in ``make test-all``. ``make test`` runs a
    SkyRL-style plugin file in the hybrid layout in the same Ray run as the plugin task, reward
    and backend (``tests/cli/test_run_plugins_on_ray.py``; the fast suite's CPU budget)."""
    for route, style in ROUTES:
        for layout in sorted(LAYOUTS):
            yield pytest.param(route, style, layout, marks=pytest.mark.slow, id=f"{route}-{style}-{layout}")


@pytest.mark.parametrize(("route", "style", "layout"), list(_cases()))
def test_route_trains_on_ray(ray_session, tmp_path, monkeypatch, route, style, layout):
    name = f"r_{route.replace('-', '_')}_{style}_{layout.replace('-', '_')}"
    marker = tmp_path / "calls.txt"
    extra, estimator, loss = _route(route, tmp_path, marker, name, style, monkeypatch)
    argv = [*extra, *TINY, *LAYOUTS[layout], "--algorithm.advantage-estimator", estimator,
            "--logging.run-dir", str(tmp_path / "run")]
    if loss:
        argv += ["--algorithm.policy-loss", loss]
    try:
        summary = main(argv)
    finally:
        compat_clean(name)
    assert summary.steps == 2 and len(summary.history) == 2
    assert all(row["response_tokens"] > 0 for row in summary.history)
    _check_ran_in_workers(marker, loss=bool(loss))


# -- a custom entry point: a script that registers, then calls main() ------------------------------

ENTRY_SCRIPT = '''
import os
from skyrl_fn.cli import main
import my_algos  # a helper module beside the script: registers on import, then deletes its file

if __name__ == "__main__":
    with open("driver.pid", "w") as f:
        f.write(str(os.getpid()))
    main()
'''


@pytest.mark.slow
@pytest.mark.parametrize("layout", [pytest.param("hybrid", marks=pytest.mark.slow), "rollout-worker"])
def test_custom_entry_point_calling_main_trains_on_ray(tmp_path, layout):
    marker = tmp_path / "calls.txt"
    _module(tmp_path / "my_algos.py", marker, "entry", NATIVE, SKYRL_DECORATED)
    script = tmp_path / "main_custom.py"
    script.write_text(ENTRY_SCRIPT)
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    proc = subprocess.run(
        [sys.executable, str(script), *TINY, *LAYOUTS[layout], "--algorithm.advantage-estimator", "entry_skyrl",
         "--algorithm.policy-loss", "entry_loss", "--logging.run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["backend"] == "ray"
    rows = [line.split() for line in marker.read_text().splitlines()]
    assert {"estimator", "loss"} <= {role for role, _, _ in rows}
    assert int((tmp_path / "driver.pid").read_text()) not in {int(pid) for _, pid, _ in rows}


# -- a cluster joined with --ray.address: the actors run on another node -----------------------------

CLUSTER_SCRIPT = '''
import os, sys, tempfile
from ray.cluster_utils import Cluster
from skyrl_fn.cli import main

# The head node has no CPUs, so every actor lands on the second node.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
cluster.add_node(num_cpus=2)
with open("head_node", "w") as f:
    f.write(cluster.head_node.node_id)
try:
    main(["--ray.address", cluster.address, *sys.argv[1:]])
finally:
    cluster.shutdown()
'''


@pytest.mark.slow
def test_plugin_reaches_actors_on_another_node_of_a_cluster(tmp_path):
    marker = tmp_path / "calls.txt"
    plugin = _module(tmp_path / "my_est.py", marker, "cluster", NATIVE, REGISTER_NATIVE, SKYRL_DECORATED)
    script = tmp_path / "cluster_main.py"
    script.write_text(CLUSTER_SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), "--plugin", str(plugin), *TINY, "--algorithm.advantage-estimator", "cluster_skyrl",
         "--algorithm.policy-loss", "cluster_loss", "--logging.run-dir", str(tmp_path / "run")],
        capture_output=True, text=True, timeout=300, env=dict(os.environ, RAY_AUTH_MODE="disabled"), cwd=str(tmp_path),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["steps"] == 2
    rows = [line.split() for line in marker.read_text().splitlines()]
    assert {"estimator", "loss"} <= {role for role, _, _ in rows}
    assert (tmp_path / "head_node").read_text() not in {node for _, _, node in rows}, "ran on the driver's node"
