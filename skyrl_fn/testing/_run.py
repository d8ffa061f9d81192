"""Running one property as a hypothesis search, and the kit's settings.

Each property is its own search, so hypothesis shrinks the counterexample for *that* property (a
smaller batch that breaks a different property is never substituted).
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as Settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky

from skyrl_fn.core.properties import ORDER, applicable, universal
from skyrl_fn.testing._report import PropertyViolation

__all__ = ["DEFAULT_MAX_EXAMPLES", "kit_settings", "run_property", "select", "Case"]

#: Examples per property when the hypothesis profile is hypothesis's own ``default``. Any other
#: loaded profile (``HYPOTHESIS_PROFILE=ci``, ``settings.load_profile("thorough")``) sets the count.
DEFAULT_MAX_EXAMPLES = 25


def kit_settings(settings: Settings | None = None) -> Settings:
    """The hypothesis settings one property search runs with.

    ``settings`` given: used as is, except that only the smallest failure is reported and there is
    no deadline (a slow first torch call is not a failure of the function). Otherwise the
    loaded profile's settings, with ``DEFAULT_MAX_EXAMPLES`` if that profile is hypothesis's
    ``default``, no deadline (the first call of a torch op is slow) and no example database (a
    failure is reported in full in the message, and one property's stored failures would only be
    replayed against other functions). Either way the phases are the given or loaded ones (a
    profile without ``Phase.shrink`` reports the first counterexample found, unshrunk).
    """
    # No "explain" phase: the violation message already says what went wrong, and where.
    if settings is not None:
        return Settings(settings, deadline=None, report_multiple_bugs=False, phases=[p for p in settings.phases if p != Phase.explain])
    base = Settings.default
    phases = [p for p in base.phases if p != Phase.explain]
    n = DEFAULT_MAX_EXAMPLES if Settings.get_current_profile_name() == "default" else base.max_examples
    return Settings(
        base,
        max_examples=n,
        deadline=None,
        database=None,
        report_multiple_bugs=False,
        phases=phases,
        suppress_health_check=list(base.suppress_health_check) + [HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Case:
    """One drawn example: the record plus what the property draws besides (a permutation, a group,
    constants). Its repr stays short; the violation message prints the batch."""

    def __init__(self, batch: Any, **extra: Any) -> None:
        self.batch, self.extra = batch, extra

    def __repr__(self) -> str:
        extra = ", ".join(f"{k}={v!r}" for k, v in self.extra.items())
        return f"Case(<batch printed in the PropertyViolation message>{', ' if extra else ''}{extra})"


def run_property(name: str, strategy: st.SearchStrategy, check: Callable[[Any], None], settings: Settings) -> None:
    """Search ``strategy`` for an example on which ``check`` raises; re-raise the shrunk one.

    Raises:
        PropertyViolation: the property ``name`` fails (also when it fails only sometimes).
    """

    __tracebackhide__ = True

    def search(case: Any) -> None:
        __tracebackhide__ = True
        check(case)

    search.__name__ = search.__qualname__ = f"check_{name}"
    try:
        settings(given(strategy)(search))()
    except PropertyViolation as err:
        # Hypothesis notes the failing call as the strategy would rebuild it (tensor reprs); the
        # message already prints the shrunk batch, so keep only the other notes.
        notes = [n for n in getattr(err, "__notes__", []) if not n.startswith(("Failing test case", "Falsifying example"))]
        if hasattr(err, "__notes__"):
            err.__notes__ = notes
        raise
    except Flaky as err:  # a failure that does not reproduce: not deterministic in some way
        raise PropertyViolation(name, f"failed, but not reproducibly (hypothesis: {type(err).__name__}: {err})") from err


def select(kind: str, promises: Iterable[str], properties: Iterable[str] | None) -> list[str]:
    """The properties to check, in ``ORDER``: ``properties`` if given, else universal + promised.

    Raises:
        ValueError: a selected property does not apply to ``kind`` (or is unknown).
    """
    if isinstance(properties, str):
        raise TypeError(f"properties: expected a collection of property names, got the string {properties!r}")
    chosen = set(universal(kind) | set(promises)) if properties is None else set(properties)
    bad = sorted(chosen - applicable(kind))
    if bad:
        raise ValueError(f"properties: {bad} do not apply to a {kind}; expected some of {sorted(applicable(kind))}")
    return [p for p in ORDER if p in chosen]
