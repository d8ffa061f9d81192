"""``arithmetic``: seeded short arithmetic and word problems with a required answer format, sized
for a small pretrained instruct model on CPU.

Example ``i`` of a split is a pure function of ``(seed, split, i)``. Every problem asks for one
integer and tells the model how to give it: the reply must end its reasoning with a line
``#### <number>`` (GSM8K's convention, so the same extractor reads both tasks). Problems::

    add      What is 37 + 48?
    add_sub  What is 37 + 48 - 19?
    word     Tom has 37 marbles. He gets 48 more and gives away 19. How many marbles does he have now?

Held out by construction: a problem belongs to the ``eval`` split when a hash of its arithmetic
(the added operands unordered, and the subtrahend) falls in the held-out bucket (one in
``heldout_every``), to ``train`` otherwise, so no training problem, nor its commuted twin or a
word problem over the same numbers, is ever in the evaluation set whatever the seeds.

Reward (in ``[0, 1]``)::

    reward = 1                if the last number on the last '####' line equals the answer
             format_credit    if that line has a number but it is wrong
             0                otherwise (no '####' number: the required format is missing)

Why a format credit cannot be gamed: it is strictly below the reward of a correct answer, and a
correct answer needs the same format, so in any group where one sample is right, the right one
gets the largest advantage; a formatted wrong answer only ever beats replies that ignore the
instruction, which is the behaviour the task asks for. Held-out accuracy (pass@1) counts only
reward 1, so the credit cannot inflate the measured metric. It can still make "####" come
before the answer is right (measured: ``docs/real-model.md``). Default 0; the ``smollm2``
preset uses 0.1.
"""

from __future__ import annotations

import hashlib
import random
import re

import attrs

from skyrl_fn.models.model import TEXT_ALPHABET
from skyrl_fn.tasks.base import DataConfig, Example
from skyrl_fn.tasks.scoring import provides

__all__ = [
    "ArithmeticTask", "KINDS", "INSTRUCTION", "final_answer", "format_reward", "arithmetic_task", "arithmetic_reward",
    "arithmetic_components",
]

#: Problem kinds, cycled by example index.
KINDS: tuple[str, ...] = ("add", "add_sub", "word")
#: Appended to every question: the required answer format.
INSTRUCTION = "Think briefly, then give the final answer on the last line as '#### <number>'."

_FINAL_LINE = re.compile(r"####([^\n]*)")
_INT = re.compile(r"-?\d[\d,]*")
_NAMES = ("Tom", "Anna", "Li", "Sara", "Omar", "Maya", "Ben", "Zoe")
_THINGS = ("apples", "marbles", "stickers", "books", "coins", "pencils", "cards", "shells")


def final_answer(response: str) -> int | None:
    """The last integer on the line of the last ``####`` in ``response`` (commas allowed), or None.

    ``"#### 7"`` and ``"#### 3 + 4 = 7"`` both give 7: the answer line's final number, as the
    instruction asks ("the final answer on the last line"); only one number counts, so listing
    guesses gains nothing. (SmolLM2 tends to restate the sum after ``####``; taking the number right
    after it instead scored those 0 and stalled a measured run at 0 % held-out accuracy.)
    """
    lines = _FINAL_LINE.findall(response)
    if not lines:
        return None
    found = _INT.findall(lines[-1])
    if not found:
        return None
    try:
        return int(found[-1].replace(",", ""))
    except ValueError:
        return None


def format_reward(response: str, answer: int, *, format_credit: float = 0.0) -> float:
    """1.0 for the right ``####`` number, ``format_credit`` for a wrong one, 0.0 without one."""
    got = final_answer(response)
    if got is None:
        return 0.0
    return 1.0 if got == answer else format_credit


@attrs.frozen(kw_only=True)
class ArithmeticTask:
    """Seeded arithmetic problems (see the module docstring).

    Attributes:
        seed: data seed; example ``i`` depends only on ``(seed, split, i)``.
        split: ``train`` or ``eval`` (disjoint sets of questions).
        min_value, max_value: range of every operand.
        kinds: problem kinds cycled by index (from :data:`KINDS`).
        format_credit: reward of a well-formatted wrong answer, in ``[0, 1)``.
        heldout_every: one question in this many belongs to ``eval``.
    """

    seed: int = 0
    split: str = "train"
    min_value: int = 2
    max_value: int = 60
    kinds: tuple[str, ...] = attrs.field(default=KINDS, converter=tuple)
    format_credit: float = 0.0
    heldout_every: int = 8
    name: str = "arithmetic"
    alphabet: str = TEXT_ALPHABET

    def __attrs_post_init__(self) -> None:
        if self.split not in ("train", "eval"):
            raise ValueError(f"split: expected 'train' or 'eval', got {self.split!r}")
        if not 0 <= self.min_value <= self.max_value:
            raise ValueError(f"data.min_value/max_value: expected 0 <= min <= max, got {self.min_value}, {self.max_value}")
        if self.max_value - self.min_value < 3:
            raise ValueError(f"data.max_value: expected at least min_value + 3 (enough distinct problems), got {self.max_value}")
        bad = [k for k in self.kinds if k not in KINDS]
        if bad or not self.kinds:
            raise ValueError(f"data.kinds: expected a non-empty subset of {list(KINDS)}, got {list(self.kinds)}")
        if not 0.0 <= self.format_credit < 1.0:
            raise ValueError(f"data.format_credit: expected in [0, 1) (below a correct answer), got {self.format_credit}")
        if self.heldout_every < 2:
            raise ValueError(f"heldout_every: expected >= 2, got {self.heldout_every}")

    def size(self) -> None:
        """None: an endless generator."""
        return None

    def heldout(self) -> "ArithmeticTask":
        """The same task's ``eval`` split."""
        return attrs.evolve(self, split="eval")

    def _in_split(self, key: str) -> bool:
        bucket = int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "big") % self.heldout_every
        return (bucket == 0) == (self.split == "eval")

    def _draw(self, rng: random.Random, kind: str) -> tuple[str, int, str]:
        """``(question, answer, split key)``; the key is the arithmetic up to the order of the
        added operands, so ``3 + 4`` and ``4 + 3`` (or a word problem over the same numbers)
        always land in the same split."""
        lo, hi = self.min_value, self.max_value
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        pair = f"{min(a, b)}+{max(a, b)}"
        if kind == "add":
            return f"What is {a} + {b}?", a + b, pair
        c = rng.randint(lo, min(hi, a + b))  # the result stays >= 0
        key = f"{pair}-{c}"
        if kind == "add_sub":
            return f"What is {a} + {b} - {c}?", a + b - c, key
        name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
        return (
            f"{name} has {a} {thing}. {name} gets {b} more and gives away {c}. How many {thing} does {name} have now?",
            a + b - c, key,
        )

    def example(self, index: int) -> Example:
        """Example ``index`` of this split (a pure function of ``(seed, split, index)``)."""
        if index < 0:
            raise ValueError(f"index: expected >= 0, got {index}")
        kind = self.kinds[index % len(self.kinds)]
        rng = random.Random(f"arithmetic/{self.seed}/{self.split}/{index}")
        while True:  # rejection keeps the splits disjoint; ~1 draw for train, ~heldout_every for eval
            question, answer, key = self._draw(rng, kind)
            if self._in_split(key):
                return Example(index=index, prompt=f"{question} {INSTRUCTION}", answer=str(answer))

    def reward(self, response: str, example: Example) -> float:
        """:func:`format_reward` with this task's ``format_credit``."""
        return format_reward(response, int(example.answer), format_credit=self.format_credit)


def arithmetic_task(data: DataConfig, *, seed: int = 0) -> ArithmeticTask:
    """The built-in task ``arithmetic``: :class:`ArithmeticTask` from ``data.min_value``,
    ``data.max_value``, ``data.arithmetic_kinds`` and ``data.format_credit``."""
    return ArithmeticTask(
        seed=seed, min_value=data.min_value, max_value=data.max_value, kinds=data.arithmetic_kinds,
        format_credit=data.format_credit,
    )


def arithmetic_reward(response: str, example: Example, *, format_credit: float = 0.0) -> float:
    """The built-in reward ``arithmetic``: :func:`format_reward` against the example's answer.

    Args:
        format_credit: reward of a well-formatted ('#### N') wrong answer, in ``[0, 1)``.
    """
    if not 0.0 <= format_credit < 1.0:
        raise ValueError(f"format_credit: expected in [0, 1) (below a correct answer), got {format_credit!r}")
    return format_reward(response, int(example.answer), format_credit=format_credit)


@provides("correct", "format")
def arithmetic_components(response: str, example: Example, *, format_credit: float = 0.0) -> dict[str, float]:
    """The built-in reward ``arithmetic_components``: the ``arithmetic`` reward and its two parts as
    per-sample fields (``skyrl_fn.tasks.scoring``), e.g. for GDPO's separate normalisation
    (``--algorithm.advantage-estimator gdpo --algorithm.estimator.reward-keys correct format``)::

        correct = 1 if the last '####' number equals the answer, else 0
        format  = 1 if the reply has a '####' number at all, else 0
        score   = correct + format_credit * format * (1 - correct)      (= the arithmetic reward)

    Args:
        format_credit: the score of a well-formatted wrong answer, in ``[0, 1)``.
    """
    score = arithmetic_reward(response, example, format_credit=format_credit)
    got = final_answer(response)
    return {"score": score, "correct": float(got == int(example.answer)), "format": float(got is not None)}

