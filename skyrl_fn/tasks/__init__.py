"""Tasks: prompts with a verifiable reward (digits, arithmetic, gsm8k) and the prompt stream.
"""

from skyrl_fn.tasks.scoring import provided_fields, provides

__all__ = ["provides", "provided_fields"]
