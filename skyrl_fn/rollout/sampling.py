"""The sampling distribution (temperature, then top-p) and its log-probs, shared by every backend and the learner.

Notation: ``N`` rows (any leading shape, e.g. ``[B]`` or ``[B, T]``), ``V`` vocabulary,
``z`` logits, ``tau`` temperature, ``p`` = ``top_p``.

One definition of a token's log-prob holds everywhere in a run — rollout (``hf`` and ``vllm``
backends), old, new and reference log-probs in the learner::

    q     = softmax(z / tau)
    K_p   = the nucleus: tokens in descending order of q while the mass before them is < p
    log pi(y) = log q[y] - log sum_{v in K_p U {y}} q[v]

i.e. the log-prob under the distribution the token was actually sampled from. At ``p = 1``
the nucleus is the whole vocabulary and this is ``log softmax(z / tau)[y]``, computed exactly
as before (no extra work). ``y`` is added to the set so a token the current weights would no
longer put in the nucleus keeps a finite log-prob (its ratio then shrinks instead of being 0/0);
a sampled token is always in the sampler's nucleus, so rollout log-probs are unaffected.

Why this definition: vLLM returns, for ``logprobs_mode="processed_logprobs"``, exactly this
(temperature, then top-k/top-p masking, then ``log_softmax``: ``vllm/v1/worker/gpu/sample/
sampler.py``, ``v1/sample/ops/topk_topp_sampler.py``, read in 0.33.0 and 0.11.0), and its other
modes ignore temperature
(``raw_*``) or return logits; so it is the one definition every backend can produce for every
``(tau, p)``. It also makes the importance ratios of TIS/IcePop and the off-policy metrics
compare the learner with the distribution that produced the data.

Deviation: SkyRL and verl score the learner's tokens with ``log softmax(z / tau)`` whatever
``top_p`` is, so with ``top_p < 1`` their rollout and learner log-probs differ by ``log`` of the
nucleus mass. Here both use the nucleus; results are identical at ``top_p = 1`` (the default).
Cost at ``top_p < 1``: one sort of each row's ``V`` logits (done in chunks of rows), and the
learner's gradient flows through the nucleus normaliser as well.
"""

from __future__ import annotations

import torch

__all__ = ["nucleus_mask", "nucleus_log_mass", "sampling_log_probs", "nucleus_probs", "NUCLEUS_CHUNK_ELEMENTS"]

#: Rows are processed in chunks of about this many logits (a sort holds values and int64 indices).
NUCLEUS_CHUNK_ELEMENTS = 1 << 23


def _check_top_p(top_p: float) -> float:
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1], got {top_p!r}")
    return float(top_p)


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
        raise ValueError(f"temperature: expected a number > 0, got {temperature!r}")
    return float(temperature)


def nucleus_mask(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[..., V]`` bool: the smallest set of most probable tokens whose mass reaches ``top_p``.

    A token is kept when the mass of the tokens before it (descending order) is ``< top_p``;
    the most probable token is always kept. The same rule as vLLM's ``apply_top_k_top_p``
    (ascending cumulative mass ``<= 1 - p`` is dropped), up to rounding at the boundary.

    Args:
        probs: ``[..., V]`` probabilities (rows sum to 1).
        top_p: ``p`` in (0, 1]; 1 keeps everything.
    """
    p = _check_top_p(top_p)
    if p >= 1.0:
        return torch.ones_like(probs, dtype=torch.bool)
    sorted_p, idx = probs.sort(dim=-1, descending=True)
    keep_sorted = (sorted_p.cumsum(-1) - sorted_p) < p
    return torch.zeros_like(keep_sorted).scatter(-1, idx, keep_sorted)


def nucleus_probs(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``[..., V]`` the sampling distribution: ``probs`` on :func:`nucleus_mask`, renormalised."""
    kept = torch.where(nucleus_mask(probs, top_p), probs, 0.0)
    return kept / kept.sum(-1, keepdim=True)


def nucleus_log_mass(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """``log sum_{v in K_p U {y}} softmax(z / tau)[v]`` per row (<= 0), differentiable in ``z``.

    The set is chosen without gradient (as the sampler's mask); the mass carries the gradient.
    Rows are processed in chunks of about :data:`NUCLEUS_CHUNK_ELEMENTS` logits.

    Args:
        logits: ``[..., V]`` floating logits (``[B, T, V]`` may be a strided slice).
        targets: ``[...]`` int64 token ids (``y``).
        temperature: ``tau > 0``.
        top_p: ``p`` in (0, 1]; at 1 the result is 0 (returned without touching ``logits``).

    Returns:
        ``[...]`` float32.

    Raises:
        ValueError: bad ``temperature``/``top_p`` or ``targets`` not shaped like ``logits[..., 0]``.
    """
    tau, p = _check_temperature(temperature), _check_top_p(top_p)
    lead = tuple(logits.shape[:-1])
    if tuple(targets.shape) != lead:
        raise ValueError(f"targets: expected shape {lead} (logits without V), got {tuple(targets.shape)}")
    if p >= 1.0:
        return torch.zeros(lead, dtype=torch.float32, device=logits.device)
    v = logits.shape[-1]
    # Walk [T, V] blocks of a 3-D input (views, no copy of a strided slice), 2-D as one block.
    blocks = [(logits, targets)] if logits.dim() <= 2 else [(logits[b], targets[b]) for b in range(logits.shape[0])]
    rows = max(1, NUCLEUS_CHUNK_ELEMENTS // max(1, v))
    out = []
    for z_block, y_block in blocks:
        z_block = z_block.reshape(-1, v) if z_block.dim() != 2 else z_block
        y_block = y_block.reshape(-1)
        parts = []
        for s in range(0, z_block.shape[0], rows):
            z = z_block[s : s + rows].float() / tau
            y = y_block[s : s + rows]
            with torch.no_grad():
                keep = nucleus_mask(torch.log_softmax(z, dim=-1).exp(), p)  # as the hf sampler
                keep.scatter_(-1, y[:, None], True)
            parts.append(torch.logsumexp(torch.where(keep, z, float("-inf")), dim=-1) - torch.logsumexp(z, dim=-1))
        out.append(torch.cat(parts) if parts else z_block.new_zeros(0, dtype=torch.float32))
    res = out[0] if logits.dim() <= 2 else torch.stack(out)
    return res.reshape(lead)


def sampling_log_probs(logits: torch.Tensor, targets: torch.Tensor, *, temperature: float = 1.0, top_p: float = 1.0) -> torch.Tensor:
    """``[...]`` float32 ``log pi(y)`` of the module docstring (with gradient), from ``[..., V]`` logits.

    The plain ``[..., V]`` log-softmax; the learner's memory-light path for large vocabularies
    subtracts :func:`nucleus_log_mass` from its own full-softmax log-probs instead.
    """
    tau = _check_temperature(temperature)
    logp = torch.log_softmax(logits.float() / tau, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    if _check_top_p(top_p) >= 1.0:
        return logp
    return logp - nucleus_log_mass(logits, targets, temperature=tau, top_p=top_p)
