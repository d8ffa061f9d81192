"""Plumbing shared by the façade: SkyRL names, keyword filtering, SkyRL-style config objects.

Nothing here holds state.
"""

from __future__ import annotations

import contextlib
import enum
import inspect
import re
from typing import Any, Callable, Iterator, Mapping, Sequence

__all__ = ["as_name", "describe", "call_accepting", "config_value", "caller_names", "LossConfig"]

_MISSING = object()


def as_name(name: Any) -> str:
    """A registry name: a non-empty string without whitespace; ``StrEnum`` members give their value.

    SkyRL-Train keys its registries by ``StrEnum`` members such as ``AdvantageEstimator.GRPO``.
    """
    if isinstance(name, enum.Enum):
        name = name.value
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(f"name: expected a non-empty string (or StrEnum) without whitespace, got {name!r}")
    return str(name)  # a str subclass (StrEnum) becomes a plain, cloudpickle-safe str


def describe(fn: Any) -> str:
    """``module.qualname`` of a function, or its type for other callables (for error messages)."""
    target = fn if inspect.isfunction(fn) or inspect.isclass(fn) else type(fn)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', repr(target))}"


def _accepted(fn: Callable) -> tuple[set[str], bool] | None:
    """(keyword-usable parameter names, takes **kwargs); None when there is no signature."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None
    names = {p.name for p in sig.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())


def call_accepting(fn: Callable, args: Sequence[Any], kwargs: Mapping[str, Any]) -> Any:
    """``fn(*args, **kw)`` where ``kw`` keeps only the keywords ``fn`` accepts (all if ``**kwargs``).

    SkyRL-style user functions differ in which keywords they take (the seed policy loss has no
    ``rollout_logprobs``); a keyword that is also filled positionally is never passed twice.
    """
    accepted = _accepted(fn)
    if accepted is None or accepted[1]:
        return fn(*args, **kwargs)
    names, _ = accepted
    try:
        positional = list(inspect.signature(fn).parameters)[: len(args)]
    except (TypeError, ValueError):
        positional = []
    return fn(*args, **{k: v for k, v in kwargs.items() if k in names and k not in positional})


def config_value(config: Any, path: Sequence[str]) -> Any:
    """The field at ``path`` of a SkyRL-style config, or ``None`` when absent.

    ``config`` may be any object with attributes (dataclass, OmegaConf ``DictConfig``,
    ``SimpleNamespace``), a mapping, or None; nested groups (``config.sapo.tau_pos``) are walked
    with the same rules. A field holding ``None`` counts as absent, so the native default applies.
    """
    node = config
    for part in path:
        if node is None:
            return None
        if isinstance(node, Mapping):
            node = node.get(part, None)
        else:
            try:
                node = getattr(node, part, None)
            except Exception:  # e.g. a strict config raising on unknown keys
                return None
    return node


class LossConfig(Mapping[str, Any]):
    """A read-only SkyRL-style config: attribute and mapping access, nested groups as LossConfig.

    ``LossConfig(eps_clip_low=0.2, sapo={"tau_pos": 1.0})`` gives ``cfg.eps_clip_low`` and
    ``cfg.sapo.tau_pos``. Reading a missing field raises AttributeError naming it.
    """

    __slots__ = ("_fields",)

    def __init__(self, fields: Mapping[str, Any] | None = None, /, **more: Any) -> None:
        data = dict(fields or {}, **more)
        for key, value in data.items():
            if isinstance(value, Mapping) and not isinstance(value, LossConfig):
                data[key] = LossConfig(value)
        object.__setattr__(self, "_fields", data)

    def __getattr__(self, key: str) -> Any:
        if key.startswith("__"):
            raise AttributeError(key)
        try:
            return self._fields[key]
        except KeyError:
            raise AttributeError(
                f"config has no field {key!r} (fields: {sorted(self._fields)}); pass it as a "
                f"hyperparameter or a config= hyperparameter"
            ) from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError("LossConfig is read-only")

    def __getitem__(self, key: str) -> Any:
        return self._fields[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def __reduce__(self):
        return (LossConfig, (self._fields,))

    def __repr__(self) -> str:
        return f"LossConfig({self._fields!r})"


@contextlib.contextmanager
def caller_names(names: Mapping[str, str]) -> Iterator[None]:
    """Re-raise a ValueError/TypeError from native code with the caller's argument names.

    Native records name their fields (``group_ids``, ``ref_log_probs``); a SkyRL caller passed
    ``index`` / ``log_probs_base``. ``names`` maps native -> caller name; whole words are replaced in
    the message and the exception keeps its type (and ``UnknownNameError`` stays one).
    """
    try:
        yield
    except (ValueError, TypeError) as err:
        msg = str(err.args[0]) if err.args else str(err)
        new = msg
        for native, caller in names.items():
            new = re.sub(rf"\b{re.escape(native)}\b", caller, new)
        if new == msg:
            raise
        try:
            clone = type(err)(new)
        except Exception:
            raise err from None
        raise clone.with_traceback(err.__traceback__) from None
