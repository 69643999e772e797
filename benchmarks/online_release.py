"""`release` vs `release` + `rollout_truncation="online"`: tokens, time and held-out quality, on two CPU benchmarks.

Quickstart pair (short completions):

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
`runs/bench_online/<mode>-seed<seed>/result.json`.

Lab pair (long completions: ~17 segments, ~133 tokens, at most 176):

    python benchmarks/online_release.py lab --seeds 0 1 --max_steps 20    # full, release, online per seed, in order
    python benchmarks/online_release.py lab-report                         # the table, mean [min, max] over seeds

Each seed trains `full`, `release` and `release` + online, in that order, from the same initial student on the same
prompts (the lab recipe `configs/lab.yaml`: full fine-tune, 16 prompts per step, `segmentation: newline`, advantage
loss; the online rule with its defaults), timing every step and its parts (`_StepClock`), then evaluates the student
on `--eval_problems` held-out lab problems: greedy accuracy, and pass@1 and the reverse KL on one sample per problem
(seed 1234). Results go to `runs/bench_online_lab/<mode>-seed<seed>/result.json`. Not a test.
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


# --------------------------------------------------------------------------------------------- lab: long completions

LAB_ROOT = Path("runs/bench_online_lab")
LAB_MODES = {  # run order within a seed
    "full": {"supervision": "full"},
    "release": {"supervision": "release"},
    "online": {"supervision": "release", "rollout_truncation": "online"},
}


class _StepClock:
    """Per-step time and its split, from timers around the trainer's methods (no change to the trainer).

    Every part is timed twice: wall time and this process's CPU time (`time.process_time`, with one torch thread the
    compute itself, much less sensitive than wall time to other processes on shared cores). `generation`:
    `_generate_and_score_completions`; `teacher_generation`: the teacher's block scoring inside it (online: its block
    forwards and chunked projections); `teacher_loss`: the teacher forward inside the loss; `student_loss`: the rest of
    `compute_loss` (student forward, signals, weights, loss); `backward`: the rest of `training_step`; `optimizer`: the
    rest of the step (clipping, optimizer step, scheduler, callbacks). Also counts the positions each backbone
    processes (padding included: it is computed): the teacher's in total, the student's in the loss.
    """

    active = None  # the clock of the step in progress

    def __init__(self, trainer):
        from trl_ltc import online

        self.trainer, self.steps, self.current = trainer, [], None
        self.teacher_positions = self.student_loss_positions = 0
        self.in_loss = False
        unwrap = trainer.accelerator.unwrap_model
        teacher, student = unwrap(trainer.teacher_model), unwrap(trainer.model)

        def count_teacher(_, args, kwargs):
            self.teacher_positions += kwargs["input_ids"].numel()

        def count_student(_, args, kwargs):
            if self.in_loss:
                self.student_loss_positions += kwargs["input_ids"].numel()

        teacher.base_model.register_forward_pre_hook(count_teacher, with_kwargs=True)
        student.base_model.register_forward_pre_hook(count_student, with_kwargs=True)
        self._wrap(trainer, "_generate_and_score_completions", "generation")
        self._wrap(trainer, "compute_loss", "compute_loss", in_loss=True)
        self._wrap(trainer, "training_step", "training_step")
        # the online teacher scoring: its block forwards and the chunked projections of their hidden states (patched
        # once per process, timed by the clock of the step in progress)
        if not hasattr(online, "_clocked"):
            online._clocked = True
            for owner, name in ((online.CachedForward, "__call__"), (online, "_project")):
                method = getattr(owner, name)

                def timed(*args, _method=method, **kwargs):
                    clock = _StepClock.active
                    if clock is None:
                        return _method(*args, **kwargs)
                    return clock._timed("teacher_generation", _method, *args, **kwargs)

                setattr(owner, name, timed)
        hidden = trainer._get_last_hidden_state

        def timed_hidden(model, *args, **kwargs):
            if model is not teacher:
                return hidden(model, *args, **kwargs)
            return self._timed("teacher_loss", hidden, model, *args, **kwargs)

        trainer._get_last_hidden_state = timed_hidden

    def _timed(self, part, function, *args, in_loss=False, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        self.in_loss = in_loss or self.in_loss
        try:
            return function(*args, **kwargs)
        finally:
            self.in_loss = False if in_loss else self.in_loss
            if self.current is not None:
                self.current[part][0] += time.perf_counter() - wall
                self.current[part][1] += time.process_time() - cpu

    def _wrap(self, trainer, name, part, in_loss=False):
        method = getattr(trainer, name)

        def timed(*args, **kwargs):
            return self._timed(part, method, *args, in_loss=in_loss, **kwargs)

        setattr(trainer, name, timed)

    def begin(self):
        parts = ("generation", "teacher_generation", "teacher_loss", "compute_loss", "training_step")
        self.current = {part: [0.0, 0.0] for part in parts}
        self.teacher_positions = self.student_loss_positions = 0
        self.start = time.perf_counter(), time.process_time()
        _StepClock.active = self

    def end(self):
        c = self.current
        record = {"teacher_positions": self.teacher_positions, "student_loss_positions": self.student_loss_positions}
        for index, prefix in ((0, ""), (1, "cpu_")):
            total = (time.perf_counter(), time.process_time())[index] - self.start[index]
            part = {name: value[index] for name, value in c.items()}
            record |= {
                f"{prefix}step": total,
                f"{prefix}generation_student": part["generation"] - part["teacher_generation"],
                f"{prefix}teacher": part["teacher_generation"] + part["teacher_loss"],
                f"{prefix}student_loss": part["compute_loss"] - part["teacher_loss"],
                f"{prefix}backward": part["training_step"] - part["generation"] - part["compute_loss"],
                f"{prefix}optimizer": total - part["training_step"],
            }
        self.steps.append(record)
        self.current, _StepClock.active = None, None


def lab_run(args) -> None:
    """Train `full`, `release` and `release` + online on the lab pair, seed by seed in that order, and evaluate."""
    import torch
    from transformers import TrainerCallback

    from trl_ltc.evaluation import evaluate_model
    from trl_ltc.lab import greedy_accuracy, prepare_lab_pair, problems

    torch.set_num_threads(args.threads)
    teacher_dir, student_dir = prepare_lab_pair(progress=False)
    test = problems("test", args.eval_problems)
    for mode in ("release", "online"):  # warm-up, not recorded: the first runs of a process pay one-time costs
        build_lab_trainer(teacher_dir, student_dir, LAB_ROOT / "warmup", 0, 2, LAB_MODES[mode]).train()
    for seed in args.seeds:
        for mode in args.modes:
            out = LAB_ROOT / f"{mode}-seed{seed}"
            if (out / "result.json").is_file():
                continue
            trainer = build_lab_trainer(teacher_dir, student_dir, out, seed, args.max_steps, LAB_MODES[mode])
            clock = _StepClock(trainer)

            class Clock(TrainerCallback):
                def on_step_begin(self, *_, **__):
                    clock.begin()

                def on_step_end(self, *_, **__):
                    clock.end()

            trainer.add_callback(Clock())
            trainer.train()
            logs = [log for log in trainer.state.log_history if "loss" in log]
            args_batch = trainer.args.per_device_train_batch_size
            student = trainer.accelerator.unwrap_model(trainer.model).eval()
            teacher = trainer.accelerator.unwrap_model(trainer.teacher_model)
            sampled = evaluate_model(
                student, teacher, trainer.processing_class, [p["prompt"] for p in test], [p["answer"] for p in test],
                max_new_tokens=trainer.args.max_completion_length, batch_size=64, seed=1234,
                answer_type="statement", progress=False,
            )  # fmt: skip
            result = {
                "mode": mode,
                "seed": seed,
                "steps": clock.steps,
                "generated_tokens": [log["rollout/generated_tokens"] for log in logs],
                "kept_tokens": [log["completions/mean_length"] * args_batch for log in logs],
                "truncated_frac": [log.get("rollout/truncated_frac", 0.0) for log in logs],
                "kept_token_frac": [log["release/kept_token_frac"] for log in logs],
                "greedy_accuracy": greedy_accuracy(student, trainer.processing_class, test),
                "pass1": sampled["accuracy"],
                "reverse_kl": sampled["reverse_kl"],
            }
            (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")
            print(json.dumps({k: v for k, v in result.items() if k != "steps"}), flush=True)


def lab_report(args) -> None:
    """Markdown table of the lab runs: mean [min, max] over seeds of each run's value; per-step numbers are the
    run's median over its steps after the first (robust to bursts of load from other processes on shared cores)."""
    results = [json.loads(p.read_text()) for p in sorted(LAB_ROOT.glob("*/result.json"))]
    mean = statistics.fmean

    def per_run(r, key):
        if key in ("generated_tokens", "kept_tokens", "truncated_frac", "kept_token_frac"):
            return mean(r[key])
        if key in ("greedy_accuracy", "pass1", "reverse_kl"):
            return r[key]
        return statistics.median(s[key] for s in r["steps"][1:] or r["steps"])

    rows = [
        ("generated tokens / step", "generated_tokens", "{:.0f}"),
        ("completion tokens in the training batch / step", "kept_tokens", "{:.0f}"),
        ("trajectories stopped early", "truncated_frac", "{:.2f}"),
        ("teacher forward positions / step", "teacher_positions", "{:.0f}"),
        ("student positions in the loss / step", "student_loss_positions", "{:.0f}"),
        ("s / step (wall)", "step", "{:.2f}"),
        ("CPU s / step", "cpu_step", "{:.2f}"),
    ]
    parts = [
        ("generation (student)", "generation_student"),
        ("teacher (block scoring + forward in the loss)", "teacher"),
        ("student forward + signals + loss", "student_loss"),
        ("backward", "backward"),
        ("optimizer and the rest", "optimizer"),
    ]
    rows += [(f"- {label} (CPU s)", f"cpu_{key}", "{:.3f}") for label, key in parts]
    rows += [
        ("held-out greedy accuracy", "greedy_accuracy", "{:.3f}"),
        ("held-out pass@1 (1 sample)", "pass1", "{:.3f}"),
        ("held-out reverse KL", "reverse_kl", "{:.4f}"),
    ]
    modes = [m for m in LAB_MODES if any(r["mode"] == m for r in results)]
    seeds = sorted({r["seed"] for r in results})
    print(f"seeds {seeds}; mean [min, max] over seeds\n")
    print("| | " + " | ".join(f"`{m}`" for m in modes) + " |")
    print("|---|" + "---|" * len(modes))
    values = {}
    for label, key, fmt in rows:
        cells = []
        for mode in modes:
            xs = [per_run(r, key) for r in results if r["mode"] == mode]
            values[mode, key] = mean(xs)
            cells.append(f"{fmt.format(mean(xs))} [{fmt.format(min(xs))}, {fmt.format(max(xs))}]")
        print(f"| {label} | " + " | ".join(cells) + " |")
    if {"release", "online"} <= set(modes):
        print()
        compared = [("release", "generated_tokens"), ("release", "teacher_positions"), ("release", "step")]
        compared += [("release", "cpu_step"), ("full", "step"), ("full", "cpu_step")]
        for other, key in compared:
            if other in modes:
                print(f"online vs {other}, {key}: {values['online', key] / values[other, key] - 1:+.1%}")
        for seed in seeds:  # paired by seed
            by = {r["mode"]: r for r in results if r["seed"] == seed}
            changes = [
                f"{key} {per_run(by['online'], key) / per_run(by[other], key) - 1:+.1%} vs {other}"
                for other in ("release", "full") if {other, "online"} <= by.keys() for key in ("step", "cpu_step")
            ]  # fmt: skip
            print(f"seed {seed}: " + ", ".join(changes))


def build_lab_trainer(teacher_dir: str, student_dir: str, out: Path, seed: int, max_steps: int, fields: dict):
    """The trainer of the lab recipe (`configs/lab.yaml`) with `fields` over it."""
    import yaml

    from trl_ltc.distill import build_trainer, recipe_args
    from trl_ltc.lab import lab_dataset_path

    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "configs" / "lab.yaml").read_text())
    recipe |= {
        "model_name_or_path": student_dir, "teacher_model_name_or_path": teacher_dir,
        "dataset_name": lab_dataset_path("train"), "output_dir": str(out), "max_steps": max_steps, "seed": seed,
        "release_seed": seed, "disable_tqdm": True, **fields,
    }  # fmt: skip
    return build_trainer(*recipe_args(recipe))


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
    lab_parser = sub.add_parser("lab")
    lab_parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    lab_parser.add_argument("--modes", nargs="+", choices=list(LAB_MODES), default=list(LAB_MODES))
    lab_parser.add_argument("--max_steps", type=int, default=20)
    lab_parser.add_argument("--eval_problems", type=int, default=256)
    lab_parser.add_argument("--threads", type=int, default=1)
    sub.add_parser("lab-report")
    args = parser.parse_args()
    commands = {"run": run, "report": report, "lab": lab_run, "lab-report": lab_report}
    commands[args.command](args)


if __name__ == "__main__":
    main()
