"""The premise check of the lab bench's positive control (`trl_ltc.lab.FADE_PAIR`): does its teacher's feedback fade
where it was built to, and does the release rule see it on the untrained student's own rollouts?

    python benchmarks/lab_fade_premise.py teacher OUT_DIR        # the teacher's accuracy and its profile by line
    python benchmarks/lab_fade_premise.py records RECORDS_JSONL  # accepted vs null and the margin by line

`teacher` loads (building once, if needed) the fade pair and prints, for 32 held-out problems teacher forced on their
correct solutions, the fade teacher's entropy, margin (on the student's top-10) and log-prob of the right digit at each
line's result digit, and its mean margin over the line (`trl_ltc.lab.fade_profile`); then its greedy accuracy on 128
held-out problems: the answer, all of steps 1..FADE_AFTER right, each step right before and after the fade, and how
often a line restates the previous line's result exactly. Written to OUT_DIR/profile.json.

`records` reads the `records.jsonl` of `trl-ltc diagnose` on the untrained student's rollouts scored by the fade teacher
(`trl-ltc compare --config configs/compare_lab_fade.yaml` writes it to `<output_dir>/diagnose`; or run
`trl-ltc diagnose --config configs/lab.yaml --model_name_or_path <student> --teacher_model_name_or_path <teacher>
--dataset_name <lab train prompts> --num_prompts 256 --batch_size 64 --max_completion_length 176`) and prints the
accepted fraction against its shuffled-segment null, and by line: the mean segment margin, the margin and the
advantage at the result digit, and where the accepted releases fall. Not a test.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def teacher(out: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from trl_ltc import lab
    from trl_ltc.evaluation import answer_is_correct
    from trl_ltc.generation import sample_completions

    torch.set_num_threads(1)
    teacher_dir, student_dir = lab.prepare_lab_pair(pair=lab.FADE_PAIR)
    tokenizer = lab.build_tokenizer()
    fade = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
    profile = lab.fade_profile(fade, student, tokenizer, lab.problems("test", 32), top_k=10)
    print("step  entropy  margin  logprob(right)  line margin  problems")
    for i, step in enumerate(profile["step"]):
        print(
            f"{step:4d} {profile['result_entropy'][i]:8.3f} {profile['result_margin'][i]:7.2f} "
            f"{profile['result_logprob'][i]:15.3f} {profile['line_margin'][i]:12.2f} {profile['count'][i]:9d}"
        )
    print("answer line:", {k: round(v, 3) for k, v in profile["answer"].items()})

    items = lab.problems("test", 128)
    rollouts = sample_completions(
        fade, tokenizer, [p["prompt"] for p in items], 176, 64, do_sample=False, progress=False
    )
    texts = tokenizer.batch_decode(
        [ids[mask.bool()] for ids, mask in zip(rollouts.completion_ids, rollouts.completion_mask)],
        skip_special_tokens=True,
    )
    counts = dict.fromkeys(("early", "early_n", "late", "late_n", "prefix", "copies", "copies_n"), 0)
    for text, problem in zip(texts, items):
        digits, lines = problem["digits"], text.splitlines()
        previous, prefix = digits[0], lines[:1] == [f"a:{digits[0]}"]
        for step in range(1, len(digits)):
            try:
                _, rest = lines[step].split(":")
                total, rest = rest.split("+")
                digit, result = (int(x) for x in rest.split("="))
                total = int(total)
            except (IndexError, ValueError):  # a malformed or missing line: wrong, and the rest is not read
                prefix = prefix and step > lab.FADE_AFTER
                break
            right = digit == digits[step] and result == (total + digit) % 10  # right given the restated sum
            side = "early" if step <= lab.FADE_AFTER else "late"
            counts[side] += right
            counts[side + "_n"] += 1
            counts["copies"] += total == previous
            counts["copies_n"] += 1
            if step <= lab.FADE_AFTER:
                prefix = prefix and right and total == previous
            previous = result
        counts["prefix"] += prefix
    accuracy = {
        "greedy_answer_accuracy": sum(answer_is_correct(t, p["answer"], "statement") for t, p in zip(texts, items))
        / len(items),
        f"steps_1_to_{lab.FADE_AFTER}_all_right": counts["prefix"] / len(items),
        "step_right_before_fade": counts["early"] / max(1, counts["early_n"]),
        "step_right_after_fade": counts["late"] / max(1, counts["late_n"]),
        "restated_sum_copies_previous_result": counts["copies"] / max(1, counts["copies_n"]),
    }
    print("teacher, greedy, 128 held-out problems:", json.dumps(accuracy, indent=1))
    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "profile.json").write_text(json.dumps({"profile": profile, "teacher": accuracy}, indent=1) + "\n")


def records(path: str) -> None:
    from trl_ltc import lab
    from trl_ltc.diagnostics import summarize

    with open(path, encoding="utf-8") as file:
        rows = [json.loads(line) for line in file if line.strip()]
    summary = summarize(rows)
    keys = (
        "trajectories", "accepted_fraction", "accepted_frac_null", "accepted_frac_calibrated", "margin_before_change",
        "margin_after_change", "kept_fraction_mean", "num_segments_mean", "completion_length_mean",
    )  # fmt: skip
    print(json.dumps({k: summary.get(k) for k in keys}, indent=1))
    by_line: dict[int, list] = {}
    digit_margin: dict[int, list] = {}
    digit_advantage: dict[int, list] = {}
    for row in rows:
        n = row["num_segments"]
        for i, (margin, (start, end)) in enumerate(zip(row["segment_margin_mean"], row["segment_token_spans"])):
            text = row["segment_texts"][i]
            if i == n - 1 and text.startswith("answer"):
                continue  # the answer line apart: lines are steps
            by_line.setdefault(i, []).append(margin)
            if "=" in text and text.endswith("\n") and end - start == len(text):
                digit = start + len(text) - 2  # one token per character: the result digit, before the newline
                digit_margin.setdefault(i, []).append(row["token_margins"][digit])
                digit_advantage.setdefault(i, []).append(row["token_advantages"][digit])
    mean = lambda values: statistics.mean(values) if values else float("nan")
    print("line  trajectories  segment margin  result-digit margin  result-digit advantage")
    for i in sorted(by_line):
        if len(by_line[i]) >= 10:
            print(
                f"{i:4d} {len(by_line[i]):13d} {mean(by_line[i]):15.2f} {mean(digit_margin.get(i, [])):20.2f} "
                f"{mean(digit_advantage.get(i, [])):23.3f}"
            )
    k = lab.FADE_AFTER
    for name, values in (("segment margin", by_line), ("result-digit margin", digit_margin)):
        early = [m for i, v in values.items() if 1 <= i <= k for m in v]
        late = [m for i, v in values.items() if i > k for m in v]
        print(f"{name}: steps 1-{k} {mean(early):.2f}, steps {k + 1}+ {mean(late):.2f}")
    released = [row["release_segment"] for row in rows if row["accepted"]]
    print(
        f"accepted releases: {len(released)}; kept segments median {statistics.median(released) if released else None}, "
        f"share at {k}-{k + 2}: {sum(k <= r <= k + 2 for r in released) / max(1, len(released)):.2f}; "
        f"histogram {dict(sorted((r, released.count(r)) for r in set(released)))}"
    )


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in ("teacher", "records"):
        sys.exit(__doc__)
    (teacher if sys.argv[1] == "teacher" else records)(sys.argv[2])
