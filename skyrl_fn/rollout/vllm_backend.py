"""The ``vllm`` rollout backend: vLLM's offline engine (``vllm.LLM``) behind ``RolloutBackend``.

Notation: ``P`` prompts, ``G`` samples per prompt, ``B = P * G``, ``Lp`` prompt tokens
(left-padded), ``T`` response tokens (right-padded), ``V`` vocabulary.

The engine lives in whatever process builds the backend; on Ray that is the ``RolloutWorker``
actor (see ``skyrl_fn.distributed.placement`` for its GPUs). It returns the same ``RolloutBatch`` as the
``hf`` backend, checked by ``tests/rollout/test_backend_contract.py``:

* prompts are tokenised by our tokenizer (``add_special_tokens=False``) and passed to vLLM as
  token ids, so ``prompt_ids`` are byte-identical to the ``hf`` backend's;
* ``SamplingParams(n=G, temperature, top_p, max_tokens, seed, logprobs=0)``: ``logprobs=0``
  returns the log-prob of the sampled token only; vLLM seeds the ``G`` children of a request with
  ``seed + g``, so a batch is a pure function of (weights, prompts, seed);
* ``logprobs_mode="processed_logprobs"``: log-probs after temperature and top-p, i.e. of the
  distribution the token was sampled from (``log softmax(z / tau)[y]`` renormalised over the
  nucleus when ``top_p < 1``). The ``hf`` backend and the learner use the same definition
  (``skyrl_fn.rollout.sampling``), so rollout and learner log-probs agree for every
  ``(temperature, top_p)``; vLLM's ``raw_logprobs`` would ignore the temperature.
* temperatures outside ``[0.01, 2]`` are rejected at config time (``SamplingParams`` rejects
  > 2 and silently raises < 0.01 to 0.01, which the learner would not know).
* EOS stays in ``token_ids`` (vLLM stops after emitting it), so ``response_mask`` is 1 on the
  generated tokens including EOS, as in the ``hf`` backend.

Sleep/wake (colocated engines): the engine sleeps right after start-up and after each rollout
(level 1: KV cache freed, weights offloaded to CPU RAM) so the trainer can use the GPU
(``skyrl_fn.ops.memory``); ``sync_weights`` wakes only the weights, loads the new ones (sent as
bytes, see ``skyrl_fn.rollout.weight_sync``), and the next ``generate`` wakes the KV cache.

vLLM is imported only inside functions: this module imports on a CPU-only machine.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from typing import Any, Mapping, Sequence

import torch

from skyrl_fn.rollout.buckets import DEFAULT_BUCKET_BYTES, bucket_to_wire, plan_buckets, plan_to_wire, specs_of, ties_embeddings, to_hf_names
from skyrl_fn.rollout.weight_sync import EXTENSION_CLS
from skyrl_fn.rollout.base import VLLM_TEMPERATURE_RANGE, BackendUnavailableError, RolloutBatch, RolloutConfig

__all__ = [
    "VLLM_EXTRA_HINT",
    "vllm_unavailable_reason",
    "sampling_params_kwargs",
    "engine_kwargs",
    "outputs_to_batch",
    "VLLMBackend",
    "make_vllm_backend",
    "vllm_backend",
    "check_vllm_available",
]

#: How to get a working vLLM, for error messages and the README.
VLLM_EXTRA_HINT = (
    "install the extra on a Linux machine with an NVIDIA GPU: pip install -e '.[vllm]' "
    "(vLLM >= 0.11, < 0.34; vLLM 0.33 brings torch==2.14.0 built for CUDA and needs Python >= 3.11, "
    "an NVIDIA GPU of compute capability >= 7.0 and an NVIDIA driver recent enough for that CUDA build); "
    "on CPU use --rollout.backend hf"
)


def vllm_unavailable_reason() -> str | None:
    """Why the vLLM backend cannot run here, with the fix; None when it can (vLLM not imported)."""
    missing = []
    if importlib.util.find_spec("vllm") is None:
        missing.append("the vllm package is not installed")
    if not torch.cuda.is_available():
        missing.append(f"no CUDA GPU is visible (torch {torch.__version__}, torch.cuda.is_available() is False)")
    if not missing:
        return None
    return "rollout.backend='vllm' cannot run here: " + "; ".join(missing) + ". To use it, " + VLLM_EXTRA_HINT


def _check_rollout(cfg: RolloutConfig) -> None:
    if not isinstance(cfg, RolloutConfig):
        raise TypeError(f"cfg: expected a RolloutConfig, got {type(cfg).__name__}")
    if cfg.samples_per_prompt < 1 or cfg.max_new_tokens < 1:
        raise ValueError(
            f"rollout.samples_per_prompt/max_new_tokens: expected >= 1, got {cfg.samples_per_prompt}, {cfg.max_new_tokens}"
        )
    lo, hi = VLLM_TEMPERATURE_RANGE
    if not lo <= cfg.temperature <= hi:
        raise ValueError(
            f"rollout.temperature: expected in [{lo}, {hi}] for the vLLM backend (SamplingParams rejects > {hi} and "
            f"raises < {lo} to {lo}; 0 would be greedy), got {cfg.temperature}"
        )
    if not 0 < cfg.top_p <= 1:
        raise ValueError(f"rollout.top_p: expected in (0, 1], got {cfg.top_p}")


def sampling_params_kwargs(cfg: RolloutConfig, *, seed: int, eos_token_id: int | None = None) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for one rollout (pure; no vLLM import).

    ``n = G``, ``temperature``, ``top_p``, ``max_tokens = max_new_tokens``, ``seed`` (reduced to
    63 bits), ``logprobs = 0`` (the sampled token's log-prob only), ``detokenize`` on (texts are
    decoded by our tokenizer anyway, but vLLM needs it for stop strings), and ``stop_token_ids``
    holding our EOS when the model's generation config names another one.
    """
    _check_rollout(cfg)
    out: dict[str, Any] = {
        "n": cfg.samples_per_prompt,
        "temperature": float(cfg.temperature),
        "top_p": float(cfg.top_p),
        "max_tokens": cfg.max_new_tokens,
        "seed": int(seed) % (2**63 - 1),
        "logprobs": 0,
        "ignore_eos": False,
        "skip_special_tokens": True,
    }
    if eos_token_id is not None:
        out["stop_token_ids"] = [int(eos_token_id)]
    return out


def engine_kwargs(
    cfg: RolloutConfig, model_path: str, *, dtype: str = "bfloat16", seed: int = 0, colocated: bool = True,
    max_model_len: int | None = None,
) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` (pure; no vLLM import).

    Args:
        cfg: ``tensor_parallel_size`` and ``gpu_memory_utilization`` come from here.
        model_path: local HF model directory (weights + tokenizer).
        dtype: ``bfloat16``/``float32``/``float16`` (vLLM names).
        seed: engine seed (per-request seeds make rollouts reproducible regardless).
        colocated: enable sleep mode (the engine frees the GPU while the trainer runs).
        max_model_len: longest prompt + response; None uses the model's.
    """
    _check_rollout(cfg)
    if not 0 < cfg.gpu_memory_utilization <= 1:
        raise ValueError(f"rollout.gpu_memory_utilization: expected in (0, 1], got {cfg.gpu_memory_utilization}")
    if cfg.tensor_parallel_size < 1:
        raise ValueError(f"rollout.tensor_parallel_size: expected >= 1, got {cfg.tensor_parallel_size}")

    out: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": dtype,
        "seed": int(seed),
        "tensor_parallel_size": cfg.tensor_parallel_size,
        "gpu_memory_utilization": float(cfg.gpu_memory_utilization),
        "enable_sleep_mode": bool(colocated),
        "logprobs_mode": "processed_logprobs",
        "worker_extension_cls": EXTENSION_CLS,
        # Prefix caching would reuse KV computed under the previous weights after a sync (we
        # reset it too); off keeps rollouts a function of the current weights only.
        "enable_prefix_caching": False,
        "skip_tokenizer_init": False,
    }
    if cfg.tensor_parallel_size > 1:
        out["distributed_executor_backend"] = "ray"
    if max_model_len is not None:
        out["max_model_len"] = int(max_model_len)
    return out


def _sampled_logprob(entry: Any, token: int) -> float:
    """The log-prob of ``token`` from one position of vLLM's ``CompletionOutput.logprobs``."""
    value = entry[token]
    return float(getattr(value, "logprob", value))


def outputs_to_batch(
    prompts: Sequence[str], prompt_token_ids: Sequence[Sequence[int]], outputs: Sequence[Any], *,
    samples_per_prompt: int, pad_token_id: int, decode=None,
):
    """A ``RolloutBatch`` from vLLM's ``RequestOutput`` list (duck-typed; pure, runs on CPU).

    Each request output has ``.outputs``: ``G`` completions with ``.token_ids`` (generated ids,
    EOS included when it stopped there), ``.logprobs`` (one mapping per token, token id ->
    ``Logprob``/float) and ``.text``.

    Args:
        prompts: the ``P`` prompt texts.
        prompt_token_ids: ``P`` lists of prompt ids (what vLLM was given).
        outputs: ``P`` request outputs in prompt order.
        samples_per_prompt: ``G``; every request must hold exactly ``G`` completions.
        pad_token_id: fills left prompt padding and right response padding.
        decode: ``ids -> text`` for the response texts (default: vLLM's ``.text``).

    Returns:
        ``RolloutBatch`` with ``B = P * G`` rows, prompt-major, ``T`` = the longest response.

    Raises:
        ValueError: counts disagree, a completion is empty, or a log-prob is missing.
    """

    p, g = len(prompts), int(samples_per_prompt)
    if len(prompt_token_ids) != p or len(outputs) != p:
        raise ValueError(f"outputs: expected {p} prompt id lists and request outputs (P), got {len(prompt_token_ids)} and {len(outputs)}")
    rows_ids: list[list[int]] = []
    rows_lp: list[list[float]] = []
    rows_cut: list[bool] = []
    texts: list[str] = []
    for i, req in enumerate(outputs):
        comps = list(req.outputs)
        if len(comps) != g:
            raise ValueError(f"outputs[{i}].outputs: expected {g} completions (G), got {len(comps)}")
        # vLLM may return children out of order; their .index is the sample index g.
        comps.sort(key=lambda c: getattr(c, "index", 0))
        for j, c in enumerate(comps):
            ids = [int(x) for x in c.token_ids]
            if not ids:
                raise ValueError(f"outputs[{i}].outputs[{j}].token_ids: expected at least one generated token, got none")
            lps = c.logprobs
            if lps is None or len(lps) != len(ids):
                raise ValueError(
                    f"outputs[{i}].outputs[{j}].logprobs: expected one entry per token ({len(ids)}; SamplingParams(logprobs=0)), "
                    f"got {None if lps is None else len(lps)}"
                )
            rows_ids.append(ids)
            rows_cut.append(getattr(c, "finish_reason", None) == "length")  # max_tokens reached, no stop token
            rows_lp.append([_sampled_logprob(e, t) for e, t in zip(lps, ids)])
            texts.append(decode(ids) if decode is not None else str(c.text))
    b = p * g
    lp_len = max((len(x) for x in prompt_token_ids), default=0)
    t = max(len(x) for x in rows_ids)
    prompt_ids = torch.full((b, lp_len), pad_token_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, lp_len), dtype=torch.bool)
    response_ids = torch.full((b, t), pad_token_id, dtype=torch.long)
    response_mask = torch.zeros((b, t), dtype=torch.bool)
    log_probs = torch.zeros((b, t), dtype=torch.float32)
    for r in range(b):
        pid = list(prompt_token_ids[r // g])
        if pid:
            prompt_ids[r, lp_len - len(pid):] = torch.tensor(pid, dtype=torch.long)
            prompt_mask[r, lp_len - len(pid):] = True
        n = len(rows_ids[r])
        response_ids[r, :n] = torch.tensor(rows_ids[r], dtype=torch.long)
        response_mask[r, :n] = True
        log_probs[r, :n] = torch.tensor(rows_lp[r], dtype=torch.float32)
    return RolloutBatch(
        prompt_ids=prompt_ids, prompt_mask=prompt_mask, response_ids=response_ids, response_mask=response_mask,
        rollout_log_probs=log_probs, group_ids=torch.arange(p).repeat_interleave(g), prompts=tuple(prompts),
        responses=tuple(texts), truncated=torch.tensor(rows_cut, dtype=torch.bool),
    )


_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VLLMBackend:
    """``RolloutBackend`` over ``vllm.LLM`` (needs vLLM and CUDA; see the module docstring).

    Args:
        cfg: rollout config (sampling, ``tensor_parallel_size``, ``gpu_memory_utilization``).
        model_path: local HF model directory.
        tokenizer: our tokenizer (prompt ids and response texts; same as the trainer's).
        dtype: vLLM dtype name.
        seed: engine seed.
        colocated: the engine shares its GPU with the trainer: sleep after each rollout.
        tied_embeddings: skip ``lm_head.weight`` when syncing (vLLM ties it itself).
    """

    def __init__(
        self, cfg: RolloutConfig, model_path: str, tokenizer, *, dtype: str = "bfloat16", seed: int = 0,
        colocated: bool = True, tied_embeddings: bool = False, max_model_len: int | None = None,
    ) -> None:
        check_vllm_available(cfg)
        from vllm import LLM

        self.cfg = cfg
        self.tokenizer = tokenizer
        self.colocated = colocated
        self.tied_embeddings = tied_embeddings
        kwargs = engine_kwargs(cfg, model_path, dtype=dtype, seed=seed, colocated=colocated, max_model_len=max_model_len)
        self.llm = LLM(**kwargs)
        self._asleep: set[str] = set()  # parts released by sleep: {"weights", "kv_cache"}
        # Colocated: give the GPU back at once, so the trainer-side models (started after the
        # engines, see skyrl_fn.ops.memory) load into it.
        self.sleep()

    # -- sleep / wake ----------------------------------------------------------------------
    def sleep(self) -> None:
        """Free the GPU for the trainer (level 1: KV cache dropped, weights offloaded to CPU)."""
        if self.colocated and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = {"weights", "kv_cache"}

    def wake_up(self, tags: Sequence[str] = ("weights", "kv_cache")) -> None:
        """Re-allocate the parts in ``tags`` that are asleep."""
        todo = [t for t in tags if t in self._asleep]
        if todo:
            self.llm.wake_up(tags=todo)
            self._asleep -= set(todo)

    # -- RolloutBackend --------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: Sequence[str], *, seed: int):
        """Sample ``G`` responses per prompt (see the module docstring); sleeps afterwards when colocated."""
        from vllm import SamplingParams

        if not prompts:
            raise ValueError("prompts: expected at least one prompt, got none")
        tok = self.tokenizer
        ids = [list(x) for x in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        params = SamplingParams(**sampling_params_kwargs(self.cfg, seed=seed, eos_token_id=tok.eos_token_id))
        self.wake_up()
        try:
            outs = self.llm.generate([{"prompt_token_ids": x} for x in ids], params, use_tqdm=False)
        finally:
            self.sleep()
        eos = tok.eos_token_id

        def decode(row):
            return tok.decode([x for x in row if x != eos], skip_special_tokens=True)

        return outputs_to_batch(
            prompts, ids, outs, samples_per_prompt=self.cfg.samples_per_prompt, pad_token_id=tok.pad_token_id, decode=decode
        )

    def sync_weights(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load the trainer's weights into the engine (``collective_rpc`` -> ``model.load_weights``).

        Sends HF-named tensors in buckets of ``DEFAULT_BUCKET_BYTES`` as msgpack-safe data
        (``weight_sync.bucket_to_wire``: bytes plus name/shape/dtype; vLLM's engine process
        cannot receive tensors through ``collective_rpc``), so a large model never needs a
        second full copy in flight; wakes only the weights of a sleeping engine.

        Raises:
            RuntimeError: a worker loaded a different number of tensors than were sent.
        """

        named = to_hf_names(state_dict, tied_embeddings=self.tied_embeddings)
        self.wake_up(("weights",))
        for bucket in plan_buckets(specs_of(named), bucket_bytes=DEFAULT_BUCKET_BYTES):
            loaded = self.llm.collective_rpc("skyrl_load_weights", args=(bucket_to_wire(bucket, named),))
            if any(n != len(bucket.slots) for n in loaded):
                raise RuntimeError(f"skyrl_load_weights: expected {len(bucket.slots)} tensors loaded by every worker, got {loaded}")
        self.llm.reset_prefix_cache()

    # -- broadcast path (engines on their own GPUs) ----------------------------------------
    def init_broadcast(self, host: str, port: int, rank_offset: int, world_size: int) -> list[int]:
        """Join trainer rank 0's NCCL group (``weight_sync.broadcast_ranks`` gives the offsets);
        run concurrently with ``BroadcastSender(host, port, world_size)`` on the trainer."""
        return self.llm.collective_rpc("skyrl_init_broadcast", args=(host, port, rank_offset, world_size))

    def receive_broadcast(self, plan) -> None:
        """Receive and load the buckets of ``plan``; concurrently the trainer calls ``sender.send``."""

        self.wake_up(("weights",))
        self.llm.collective_rpc("skyrl_receive_buckets", args=(plan_to_wire(plan),))
        self.llm.reset_prefix_cache()


def make_vllm_backend(cfg: RolloutConfig, model: torch.nn.Module, tokenizer, *, seed: int = 0, colocated: bool = True) -> VLLMBackend:
    """A ``VLLMBackend`` for ``model``: its local directory if it was loaded from one, else a
    copy saved to a temporary directory (the embedded tiny model). Raises
    ``BackendUnavailableError`` with the install hint when vLLM or CUDA is missing."""
    check_vllm_available(cfg)
    path = getattr(getattr(model, "config", None), "_name_or_path", None)
    if not (path and os.path.isdir(path)):
        path = tempfile.mkdtemp(prefix="skyrl_fn_vllm_model_")
        model.save_pretrained(path)
        tokenizer.save_pretrained(path)
    dtype = _DTYPES.get(next(model.parameters()).dtype, "bfloat16")
    return VLLMBackend(cfg, path, tokenizer, dtype=dtype, seed=seed, colocated=colocated, tied_embeddings=ties_embeddings(model))


def check_vllm_available(rollout: RolloutConfig) -> None:
    """Raise ``BackendUnavailableError`` (what is missing, the install command, the hardware)
    unless vLLM and a CUDA device are here; imports no vLLM."""
    reason = vllm_unavailable_reason()
    if reason is not None:
        raise BackendUnavailableError(reason)


def vllm_backend(model: torch.nn.Module, tokenizer, rollout: RolloutConfig, *, seed: int = 0, colocated: bool = True) -> VLLMBackend:
    """The built-in rollout backend ``vllm`` (:func:`make_vllm_backend`); checked before any model
    loads by :func:`check_vllm_available` (its ``check_available``)."""
    return make_vllm_backend(rollout, model, tokenizer, seed=seed, colocated=colocated)


vllm_backend.check_available = check_vllm_available
vllm_backend.engine = True  # its own weights: pushed by weight sync, never the trainer's module
