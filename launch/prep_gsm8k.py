"""Prepare gsm8k prompt/answer jsonl for `--data.task gsm8k --data.path OUT`.

    python launch/prep_gsm8k.py --out data/gsm8k_train.jsonl                    # HF hub (needs `datasets`, online)
    python launch/prep_gsm8k.py --out data/tiny.jsonl --source tests/fixtures/gsm8k_tiny.jsonl
    python launch/prep_gsm8k.py --out data/test.jsonl --source test.parquet --limit 200
"""

from __future__ import annotations

import argparse
import sys

from skyrl_fn.tasks.gsm8k import prepare_gsm8k


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output .jsonl of {prompt, answer, question} rows")
    p.add_argument("--source", default=None, help="local raw gsm8k .jsonl/.parquet; omit to load from the HF hub")
    p.add_argument("--split", default="train", help="hub split (train/test)")
    p.add_argument("--limit", type=int, default=None, help="keep only the first N rows")
    args = p.parse_args(argv)
    n = prepare_gsm8k(args.out, source=args.source, split=args.split, limit=args.limit)
    print(f"wrote {n} rows to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
