"""Tasks: prompts with a verifiable reward (digits, arithmetic, gsm8k) and the prompt stream.
"""
