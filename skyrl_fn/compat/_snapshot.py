"""How the façade's registrations reach every Ray task and actor: one published, immutable snapshot.

SkyRL-Train keeps each registry in a named Ray actor holding a mutable dict that every process
writes to and reads from. Here only the driver publishes, and what it publishes is a value: a
``RegistrySnapshot`` -- the frozen ``AlgorithmTable`` of ``freeze()`` and the names
``list_available()`` lists -- pickled with cloudpickle and numbered. A worker never writes it. On
a lookup its own process cannot answer (a name it has not registered itself), a worker asks for
the latest snapshot, unpickles it only when the number has changed, and answers from it.

Who publishes: the Ray driver (``ray.get_runtime_context().worker.mode == ray.SCRIPT_MODE``),
whenever its registrations change while Ray is initialised, on ``sync_registries()``, and, for
registrations made before ``ray.init()``, at the driver's next registry lookup. Registrations
made inside a worker stay in that worker (they shadow the snapshot there and are never shipped).

Where the snapshot lives: a small named actor of the job, created on the first publish. Ray 2.60
offers two places that every process of a job can reach by name:

- the GCS key-value store, ``ray.experimental.internal_kv._internal_kv_put`` / ``_get``: no
  process to start, but private (underscored, in ``ray.experimental``, not ``PublicAPI``), and
  its keys outlive the job on a long-running cluster unless someone deletes them;
- a named actor (``ActorClass.options(name=..., get_if_exists=True)``, ``ray.get_actor``): public
  and stable API; a non-detached actor belongs to the driver's job and namespace, so it dies with
  the driver and two jobs on one cluster never see each other's registrations.

The actor is chosen for the public API and the job-scoped lifetime. It is kept small: it holds
only ``(version, bytes)`` and never unpickles them, its class is shipped by value so its process
imports neither torch nor skyrl_fn (starting it costs ~0.3 s once per job), and it asks for no CPU
(``num_cpus=0``), so a saturated cluster cannot keep it from being scheduled. A lookup from a
worker costs one actor call (~1-2 ms); the snapshot's bytes travel only when they changed.

Nothing here imports Ray: Ray is initialised in a process only if the process imported it, so
``sys.modules`` tells (and the façade keeps working where Ray is absent).
"""

from __future__ import annotations

import sys
import threading
from typing import Any, Literal, Mapping

import attrs
import cloudpickle

from skyrl_fn.core._frozen import FrozenDict
from skyrl_fn.core.table import AlgorithmTable

__all__ = ["ACTOR_NAME", "RegistrySnapshot", "ray_role", "publish", "latest", "published_in_this_session"]

#: Name of the job's snapshot holder (in the job's Ray namespace).
ACTOR_NAME = "skyrl_fn.compat.registry_snapshot"


@attrs.frozen(kw_only=True, eq=False)
class RegistrySnapshot:
    """What the driver publishes.

    Attributes:
        table: ``freeze()`` on the driver: the built-ins plus every façade registration.
        names: kind -> the driver's ``list_available()`` for that kind (its order kept).
    """

    table: AlgorithmTable
    names: Mapping[str, tuple[str, ...]] = attrs.field(converter=FrozenDict)


def _ray() -> Any:
    """The ``ray`` module when Ray is initialised in this process, else None."""
    ray = sys.modules.get("ray")
    if ray is None or not getattr(ray, "is_initialized", lambda: False)():
        return None
    return ray


def ray_role() -> Literal["none", "driver", "worker"]:
    """``"none"`` without an initialised Ray, ``"worker"`` inside a Ray task or actor, else ``"driver"``."""
    ray = _ray()
    if ray is None:
        return "none"
    return "worker" if ray.get_runtime_context().worker.mode == ray.WORKER_MODE else "driver"


def _session(ray: Any) -> str:
    return ray.get_runtime_context().get_session_name()


def _holder_class() -> type:
    # Defined in a function so cloudpickle ships the class by value: the holder's process then
    # never imports skyrl_fn (nor torch) to rebuild it.
    class SnapshotHolder:
        """The latest published snapshot: a version number and opaque bytes."""

        def __init__(self) -> None:
            self.version, self.payload = 0, b""

        def publish(self, payload: bytes) -> int:
            self.version, self.payload = self.version + 1, payload
            return self.version

        def latest(self, known: int) -> tuple[int, bytes | None]:
            """``(version, payload)``; the payload is None when ``known`` is already the latest."""
            return self.version, (None if known == self.version else self.payload)

    return SnapshotHolder


_lock = threading.Lock()
_published: dict[str, Any] = {
    "session": None, "generation": None, "actor_class": None, "handle": None, "handle_session": None
}
_seen: dict[str, Any] = {"session": None, "handle": None, "version": 0, "snapshot": None}


def published_in_this_session(generation: int) -> bool:
    """Whether the driver already published the registrations numbered ``generation`` in this Ray session."""
    ray = _ray()
    return ray is not None and (_published["session"], _published["generation"]) == (_session(ray), generation)


def publish(snapshot: RegistrySnapshot, generation: int) -> int:
    """Publish ``snapshot`` (the driver's registrations numbered ``generation``) to the job's workers.

    Creates the holder actor on the first call of a Ray session. Returns the published version.

    Raises:
        RuntimeError: Ray is not initialised, or this process is a Ray worker (workers never publish).
        TypeError: the snapshot does not pickle with cloudpickle.
    """
    ray = _ray()
    if ray is None or ray_role() != "driver":
        raise RuntimeError(f"publishing the façade's registrations: expected a Ray driver, got {ray_role()!r}")
    payload = cloudpickle.dumps(snapshot)
    session = _session(ray)
    with _lock:
        if _published["actor_class"] is None:  # one class per process: Ray exports it once
            _published["actor_class"] = ray.remote(num_cpus=0, max_restarts=0)(_holder_class())
        if _published["handle_session"] != session:
            # The driver keeps the handle: a non-detached actor dies when its last handle does.
            handle = _published["actor_class"].options(name=ACTOR_NAME, get_if_exists=True).remote()
            _published.update(handle=handle, handle_session=session)
        version = ray.get(_published["handle"].publish.remote(payload))
        _published.update(session=session, generation=generation)
    return version


def latest() -> RegistrySnapshot | None:
    """The latest snapshot the driver published, or None (no Ray, or nothing published yet).

    One call to the holder actor; its bytes are unpickled only when the version changed.
    """
    ray = _ray()
    if ray is None:
        return None
    session = _session(ray)
    with _lock:
        if _seen["session"] != session:
            _seen.update(session=session, handle=None, version=0, snapshot=None)
        for attempt in range(2):
            if _seen["handle"] is None:
                try:
                    _seen["handle"] = ray.get_actor(ACTOR_NAME)
                except ValueError:  # nothing published in this job yet
                    return None
            try:
                version, payload = ray.get(_seen["handle"].latest.remote(_seen["version"]))
                break
            except ray.exceptions.RayActorError:
                _seen["handle"] = None  # the holder died (its job's driver is gone): look again
                if attempt:
                    return None
        if payload is not None:
            try:
                snapshot = cloudpickle.loads(payload)
            except Exception as err:
                raise RuntimeError(
                    f"the driver's published registrations (version {version}): expected them to "
                    f"unpickle in this Ray worker, got {type(err).__name__}: {err}. A function from a "
                    f"module the workers cannot import must be shipped by value "
                    f"(cloudpickle.register_pickle_by_value(module)) before it is registered"
                ) from err
            _seen.update(version=version, snapshot=snapshot)
        return _seen["snapshot"]
