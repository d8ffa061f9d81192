"""The trainer: the run config, the learner step, workers, the one training loop, checkpoints.
"""
