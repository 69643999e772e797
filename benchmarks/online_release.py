"""`release` vs `release` + `rollout_truncation="online"` on the quickstart pair (CPU): tokens, time, held-out KL.

    python benchmarks/online_release.py run --mode release --seed 0 --max_steps 10     # one training run
    python benchmarks/online_release.py run --mode online --seed 0 --max_steps 10
    python benchmarks/online_release.py report                                          # the table of all runs

Each run trains the quickstart recipe (`configs/quickstart.yaml`: SmolLM2-135M-Instruct teacher, its noisy copy as
the student, LoRA, 4 prompts x 96 tokens per step, `supervision: release`) for `--max_steps` steps with `--seed`,
records per step the completion tokens the student generated (`rollout/generated_tokens`) and the wall time of the
step (generation + scoring + update), then measures the held-out reverse KL(student || teacher) per token on the
student's samples of `--eval_prompts` held-out problems (sampling seed 0 for every run). `release` runs keep their
release records (`release_records.jsonl`), on which `report` replays the online rule (`trl-ltc diagnose --replay`):
the agreement of the online and offline release points on the same rollouts. Results go to
`runs/bench_online/<mode>-seed<seed>/result.json`. Not a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # this checkout's trl_ltc

ROOT = Path("runs/bench_online")


def run(args) -> None:
    from transformers import TrainerCallback

    from trl_ltc import embedded
    from trl_ltc.commands.distill import parse_args
    from trl_ltc.distill import build_trainer
    from trl_ltc.evaluation import heldout_reverse_kl
    from trl_ltc.quickstart import heldout_prompts, recipe_path

    out = ROOT / f"{args.mode}-seed{args.seed}"
    teacher_dir, student_dir = embedded.prepare_smollm2_pair()
    argv = [
        "--config", recipe_path(), "--model_name_or_path", student_dir, "--teacher_model_name_or_path", teacher_dir,
        "--dataset_name", embedded.quickstart_dataset_path("train"), "--output_dir", str(out),
        "--max_steps", str(args.max_steps), "--seed", str(args.seed),
        "--release_diagnostics_steps", str(args.max_steps), "--disable_tqdm", "true",
    ]  # fmt: skip
    if args.mode == "online":
        argv += ["--rollout_truncation", "online", "--online_check_tokens", str(args.check_tokens)]
    argv += args.extra
    trainer = build_trainer(*parse_args(argv))

    class StepTimer(TrainerCallback):
        times: list[float] = []

        def on_step_begin(self, *_, **__):
            self.start = time.perf_counter()

        def on_step_end(self, *_, **__):
            self.times.append(time.perf_counter() - self.start)

    timer = StepTimer()
    trainer.add_callback(timer)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "loss" in log]
    kl = heldout_reverse_kl(
        trainer.accelerator.unwrap_model(trainer.model),
        trainer.accelerator.unwrap_model(trainer.teacher_model),
        trainer.processing_class,
        heldout_prompts(args.eval_prompts),
        max_new_tokens=trainer.args.max_completion_length,
        batch_size=16,
        seed=0,
        temperature=trainer.args.temperature,
    )
    result = {
        "mode": args.mode,
        "seed": args.seed,
        "argv": argv,
        "step_seconds": timer.times,
        "generated_tokens": [log["rollout/generated_tokens"] for log in logs],
        "kept_completion_tokens": [log["completions/mean_length"] * 4 for log in logs],
        "truncated_frac": [log.get("rollout/truncated_frac", 0.0) for log in logs],
        "saved_tokens_frac": [log.get("rollout/saved_tokens_frac", 0.0) for log in logs],
        "teacher_scoring_time": [log.get("rollout/teacher_scoring_time", 0.0) for log in logs],
        "heldout_reverse_kl": kl,
    }
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "argv"}))


def report(args) -> None:
    from trl_ltc.diagnostics import online_replay, summarize_online

    results = [json.loads(p.read_text()) for p in sorted(ROOT.glob("*/result.json"))]
    mean = statistics.fmean
    print("| run | generated tokens / step | s / step | truncated | held-out KL after |")
    print("|---|---|---|---|---|")
    for mode in ("release", "online"):
        rows = [r for r in results if r["mode"] == mode]
        for r in rows:
            print(
                f"| {mode} seed {r['seed']} | {mean(r['generated_tokens']):.1f} | {mean(r['step_seconds']):.1f} | "
                f"{mean(r['truncated_frac']):.2f} | {r['heldout_reverse_kl']:.4f} |"
            )
        if rows:
            kls = [r["heldout_reverse_kl"] for r in rows]
            print(
                f"| **{mode} mean** | {mean(mean(r['generated_tokens']) for r in rows):.1f} | "
                f"{mean(mean(r['step_seconds']) for r in rows):.1f} | "
                f"{mean(mean(r['truncated_frac']) for r in rows):.2f} | "
                f"{mean(kls):.4f} (min {min(kls):.4f}, max {max(kls):.4f}) |"
            )
    records = []
    for path in sorted(ROOT.glob("release-seed*/release_records.jsonl")):
        records += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if records:
        numbers = summarize_online(records, online_replay(records, check_tokens=args.check_tokens))
        print(f"\nReplay of the online rule on {len(records)} trajectories of the `release` runs:")
        print(json.dumps(numbers, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run_parser = sub.add_parser("run")
    run_parser.add_argument("--mode", choices=["release", "online"], required=True)
    run_parser.add_argument("--seed", type=int, default=0)
    run_parser.add_argument("--max_steps", type=int, default=10)
    run_parser.add_argument("--eval_prompts", type=int, default=32)
    run_parser.add_argument("--check_tokens", type=int, default=16)
    run_parser.add_argument("extra", nargs="*", help="more `trl-ltc distill` flags (after --)")
    report_parser = sub.add_parser("report")
    report_parser.add_argument("--check_tokens", type=int, default=16)
    args = parser.parse_args()
    run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    main()
