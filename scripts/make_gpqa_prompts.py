"""Turn GPQA-Diamond into lettered multiple-choice prompts for `trl-ltc evaluate` / `trl-ltc compare`.

    huggingface-cli login                      # Idavidrein/gpqa is gated: accept its terms on the Hub first
    python scripts/make_gpqa_prompts.py        # writes gpqa_diamond.jsonl (198 problems)
    python scripts/make_gpqa_prompts.py --out data/gpqa_diamond.jsonl --seed 0

GPQA stores each question with its correct answer and three incorrect ones as text. Each output line is
`{"prompt": "<question>, then lines 'A) ...' to 'D) ...', then the instruction", "answer": "C"}`: the four options in
an order drawn from a generator seeded with `--seed` and the question's index, so the file is the same everywhere.
Score it with `answer_type: choice` (`trl_ltc.evaluation.choice_letter`).
"""

from __future__ import annotations

import argparse
import json
import random

LETTERS = "ABCD"
INSTRUCTION = "Think step by step, then give your final answer as 'Answer: X', where X is the letter of the option."


def gpqa_row(record: dict, index: int, seed: int = 0) -> dict:
    """One prompt row from a GPQA record (`Question`, `Correct Answer`, `Incorrect Answer 1..3`)."""
    options = [record["Correct Answer"], *(record[f"Incorrect Answer {i}"] for i in (1, 2, 3))]
    options = [str(option).strip() for option in options]
    order = list(range(4))
    random.Random(seed * 1_000_003 + index).shuffle(order)
    lines = [f"{LETTERS[slot]}) {options[k]}" for slot, k in enumerate(order)]
    prompt = f"{str(record['Question']).strip()}\n\n" + "\n".join(lines) + f"\n\n{INSTRUCTION}"
    return {"prompt": prompt, "answer": LETTERS[order.index(0)]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", default="Idavidrein/gpqa", help="Hub dataset (default: Idavidrein/gpqa)")
    parser.add_argument("--config", default="gpqa_diamond", help="its configuration (default: gpqa_diamond)")
    parser.add_argument("--split", default="train", help="its split (default: train)")
    parser.add_argument("--seed", type=int, default=0, help="option-order seed (default: 0)")
    parser.add_argument("--out", default="gpqa_diamond.jsonl", help="output file (default: gpqa_diamond.jsonl)")
    args = parser.parse_args(argv)

    from datasets import load_dataset

    records = load_dataset(args.dataset, args.config, split=args.split)
    with open(args.out, "w", encoding="utf-8") as file:
        for index, record in enumerate(records):
            file.write(json.dumps(gpqa_row(record, index, args.seed)) + "\n")
    print(f"Wrote {len(records)} problems to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
