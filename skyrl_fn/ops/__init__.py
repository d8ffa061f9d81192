"""Ops: memory-light fused LM-head log-probs, ``compile_loss``, CUDA kernels and memory helpers.
"""
