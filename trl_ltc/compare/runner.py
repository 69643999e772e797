"""Running a comparison: train each run (`train_run`), evaluate every student and the references
(`evaluate_target`), the collapse diagnostics of the untrained student, and the whole harness (`run_comparison`)."""

from __future__ import annotations

import gc
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import yaml
from transformers import TrainerCallback

from ..reporting import format_duration, mean_train_metrics
from .report import write_results
from .spec import (
    BASELINE_FLOPS,
    COLLAPSE_FILE,
    DIAGNOSE_DIR,
    MEDIAN_RELEASE,
    RECIPE_FILE,
    REFERENCE_LABELS,
    REFERENCES,
    RESULT_FILE,
    SUMMARY_METRICS,
    TRAIN_FILE,
    CompareConfigError,
    Comparison,
    EvalSet,
    Run,
    _evaluation_settings,
    release_settings,
)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def _check_settings(stored: dict, current: dict, where: Path) -> None:
    if stored == current:
        return
    changed = []
    for section in sorted(set(stored) | set(current)):
        a, b = stored.get(section) or {}, current.get(section) or {}
        for key in sorted(set(a) | set(b), key=str):
            if a.get(key) != b.get(key):
                changed.append(f"{section}.{key}: {a.get(key)!r} -> {b.get(key)!r}")
    raise CompareConfigError(
        f"{where} was made with other settings ({'; '.join(changed[:6])}). Use another --output_dir for the new "
        f"settings, or delete {where.parent} to redo it with them."
    )


def _recipe_args(path: Path):
    """The `trl-ltc distill` arguments of a recipe file, read as `trl-ltc distill --config path` reads it."""
    from ..distill import recipe_args

    return recipe_args(yaml.safe_load(Path(path).read_text()))


def train_run(run: Run, teacher=None, problems=None) -> dict:
    """Train one run; save its model (or adapter) into `run.directory`; return its training summary.

    In-process (no `launcher`) the trainer shares `teacher`; with a launcher, `trl-ltc distill` runs in that
    subprocess (e.g. `accelerate launch` over several GPUs) and the summary is read from its `trainer_state.json`.
    With `curves:` (in-process only) the student is evaluated along training (`CurveCallback`): `curve` in the
    summary, and its evaluation time is left out of `train_seconds`.
    """
    recipe = run.directory / RECIPE_FILE
    launcher = run.comparison.launcher
    start, curve = time.perf_counter(), None
    if launcher:
        command = [*launcher, "-m", "trl_ltc.distill", "--config", str(recipe)]
        print("  $ " + shlex.join(command), flush=True)
        subprocess.run(command, check=True)
        state = _read_json(run.directory / "trainer_state.json") or {}
        log_history, steps = state.get("log_history", []), state.get("global_step", 0)
        runtime = next((log["train_runtime"] for log in reversed(log_history) if "train_runtime" in log), None)
        train_seconds = runtime if runtime is not None else time.perf_counter() - start
    else:
        from ..distill import build_trainer

        trainer = build_trainer(*_recipe_args(recipe), teacher_model=teacher)
        if run.comparison.curves is not None:
            curve = CurveCallback(trainer, teacher, run.comparison, problems or _Problems(run.comparison.curve_sets))
            trainer.add_callback(curve)
        train_start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_start - (curve.eval_seconds if curve else 0.0)
        trainer.save_model(str(run.directory))
        log_history, steps = trainer.state.log_history, trainer.state.global_step
        del trainer
        gc.collect()
    metrics = mean_train_metrics(log_history)
    kept = metrics.get("release/kept_token_frac")
    # Supervised tokens over the run, from every logged step (exact with `logging_steps: 1`).
    trained = [
        log["rollout/generated_tokens"] * log.get("release/kept_token_frac", 1.0)
        for log in log_history
        if "loss" in log and "rollout/generated_tokens" in log
    ]
    compute = next((_compute_of(log) for log in reversed(log_history) if "compute/flops" in log), {})
    return {
        "steps": steps,
        **compute,
        **({"curve": curve.rows, "curve_seconds": round(curve.eval_seconds, 2)} if curve is not None else {}),
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": train_seconds / steps if steps else None,
        "kept_token_frac": kept,
        "tokens_trained": sum(trained) if trained else None,
        "train_metrics": metrics,
    }


COMPUTE_KEYS = ("generated_tokens", "teacher_tokens", "trained_tokens", "flops")


def _compute_of(log: dict) -> dict:
    """`{generated_tokens, teacher_tokens, trained_tokens, flops}` of a log entry's `compute/*` counters."""
    return {key: log[f"compute/{key}"] for key in COMPUTE_KEYS if f"compute/{key}" in log}


class CurveCallback(TrainerCallback):
    """Evaluates the training student every `curves.every` optimizer steps and at the last step, on the curve sets,
    with the compute counters of that step and the training wall time so far (evaluation time left out). The global
    random state is restored after each evaluation (`evaluate_model`), so the run trains as it would without curves.
    Registered after the trainer's own `ComputeCallback`, so the counters are those of the step just done."""

    def __init__(self, trainer, teacher, comparison: Comparison, problems):
        self.trainer, self.teacher, self.comparison, self.problems = trainer, teacher, comparison, problems
        self.rows, self.eval_seconds, self.start = [], 0.0, None

    def on_train_begin(self, args, state, control, **kwargs):
        self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        last = control.should_training_stop or state.global_step >= state.max_steps
        if state.global_step % self.comparison.curves.every and not last:
            return control
        wall = time.perf_counter() - self.start - self.eval_seconds
        eval_start = time.perf_counter()
        model, trainer = self.trainer.model, self.trainer
        training = model.training
        model.eval()
        try:
            per_set = evaluate_target(
                model, self.teacher, trainer.processing_class, self.comparison, self.problems,
                sets=self.comparison.curve_sets, release_prefix=False,
            )  # fmt: skip
        finally:
            model.train(training)
        self.eval_seconds += time.perf_counter() - eval_start
        compute = trainer.compute.metrics() if getattr(trainer, "compute", None) is not None else {}
        self.rows.append({
            "step": state.global_step, "wall_seconds": round(wall, 3), **_compute_of(compute),
            **summarize_sets(per_set), "eval": per_set,
        })  # fmt: skip
        summary = summarize_sets(per_set)
        print(
            f"    step {state.global_step}: {_headline(summary)}, {compute.get('compute/flops', 0):.3g} flops",
            flush=True,
        )
        return control


def _model_dtype(comparison: Comparison):
    from ..evaluation import resolve_device_dtype

    dtype = comparison.distill.get("dtype") or "auto"
    return resolve_device_dtype(None, dtype if dtype in ("float32", "bfloat16", "float16") else "auto")


def _vllm_rollouts(model_dir: str, tokenizer, prompts: list, comparison: Comparison, eval_set: EvalSet):
    from ..generation import sample_completions_vllm

    repeated = [prompt for prompt in prompts for _ in range(eval_set.num_samples)]
    evaluation = comparison.evaluation
    return sample_completions_vllm(
        model_dir,
        tokenizer,
        repeated,
        evaluation.max_new_tokens,
        temperature=evaluation.temperature,
        seed=evaluation.seed,
        llm_kwargs=evaluation.vllm,
    )


class _Problems:
    """The evaluation sets' problems, loaded once."""

    def __init__(self, sets: list[EvalSet]):
        self.sets, self._cache = sets, {}

    def __call__(self, eval_set: EvalSet) -> tuple[list, list]:
        if eval_set.name not in self._cache:
            from ..evaluation import load_eval_problems

            self._cache[eval_set.name] = load_eval_problems(
                eval_set.dataset, eval_set.split, eval_set.config, eval_set.prompt_column, eval_set.answer_column,
                eval_set.prompt_as_chat, eval_set.num_problems, eval_set.prompt_template,
            )  # fmt: skip
        return self._cache[eval_set.name]


def evaluate_target(
    model,
    teacher,
    tokenizer,
    comparison: Comparison,
    problems,
    model_dir: str | None = None,
    sets=None,
    release_prefix: bool | None = None,
) -> dict:
    """Metrics of one model on every evaluation set (`{set name: metrics}`), samples left out.

    `teacher=None` skips the KL (the teacher's own row, 0 by definition, is filled in by the caller). A set with
    `greedy: true` also gets `accuracy_greedy` (one greedy completion per problem); `evaluation.release_prefix` adds
    `reverse_kl_prefix`, the KL on the tokens the release rule keeps of each sample. `sets` (default: the
    evaluation's) and `release_prefix` (default: the evaluation's) serve the curves.
    """
    from ..evaluation import evaluate_model

    evaluation, results = comparison.evaluation, {}
    prefix = evaluation.release_prefix if release_prefix is None else release_prefix
    release = release_settings(comparison.distill) if prefix and teacher is not None else None
    for eval_set in evaluation.sets if sets is None else sets:
        prompts, answers = problems(eval_set)
        rollouts = None
        if evaluation.backend == "vllm":
            rollouts = _vllm_rollouts(model_dir, tokenizer, prompts, comparison, eval_set)
        common = dict(
            max_new_tokens=evaluation.max_new_tokens, batch_size=evaluation.batch_size,
            temperature=evaluation.temperature, seed=evaluation.seed, answer_type=eval_set.answer_type,
        )  # fmt: skip
        metrics = evaluate_model(
            model, teacher, tokenizer, prompts, answers, num_samples=eval_set.num_samples, rollouts=rollouts,
            release=release, **common,
        )  # fmt: skip
        metrics.pop("samples")
        if eval_set.greedy:
            greedy = evaluate_model(model, None, tokenizer, prompts, answers, do_sample=False, **common)
            metrics["accuracy_greedy"] = greedy["accuracy"]
        results[eval_set.name] = metrics
    return results


def summarize_sets(per_set: dict[str, dict]) -> dict:
    """A run's headline metrics: the unweighted mean over the evaluation sets (the paper's "Avg" column)."""

    def mean(name):
        values = [metrics.get(name) for metrics in per_set.values()]
        return None if any(v is None for v in values) or not values else statistics.fmean(values)

    return {name: mean(name) for name in SUMMARY_METRICS}


# ---------------------------------------------------------------------------------------------------------------
# The harness
# ---------------------------------------------------------------------------------------------------------------


class _Models:
    """The teacher (loaded once, shared by every in-process trainer and every evaluation)."""

    def __init__(self, comparison: Comparison, first_recipe: Path):
        self.comparison, self.first_recipe, self._teacher = comparison, first_recipe, None

    def teacher(self):
        if self._teacher is None:
            from ..distill import load_teacher

            print(f"Loading the teacher {self.comparison.teacher} ...", flush=True)
            _, training_args, model_args, _ = _recipe_args(self.first_recipe)
            self._teacher = load_teacher(training_args, model_args)
        return self._teacher


def collapse_diagnostics(comparison: Comparison, models: _Models) -> dict:
    """`trl-ltc diagnose` of the untrained student on the first training prompts, with the recipe's release settings;
    files in `<output_dir>/diagnose`, key numbers in its `collapse.json` (resumable), and `median_release`: the median
    over trajectories of the release position in tokens (the whole completion where no drop is accepted), which the
    `fixed_prefix_length: median_release` control takes."""
    from ..diagnostics import release_cut, summarize
    from ..evaluation import load_eval_problems, load_for_evaluation

    d, diag = comparison.distill, comparison.diagnostics
    out = comparison.output_dir / DIAGNOSE_DIR
    settings = {
        "student": comparison.student, "teacher": comparison.teacher, "dataset": d["dataset_name"],
        "max_completion_length": d.get("max_completion_length", 256), "temperature": d.get("temperature", 1.0),
        **asdict(diag), **release_settings(d),
    }  # fmt: skip
    stored = _read_json(out / COLLAPSE_FILE)
    if stored is not None:
        _check_settings({"diagnostics": stored["settings"]}, {"diagnostics": settings}, out / COLLAPSE_FILE)
        return stored
    print(f"Collapse diagnostics of the untrained student on {diag.num_prompts} training prompts ...", flush=True)
    prompts, _ = load_eval_problems(
        d["dataset_name"], d.get("dataset_train_split", "train"), d.get("dataset_config"),
        d.get("dataset_prompt_column", "prompt"), None, d.get("dataset_prompt_as_chat", False), diag.num_prompts,
    )  # fmt: skip
    device, dtype = _model_dtype(comparison)
    student, tokenizer = load_for_evaluation(comparison.student, dtype=dtype, device=device)
    release = release_settings(d)
    from ..diagnostics import diagnose

    diagnose(
        student, models.teacher(), tokenizer, prompts, out, top_k=release["top_k"],
        segmentation=release["segmentation"], segment_window=release["segment_window"],
        max_completion_length=settings["max_completion_length"], batch_size=diag.batch_size,
        temperature=settings["temperature"], seed=diag.seed,
    )  # fmt: skip
    del student
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines() if line.strip()]
    summary = summarize(records)
    collapse = {
        "settings": settings,
        MEDIAN_RELEASE: max(1, int(statistics.median_low(release_cut(r) for r in records))),
        **{k: summary.get(k) for k in COLLAPSE_KEYS},
    }
    (out / COLLAPSE_FILE).write_text(json.dumps(collapse, indent=2) + "\n")
    return collapse


COLLAPSE_KEYS = (
    "trajectories", "accepted_fraction", "accepted_frac_null", "accepted_frac_calibrated", "online_stopped_frac",
    "online_stopped_frac_calibrated", "margin_before_change", "margin_after_change", "kept_fraction_mean",
    "num_segments_mean", "completion_length_mean",
)  # fmt: skip


def run_comparison(comparison: Comparison, prepare_only: bool = False) -> dict:
    """Train and evaluate whatever is not done yet, then write results.csv, results.md and results.png.

    Returns `{"runs": [...], "references": {...}, "files": {...}}`. `prepare_only`: the reference rows, the collapse
    diagnostics and the curves' step 0 only (what parallel workers share, `run_parallel`); returns `{}`.
    """
    runs = comparison.runs()
    out = comparison.output_dir
    (out / "reference").mkdir(parents=True, exist_ok=True)
    models = _Models(comparison, out / "reference" / RECIPE_FILE)
    models.first_recipe.write_text(yaml.safe_dump(runs[0].distill_fields(placeholder=1), sort_keys=False))
    collapse = None
    if comparison.diagnostics is not None:
        collapse = collapse_diagnostics(comparison, models)
        comparison.resolved[MEDIAN_RELEASE] = collapse[MEDIAN_RELEASE]
    for run in runs:
        run.directory.mkdir(parents=True, exist_ok=True)
        try:
            (run.directory / RECIPE_FILE).write_text(yaml.safe_dump(run.distill_fields(), sort_keys=False))
        except CompareConfigError:  # `max_flops: full_flops`: written once the seed's `full` run is done
            pass
    problems = _Problems(comparison.evaluation.sets)
    start = time.perf_counter()
    eval_settings = _evaluation_settings(comparison.evaluation)

    # References: the untrained student and the teacher, once for all runs.
    references = {}
    for name in REFERENCES:
        path = out / "reference" / f"{name}.json"
        settings = {
            "model": comparison.student if name == "student" else comparison.teacher,
            "evaluation": eval_settings,
        }
        stored = _read_json(path)
        if stored is not None:
            _check_settings(stored["settings"], settings, path)
            references[name] = stored
            continue
        print(f"Evaluating the {REFERENCE_LABELS[name]} (reference row) ...", flush=True)
        teacher = models.teacher()
        if name == "teacher":
            per_set = evaluate_target(
                teacher, None, _tokenizer(comparison.teacher), comparison, problems, comparison.teacher
            )
            for metrics in per_set.values():
                metrics["reverse_kl"] = 0.0  # KL(teacher || teacher)
                if comparison.evaluation.release_prefix:
                    metrics["reverse_kl_prefix"] = 0.0
        else:
            from ..evaluation import load_for_evaluation

            device, dtype = _model_dtype(comparison)
            student, tokenizer = load_for_evaluation(comparison.student, dtype=dtype, device=device)
            per_set = evaluate_target(student, teacher, tokenizer, comparison, problems, comparison.student)
            del student
        references[name] = {"settings": settings, "eval": per_set, **summarize_sets(per_set)}
        path.write_text(json.dumps(references[name], indent=2) + "\n")
        print(f"  {REFERENCE_LABELS[name]}: {_headline(references[name])}", flush=True)

    curve_problems = curve_start = None
    if comparison.curves is not None:  # the curves' step 0: the untrained student on the curve sets
        curve_problems = _Problems(comparison.curve_sets)
        curve_start = _student_curve_point(comparison, models, curve_problems, references.get("student"))
    if prepare_only:
        return {}

    # Runs: train (unless train.json exists), evaluate (unless result.json exists).
    results, timed = [], []
    for index, run in enumerate(runs, 1):
        settings = run.settings()
        result_path, train_path = run.directory / RESULT_FILE, run.directory / TRAIN_FILE
        stored = _read_json(result_path)
        if stored is not None:
            _check_settings(stored["settings"], settings, result_path)
            results.append(stored)
            _resolve_baseline_flops(run, stored)
            continue
        run_start = time.perf_counter()
        label = f"[{index}/{len(runs)}] {run.policy.name} seed {run.seed}"
        train = _read_json(train_path)
        if train is not None:
            _check_settings(train["settings"], settings, train_path)
        else:
            print(f"{label}: training ({json.dumps(run.policy.fields)}) ...", flush=True)
            (run.directory / RECIPE_FILE).write_text(yaml.safe_dump(run.distill_fields(), sort_keys=False))
            teacher = None if comparison.launcher else models.teacher()
            train = {"settings": settings, **train_run(run, teacher, curve_problems)}
            train_path.write_text(json.dumps(train, indent=2, default=str) + "\n")
        _resolve_baseline_flops(run, train)
        print(f"{label}: evaluating ...", flush=True)
        result = {
            "policy": run.policy.name,
            "seed": run.seed,
            "fields": run.policy.fields,
            **{k: v for k, v in train.items() if k != "settings"},
        }
        eval_start = time.perf_counter()
        result["eval"] = _evaluate_run(run, models, problems)
        result.update(summarize_sets(result["eval"]))
        result["eval_seconds"] = round(time.perf_counter() - eval_start, 2)
        result["settings"] = settings
        result_path.write_text(json.dumps(result, indent=2, default=str) + "\n")
        if not comparison.keep_models:
            _drop_weights(run.directory)
        results.append(result)
        timed.append(time.perf_counter() - run_start)
        left = len(runs) - index
        eta = f"; about {format_duration(statistics.fmean(timed) * left)} left" if left else ""
        elapsed = format_duration(time.perf_counter() - start)
        print(f"{label}: {_headline(result)} ({format_duration(timed[-1])}; elapsed {elapsed}{eta})", flush=True)
    files = write_results(results, references, comparison, collapse, curve_start)
    return {"runs": results, "references": references, "files": files, "collapse": collapse}


def worker_groups(comparison: Comparison, workers: int) -> list[list[str]]:
    """The policies split into at most `workers` groups of about the same number of policies; the plain `full` policy
    and the policies whose `max_flops` is `full_flops` (they need its runs) stay in one group."""
    names = [p.name for p in comparison.policies]
    dependent = [p.name for p in comparison.policies if p.fields.get("max_flops") == BASELINE_FLOPS]
    baseline = next((p.name for p in comparison.policies if p.fields == {"supervision": "full"}), None)
    units = [[baseline, *dependent]] if baseline is not None else []
    units += [[n] for n in names if n != baseline and n not in dependent]
    groups: list[list[str]] = [[] for _ in range(max(1, min(workers, len(units))))]
    for unit in sorted(units, key=len, reverse=True):
        min(groups, key=len).extend(unit)
    return [sorted(group, key=names.index) for group in groups if group]


def run_parallel(comparison: Comparison, workers: int, smoke: bool = False) -> dict:
    """`run_comparison` with the runs spread over `workers` processes (`trl-ltc compare --policies ...`, one torch
    thread each): this process first evaluates the reference rows and runs the diagnostics they all share, then starts
    the workers on disjoint groups of policies (`worker_groups`), each logging to `<output_dir>/worker<k>.log`, and,
    once all are done, reads every stored run and writes the tables."""
    run_comparison(comparison, prepare_only=True)
    out, procs = comparison.output_dir, []
    seeds = ",".join(map(str, comparison.seeds))
    for index, group in enumerate(worker_groups(comparison, workers)):
        command = [
            sys.executable, "-m", "trl_ltc.cli", "compare", "--config", comparison.source, "--output_dir", str(out),
            "--seeds", seeds, "--policies", ",".join(group), "--num_threads", "1", *(["--smoke"] if smoke else []),
        ]  # fmt: skip
        log = open(out / f"worker{index}.log", "w")  # noqa: SIM115 (closed below)
        print(f"worker {index}: {', '.join(group)} (log: {out / f'worker{index}.log'})", flush=True)
        procs.append((subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log, index))
    failed = []
    for proc, log, index in procs:
        if proc.wait() != 0:
            failed.append(index)
        log.close()
    if failed:
        raise RuntimeError(f"worker(s) {failed} failed; see {', '.join(str(out / f'worker{i}.log') for i in failed)}.")
    return run_comparison(comparison)


def _resolve_baseline_flops(run: Run, train: dict) -> None:
    """After the baseline (`full`) run of a seed: its final flops, for `max_flops: full_flops` of the same seed."""
    if run.policy.fields == {"supervision": "full"} and train.get("flops") is not None:
        run.comparison.resolved.setdefault((BASELINE_FLOPS, run.seed), train["flops"])


def _student_curve_point(comparison: Comparison, models: _Models, problems, student_reference) -> dict:
    """Step 0 of every curve: the untrained student on the curve sets, zero compute (stored, resumable)."""
    eval_settings = _evaluation_settings(comparison.evaluation)
    sets = [asdict(s) for s in comparison.curve_sets]
    if comparison.curves.sets is None and student_reference is not None:
        per_set = student_reference["eval"]
    else:
        path = comparison.output_dir / "reference" / "student_curve.json"
        settings = {"model": comparison.student, "evaluation": eval_settings, "sets": sets}
        stored = _read_json(path)
        if stored is not None:
            _check_settings(stored["settings"], settings, path)
            per_set = stored["eval"]
        else:
            from ..evaluation import load_for_evaluation

            print("Evaluating the untrained student on the curve sets (step 0) ...", flush=True)
            device, dtype = _model_dtype(comparison)
            student, tokenizer = load_for_evaluation(comparison.student, dtype=dtype, device=device)
            per_set = evaluate_target(
                student, models.teacher(), tokenizer, comparison, problems, comparison.student,
                sets=comparison.curve_sets, release_prefix=False,
            )  # fmt: skip
            del student
            path.write_text(json.dumps({"settings": settings, "eval": per_set}, indent=2) + "\n")
    zero = dict.fromkeys(COMPUTE_KEYS, 0.0)
    return {"step": 0, "wall_seconds": 0.0, **zero, **summarize_sets(per_set), "eval": per_set}


def _tokenizer(path: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path)


def _evaluate_run(run: Run, models: _Models, problems) -> dict:
    from ..evaluation import load_for_evaluation

    device, dtype = _model_dtype(run.comparison)
    teacher = models.teacher()
    model, tokenizer = load_for_evaluation(str(run.directory), dtype=dtype, device=device)
    try:
        return evaluate_target(model, teacher, tokenizer, run.comparison, problems, str(run.directory))
    finally:
        del model
        gc.collect()


def _drop_weights(directory: Path) -> None:
    for pattern in ("*.safetensors", "*.bin", "*.pt"):
        for path in directory.glob(pattern):
            path.unlink()


def _headline(result: dict) -> str:
    parts = []
    if result.get("reverse_kl") is not None:
        parts.append(f"reverse KL {result['reverse_kl']:.4f}")
    if result.get("accuracy") is not None:
        parts.append(f"accuracy {100 * result['accuracy']:.1f}%")
    parts.append(f"length {result['completion_length']:.1f}")
    if result.get("seconds_per_step") is not None:
        parts.append(f"{result['seconds_per_step']:.1f} s/step")
    return ", ".join(parts)
