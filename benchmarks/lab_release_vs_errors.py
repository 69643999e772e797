"""Where the release rule cuts on the lab task, against where the student's first wrong step is.

    python benchmarks/lab_release_vs_errors.py runs/compare_lab/diagnose/records.jsonl

Reads the `records.jsonl` of `trl-ltc diagnose` on lab rollouts (`trl-ltc compare --config configs/compare_lab.yaml`
writes it to `<output_dir>/diagnose`), checks every line of each completion against the prompt's digits
(`trl_ltc.lab` format: `a:4`, `b:4+7=1`, ..., `answer:2`), and prints, for accepted and not-accepted trajectories,
the share that contain a wrong step, the position of the first wrong step and of the release as fractions of the
completion's segments, and how often the release falls after the first error. Not a test.
"""

from __future__ import annotations

import json
import re
import statistics
import sys

LINE = re.compile(r"^([a-z]):(?:(\d)\+(\d)=)?(\d)$")


def first_error(prompt: str, segments: list[str]) -> int | None:
    """Index of the first segment whose step is wrong (wrong digit, wrong sum, bad format), or None if all right."""
    digits = {token[0]: int(token[1]) for token in prompt.split()}
    total = None
    for index, text in enumerate(segments):
        line = text.strip()
        if line.startswith("answer:"):
            return None if total is not None and line == f"answer:{total}" else index
        match = LINE.match(line)
        if match is None:
            return index
        letter, previous, digit, result = match.groups()
        if letter not in digits:
            return index
        if previous is None:  # the first line: `a:<digit>`
            if total is not None or int(result) != digits[letter]:
                return index
        elif total is None or int(previous) != total or int(digit) != digits[letter] or \
                int(result) != (total + digits[letter]) % 10:
            return index
        total = int(result)
    return len(segments)  # never stated an answer


def main(path: str) -> None:
    records = [json.loads(line) for line in open(path, encoding="utf-8")]
    groups = {"accepted": [], "not accepted": []}
    for record in records:
        groups["accepted" if record["accepted"] else "not accepted"].append(record)
    print(f"{len(records)} trajectories from {path}")
    for name, group in groups.items():
        errors = [(r, first_error(r["prompt"], r["segment_texts"])) for r in group]
        wrong = [(r, e) for r, e in errors if e is not None]
        line = f"{name}: {len(group)} trajectories, {len(wrong) / max(len(group), 1):.0%} with a wrong step"
        if wrong:
            first = [e / r["num_segments"] for r, e in wrong]
            line += f"; first wrong step at {statistics.mean(first):.2f} of the segments (mean)"
        if name == "accepted" and group:
            release = [r["release_segment"] / r["num_segments"] for r in group]
            after = [r["release_segment"] > e for r, e in wrong]
            at_or_before = [r["release_segment"] <= e for r, e in wrong]
            line += (
                f"; release at {statistics.mean(release):.2f} of the segments (mean); of the trajectories with an "
                f"error, the kept prefix contains the first error in {sum(after)}/{len(wrong)} and stops at or "
                f"before it in {sum(at_or_before)}/{len(wrong)}"
            )
        if name == "accepted" and group:
            kept, released = [], []
            for r in group:
                for index, value in enumerate(r["segment_advantage_mean"]):
                    (kept if index < r["release_segment"] else released).append(value)
            line += (
                f"; mean per-segment advantage on kept segments {statistics.mean(kept):+.3f}, on released ones "
                f"{statistics.mean(released):+.3f}"
            )
        print(line)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs/compare_lab/diagnose/records.jsonl")
