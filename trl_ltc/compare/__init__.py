"""`trl-ltc compare`: every supervision policy on one teacher/student pair, the same seeds, one table.

    trl-ltc compare                                      # configs/compare_quickstart.yaml, about an hour on CPU
    trl-ltc compare --seeds 0,1,2 --output_dir runs/cmp  # other seeds, another place
    trl-ltc compare --smoke --output_dir /tmp/cmp        # the same pipeline on tiny random models, ~1 minute
    trl-ltc compare --config configs/compare_qwen3.yaml  # the paper's comparison, on GPUs

For every policy of the config and every seed, one student is trained from the same initial student with the same
`trl-ltc distill` recipe; only the supervision fields of the policy differ. Runs of one seed share the training seed
(`seed`, and `release_seed` unless the policy sets it), hence the same prompts in the same order, the same LoRA
initialisation and the same generator state at the first rollout; only what the policies make of the rollouts differs
(from the second step on, each student samples its own completions). Every trained student, the untrained student and
the teacher are then evaluated on the same held-out problems with the same evaluation seed
(`trl_ltc.evaluation.evaluate_model`): held-out reverse KL(student || teacher) per token on the student's own samples
(exact over the vocabulary), answer accuracy (pass@1 over `num_samples` samples, math-verify), mean completion length.

Output (`output_dir`):

    runs/<policy>__seed<k>/   distill.yaml (the run's full recipe), the adapter or model, train.json, result.json
    reference/                student.json and teacher.json (the untrained student and the teacher)
    results.csv               one row per run and per reference
    results.md                mean +- std over seeds per policy, best in bold, reference rows, paired differences
    results.png               each metric by policy, one point per seed, reference lines
    curves.csv, curves.png    with `curves:`: each run evaluated along training, accuracy against compute (flops)

Runs resume: a run with `train.json` is not retrained, one with `result.json` not re-evaluated. Stored settings are
compared with the config's; a run made with other settings is an error (use another `--output_dir`), never silently
mixed into the table.

Config (YAML; `configs/compare_quickstart.yaml` and `configs/compare_qwen3.yaml` use every key):

    preset: quickstart          # the embedded SmolLM2 pair and the bundled math prompts (else set the models below)
    recipe: quickstart.yaml     # the `trl-ltc distill` recipe every run starts from (relative to this file)
    distill: {max_steps: 6}     # distill fields over the recipe, for every run (models, prompts, budget)
    launcher: null              # or "accelerate launch --config_file ...": train each run in that subprocess
    keep_models: true           # false: delete each run's weights once it is evaluated
    seeds: [0, 1]
    policies:                   # a name, or distill fields; a list value sweeps (one policy per value)
      - full
      - {supervision: fixed_prefix, fixed_prefix_length: [16, 32]}
      - release
    evaluation:                 # max_new_tokens, temperature (default: the runs'), batch_size, seed, backend, vllm
      datasets:                 # name, dataset, split, config, prompt_column, answer_column, prompt_as_chat,
        - {name: math, num_problems: 32, num_samples: 1}    # prompt_template, answer_type, num_problems, num_samples
    curves: {every: 20}         # evaluate along training (optional `datasets`, `target_gain`): matched compute
    output_dir: runs/compare_quickstart

Modules: `spec` (the config's dataclasses, constants and validation, `load_comparison`), `runner` (`train_run`,
`evaluate_target`, `collapse_diagnostics`, `run_comparison`) and `report` (tables, paired differences, `results.csv`,
`results.png`); every public name is importable from `trl_ltc.compare`. The command line is
`trl_ltc.commands.compare`.
"""

from .report import (  # noqa: F401 (re-exported)
    CSV_FIELDS,
    CURVE_FIELDS,
    METRICS,
    NOT_REACHED,
    PER_SET_FIELDS,
    Column,
    aggregate,
    collapse_markdown,
    matched_compute,
    paired_differences,
    plot_curves,
    plot_results,
    results_markdown,
    results_table,
    table_columns,
    write_csv,
    write_curves_csv,
    write_results,
)
from .runner import (  # noqa: F401 (re-exported)
    COLLAPSE_KEYS,
    CurveCallback,
    collapse_diagnostics,
    evaluate_target,
    run_comparison,
    summarize_sets,
    train_run,
)
from .spec import (  # noqa: F401 (re-exported)
    BACKENDS,
    BASELINE_FLOPS,
    COLLAPSE_FILE,
    CONFIG,
    CURVES_KEYS,
    DIAGNOSE_DIR,
    DIAGNOSTICS_KEYS,
    EVALUATION_KEYS,
    LAB_EVAL_SETS,
    MEDIAN_RELEASE,
    PLACEMENT_FIELDS,
    PRESETS,
    RECIPE_FILE,
    REFERENCE_LABELS,
    REFERENCES,
    RESULT_FILE,
    RUN_FIELDS,
    SMOKE_DIAGNOSTICS,
    SMOKE_DISTILL,
    SMOKE_DROP,
    SMOKE_EVAL_SET,
    SMOKE_EVALUATION,
    SMOKE_LAB_DISTILL,
    SMOKE_LAB_EVAL_SET,
    SUMMARY_METRICS,
    TOP_LEVEL_KEYS,
    TRAIN_FILE,
    CompareConfigError,
    Comparison,
    Curves,
    Diagnostics,
    EvalSet,
    Evaluation,
    Policy,
    Run,
    expand_policies,
    load_comparison,
    parse_seeds,
    recipe_path,
    release_settings,
)


def __getattr__(name):  # the command line, now in `trl_ltc.commands.compare`
    if name in ("build_parser", "main"):
        from ..commands import compare

        return getattr(compare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
