"""gsm8k: final-number extraction, the math-answer reward, the task, and data preparation.

Raw gsm8k rows are ``{"question": str, "answer": str}`` where the answer ends in ``#### <number>``.
``prepare_gsm8k`` turns them into ``{"prompt", "answer"}`` rows (the answer reduced to the final
number), which ``Gsm8kTask`` reads. The reward is 1.0 when the final number of the response equals
the reference numerically (commas, ``$`` and trailing zeros ignored), else 0.0.
"""

from __future__ import annotations

import json
import os
import re
from decimal import Decimal, InvalidOperation
from typing import Iterable, Iterator, Mapping

import attrs

from skyrl_fn.models.model import TEXT_ALPHABET
from skyrl_fn.tasks.base import DataError, Example

__all__ = [
    "extract_final_number", "normalize_number", "math_reward", "format_prompt", "Gsm8kTask",
    "prepare_gsm8k", "read_raw_rows", "PROMPT_TEMPLATE",
]

PROMPT_TEMPLATE = "Question: {question}\nAnswer step by step, then give the final number after '####'.\n"

_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+"
_HASHES = re.compile(r"####\s*(" + _NUMBER + ")")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*\**\s*(" + _NUMBER + ")", re.IGNORECASE)
_ANY = re.compile(_NUMBER)


def normalize_number(text: str) -> str | None:
    """Canonical decimal string of ``text`` (``"1,234.50"`` -> ``"1234.5"``, ``"$7"`` -> ``"7"``),
    or None if it is not a number."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        d = Decimal(t)
    except InvalidOperation:
        return None
    if not d.is_finite():
        return None
    d = d.normalize()
    s = format(d, "f")
    return "0" if s in ("-0", "") else s


def extract_final_number(text: str) -> str | None:
    """The final answer number in ``text``, normalised, or None.

    Order of preference: the number after the last ``####``; after the last "answer is" / "answer:";
    the last number anywhere.
    """
    for pattern in (_HASHES, _ANSWER_IS, _ANY):
        found = pattern.findall(text)
        if found:
            return normalize_number(found[-1])
    return None


def math_reward(response: str, answer: str) -> float:
    """1.0 when the final number of ``response`` equals ``answer`` numerically, else 0.0."""
    got = extract_final_number(response)
    want = normalize_number(answer)
    if want is None:
        want = extract_final_number(answer)
    return 1.0 if got is not None and want is not None and Decimal(got) == Decimal(want) else 0.0


def format_prompt(question: str) -> str:
    """The prompt for ``question`` (``PROMPT_TEMPLATE``)."""
    return PROMPT_TEMPLATE.format(question=question.strip())


@attrs.frozen(kw_only=True)
class Gsm8kTask:
    """gsm8k from prepared ``{"prompt", "answer"}`` rows.

    Attributes:
        rows: ``(prompt, answer)`` pairs.
    """

    rows: tuple[tuple[str, str], ...] = attrs.field(converter=tuple)
    name: str = "gsm8k"
    alphabet: str = TEXT_ALPHABET

    def __attrs_post_init__(self) -> None:
        if not self.rows:
            raise DataError("rows: expected at least one (prompt, answer) row, got none")

    @classmethod
    def from_jsonl(cls, path: str) -> "Gsm8kTask":
        """Load prepared rows; raw gsm8k rows (``question``/``answer``) are converted on the fly.

        Raises:
            DataError: an unreadable file, or a row that is not a JSON object with string
                ``prompt``/``answer`` (or ``question``/``answer``), named as ``file:line``.
        """
        rows = []
        for where, row in _read_jsonl(path, numbered=True):
            if isinstance(row, Mapping) and "prompt" in row:
                if not isinstance(row.get("prompt"), str) or not isinstance(row.get("answer"), (str, int, float)):
                    raise DataError(f"{where}: expected a string 'prompt' and an 'answer', got keys {sorted(row)}")
                rows.append((row["prompt"], str(row["answer"])))
            else:
                rows.append(_convert(row, where))
        if not rows:
            raise DataError(f"{path}: expected at least one row, got an empty file")
        return cls(rows=rows)

    def size(self) -> int:
        """Number of rows."""
        return len(self.rows)

    def example(self, index: int) -> Example:
        """Row ``index``."""
        prompt, answer = self.rows[index]
        return Example(index=index, prompt=prompt, answer=answer)

    def reward(self, response: str, example: Example) -> float:
        """:func:`math_reward`."""
        return math_reward(response, example.answer)


def _read_jsonl(path: str, *, numbered: bool = False) -> Iterator:
    """The JSON value of each non-empty line (with ``numbered``: ``("path:line", value)`` pairs)."""
    try:
        f = open(path, "rb")
    except OSError as err:
        raise DataError(f"{path}: expected a readable jsonl file, got {err.strerror or err}") from None
    with f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError:
                raise DataError(f"{path}:{n}: expected UTF-8 text, got bytes {raw[:40]!r}") from None
            if not line:
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: expected a JSON object per line, got {line[:60]!r} ({e})") from None
            if not isinstance(value, Mapping):
                raise DataError(f"{path}:{n}: expected a JSON object per line, got a {type(value).__name__}")
            yield (f"{path}:{n}", value) if numbered else value


def _convert(row: Mapping, where: str) -> tuple[str, str]:
    if "question" not in row or "answer" not in row:
        raise DataError(f"{where}: expected keys 'prompt' and 'answer' (prepared) or 'question' and 'answer' (raw gsm8k), got {sorted(row)}")
    number = extract_final_number(str(row["answer"]))
    if number is None:
        raise DataError(f"{where}: expected a final number in the answer, got {str(row['answer'])[-60:]!r}")
    return format_prompt(str(row["question"])), number


def read_raw_rows(source: str | None, *, split: str = "train") -> Iterable[Mapping]:
    """Raw gsm8k rows from a local ``.jsonl``/``.parquet`` file, or (``source=None``) from the
    HF hub via ``datasets`` (needs the package and network; never used by the tests)."""
    if source is None:
        try:
            from datasets import load_dataset
        except ImportError:
            raise RuntimeError(
                "source=None loads gsm8k with the `datasets` package, which is not installed; "
                "pip install datasets, or pass a local .jsonl/.parquet file"
            ) from None
        return load_dataset("openai/gsm8k", "main", split=split)
    if not os.path.isfile(source):
        raise FileNotFoundError(f"source: expected a local .jsonl or .parquet file, got {source!r}")
    if source.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise RuntimeError("reading parquet needs pyarrow (pip install pyarrow)") from None
        return pq.read_table(source).to_pylist()
    return list(_read_jsonl(source))


def prepare_gsm8k(out_path: str, *, source: str | None = None, split: str = "train", limit: int | None = None) -> int:
    """Write prompt/answer jsonl for training; return the number of rows written.

    Args:
        out_path: output ``.jsonl`` (parent directories created; written atomically).
        source: a local raw gsm8k ``.jsonl``/``.parquet``, or None for the HF hub (``datasets``).
        split: the split when loading from the hub.
        limit: keep only the first ``limit`` rows.
    """
    rows = []
    for i, row in enumerate(read_raw_rows(source, split=split)):
        if limit is not None and i >= limit:
            break
        prompt, answer = _convert(row, f"{source or 'gsm8k'}:{i + 1}")
        rows.append({"prompt": prompt, "answer": answer, "question": str(row["question"])})
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, out_path)
    return len(rows)
