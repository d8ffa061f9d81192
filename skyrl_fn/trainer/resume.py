"""Can a run resume from a checkpoint written under another config? A pure comparison of two
config dicts (``config_to_dict`` output, or a checkpoint manifest's ``config``).

Every field that differs is one :class:`Change`, sorted into:

* **incompatible** — the checkpoint's weights cannot be loaded, or would mean something else:
  the model (``model.name_or_path``) and its shape (``hidden_size``, ``num_layers``,
  ``num_heads``, ``intermediate_size``), the embedded tokenizer's vocabulary (``data.task``
  with the embedded model: the alphabet is the task's), and a model the run needs that the
  checkpoint does not hold (e.g. switching to GAE needs critic weights). Resume is refused,
  naming each field.
* **compatible** — anything else that changes the training (learning rate, estimator, loss,
  batch sizes, seed, data path, layout of Ray workers, ...). Resume goes on; each change is
  listed in a warning and in the metrics log.
* bookkeeping that cannot change the result (``trainer.steps``, ``trainer.resume``, checkpoint
  cadence and directory, ``logging.*``, where Ray runs) is not reported.

No layout of workers makes a checkpoint unusable: whole state dicts load anywhere, and the shards
of data-parallel ranks load at any number of ranks (``skyrl_fn.trainer.shards``: DCP reshards).
"""

from __future__ import annotations

import json
from typing import Any, Collection, Mapping

import attrs

__all__ = ["Change", "ConfigDiff", "IncompatibleResumeError", "compare_configs", "check_resume", "INCOMPATIBLE", "IGNORED"]

#: Field -> why a change to it makes the checkpoint unusable.
INCOMPATIBLE: Mapping[str, str] = {
    "model.name_or_path": "a different model",
    "model.hidden_size": "changes the weights' shapes",
    "model.num_layers": "changes the number of layers",
    "model.num_heads": "changes the attention layout",
    "model.intermediate_size": "changes the weights' shapes",
}
#: Fields (or whole groups, ending in ``.``) whose changes are not reported.
IGNORED: tuple[str, ...] = (
    "trainer.steps", "trainer.resume", "trainer.ckpt_dir", "trainer.ckpt_interval", "trainer.keep_checkpoints",
    "trainer.torch_threads", "trainer.max_consecutive_skips", "logging.", "ray.use_ray", "ray.address", "ray.num_cpus",
)
_ABSENT = "<absent>"


class IncompatibleResumeError(ValueError):
    """``trainer.resume`` with a config the checkpoint cannot serve; names each field."""


@attrs.frozen(kw_only=True)
class Change:
    """One differing field.

    Attributes:
        field: dotted name as on the command line (``model.hidden_size``).
        saved: its value in the checkpoint's config (``"<absent>"`` if it had none).
        current: its value now (``"<absent>"`` if the current config has none).
        reason: why it blocks resuming (empty for a compatible change).
    """

    field: str
    saved: Any
    current: Any
    reason: str = ""

    def line(self) -> str:
        """``field: saved -> current`` (plus the reason when incompatible)."""
        why = f" ({self.reason})" if self.reason else ""
        return f"{self.field}: {self.saved!r} -> {self.current!r}{why}"


@attrs.frozen(kw_only=True)
class ConfigDiff:
    """The differences between a checkpoint's config and the current one.

    Attributes:
        incompatible: changes that make the checkpoint unusable.
        compatible: changes resume tolerates (reported).
    """

    incompatible: tuple[Change, ...] = ()
    compatible: tuple[Change, ...] = ()

    def warning(self) -> str | None:
        """One line listing the compatible changes, or None when there are none."""
        if not self.compatible:
            return None
        return "resuming with a changed config: " + "; ".join(c.line() for c in self.compatible)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping) and v and not k.endswith("_kwargs"):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _plain(x: Any) -> Any:
    return json.loads(json.dumps(x, sort_keys=True, default=str))


def compare_configs(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    saved_models: Collection[str] | None = None,
    needed_models: Collection[str] = (),
) -> ConfigDiff:
    """Sort every field that differs between ``saved`` and ``current`` (see the module docstring).

    Args:
        saved: the checkpoint's config as a nested dict.
        current: the current config as a nested dict.
        saved_models: model names the checkpoint holds weights for (``state.json``'s
            ``models``); None skips that check.
        needed_models: model names the current run loads from the checkpoint (``policy``,
            ``critic`` with GAE).

    Returns:
        a :class:`ConfigDiff` (both tuples sorted by field name).
    """
    a, b = _flatten(_plain(dict(saved))), _flatten(_plain(dict(current)))
    incompatible, compatible = [], []
    for field in sorted(set(a) | set(b)):
        old, new = a.get(field, _ABSENT), b.get(field, _ABSENT)
        if old == new or any(field == i or (i.endswith(".") and field.startswith(i)) for i in IGNORED):
            continue
        reason = INCOMPATIBLE.get(field, "")
        if field == "data.task" and a.get("model.name_or_path") is None and b.get("model.name_or_path") is None:
            reason = "the embedded model's tokenizer and vocabulary come from the task's alphabet"
        (incompatible if reason else compatible).append(Change(field=field, saved=old, current=new, reason=reason))
    if saved_models is not None:
        for name in sorted(set(needed_models) - set(saved_models)):
            incompatible.append(Change(
                field=f"models.{name}", saved=_ABSENT, current="needed",
                reason=f"this run needs {name} weights the checkpoint does not hold (it has {sorted(saved_models)})",
            ))
    return ConfigDiff(incompatible=tuple(incompatible), compatible=tuple(compatible))


def check_resume(
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    *,
    where: str,
    saved_models: Collection[str] | None = None,
    needed_models: Collection[str] = (),
) -> ConfigDiff:
    """:func:`compare_configs`, raising when anything is incompatible.

    Args:
        where: the checkpoint's path (named in the error).

    Raises:
        IncompatibleResumeError: ``trainer.resume: cannot resume from <where>: <field: saved ->
            current (why)>; ...``, each incompatible field listed.
    """
    diff = compare_configs(saved, current, saved_models=saved_models, needed_models=needed_models)
    if diff.incompatible:
        raise IncompatibleResumeError(
            f"trainer.resume: cannot resume from {where}: " + "; ".join(c.line() for c in diff.incompatible)
            + " (start a fresh run in another --logging.run-dir, or restore these values)"
        )
    return diff
