"""Rollouts: the ``RolloutBatch`` record, the ``hf`` and ``vllm`` backends, sampling log-probs.
"""
