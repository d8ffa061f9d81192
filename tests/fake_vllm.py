"""A fake ``vllm`` module for tests on a machine without vLLM or CUDA: ``LLM`` records its calls
and generates fixed completions, ``SamplingParams`` keeps its keyword arguments.

In this process: the ``fake_vllm`` fixture of ``tests/rollout/test_vllm_backend.py`` (monkeypatch).
In Ray worker processes: :func:`install` as the job's ``worker_process_setup_hook`` (with this
directory on ``PYTHONPATH``); with ``FAKE_VLLM_LOG`` set, every engine also appends its calls to
``$FAKE_VLLM_LOG/<pid>.jsonl`` so the test process can read what the engines in the actors saw.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import types

import msgpack


def completion(index, ids, lps, text=""):
    """One vLLM ``CompletionOutput`` (the fields ``outputs_to_batch`` reads)."""
    return types.SimpleNamespace(
        index=index, token_ids=ids, text=text,
        logprobs=[{t: types.SimpleNamespace(logprob=lp, rank=1)} for t, lp in zip(ids, lps)],
    )


def log(record: dict) -> None:
    """Append ``record`` to this process's log when ``FAKE_VLLM_LOG`` names a directory."""
    directory = os.environ.get("FAKE_VLLM_LOG")
    if directory:
        with open(os.path.join(directory, f"{os.getpid()}.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")


class FakeLLM:
    """Records calls; generates ``G`` fixed completions per prompt ending in EOS."""

    instances: list["FakeLLM"] = []

    def __init__(self, **kwargs):
        self.kwargs = kwargs
        self.calls: list[tuple] = []
        FakeLLM.instances.append(self)

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags)))

    def generate(self, prompts, params, use_tqdm=False):
        self.calls.append(("generate", len(prompts), params.kw["n"], params.kw["seed"]))
        log({"call": "generate", "prompts": len(prompts)})
        return [
            types.SimpleNamespace(outputs=[completion(g, [3 + g, 2], [-0.5, -0.25]) for g in range(params.kw["n"])])
            for _ in prompts
        ]

    def collective_rpc(self, method, args=()):
        # As vLLM's engine process receives them: msgpack-encoded (no tensors, tuples -> lists).
        args = msgpack.unpackb(msgpack.packb(list(args), use_bin_type=True), raw=False)
        if method == "skyrl_load_weights":
            size, slots, payload = args[0]
            assert len(payload) == size
            self.calls.append(("rpc", method, [slot[0] for slot in slots]))
            log({"call": "load", "names": [slot[0] for slot in slots], "sha256": hashlib.sha256(payload).hexdigest()})
            return [len(slots)]
        self.calls.append(("rpc", method, tuple(args)))
        log({"call": method, "args": args if method == "skyrl_init_broadcast" else None})
        return [1]

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))
        log({"call": "reset_prefix_cache"})


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class FakeSender:
    """Stands in for ``skyrl_fn.rollout.weight_sync.BroadcastSender`` (NCCL, CUDA) on trainer
    rank 0: plans the buckets as the real one does and logs a digest of what it would send."""

    def __init__(self, host, port, world_size, *, device="cuda:0", bucket_bytes=None):
        log({"call": "init_sender", "world": world_size})

    def plan(self, state_dict):
        from skyrl_fn.rollout.buckets import plan_buckets, specs_of

        return plan_buckets(specs_of(state_dict))

    def send(self, state_dict, plan):
        from skyrl_fn.rollout.buckets import pack_bucket

        digest = hashlib.sha256()
        for bucket in plan:
            digest.update(pack_bucket(bucket, state_dict, device="cpu").numpy().tobytes())
        log({"call": "send", "sha256": digest.hexdigest()})


def module() -> types.ModuleType:
    """The fake ``vllm`` module."""
    fake = types.ModuleType("vllm")
    fake.LLM, fake.SamplingParams = FakeLLM, FakeSamplingParams
    return fake


def install() -> None:
    """In a Ray worker process: ``import vllm`` gives the fake, the vLLM backend runs without
    CUDA and the trainer side's NCCL sender (``skyrl_fn.distributed.actors.WeightSender``, the
    single policy actor's and the data-parallel ranks') is :class:`FakeSender` (the job's
    ``worker_process_setup_hook``)."""
    import skyrl_fn.distributed.actors as actors
    import skyrl_fn.rollout.vllm_backend as vb

    sys.modules["vllm"] = module()
    vb.vllm_unavailable_reason = lambda: None
    actors.BroadcastSender = FakeSender
