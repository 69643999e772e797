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
    output_dir: runs/compare_quickstart
"""

from __future__ import annotations

import csv
import gc
import itertools
import json
import math
import os
import shlex
import statistics
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .. import embedded, lab
from ..config import SUPERVISIONS
from ..reporting import format_duration

CONFIG = "compare_quickstart.yaml"
PRESETS = ("quickstart", "lab")
BACKENDS = ("transformers", "vllm")
TOP_LEVEL_KEYS = (
    "preset",
    "recipe",
    "distill",
    "launcher",
    "seeds",
    "policies",
    "evaluation",
    "output_dir",
    "keep_models",
    "diagnostics",
)
EVALUATION_KEYS = (
    "max_new_tokens", "temperature", "batch_size", "seed", "backend", "vllm", "datasets", "release_prefix",
)  # fmt: skip
DIAGNOSTICS_KEYS = ("num_prompts", "batch_size", "seed")
# A policy value resolved from the collapse diagnostics of the untrained student (`diagnostics:`).
MEDIAN_RELEASE = "median_release"
# Fields a policy may not set: they are what the harness itself varies or places.
RUN_FIELDS = ("seed", "output_dir", "run_name")
# Keys of the stored settings that do not change a run's result (where it lives).
PLACEMENT_FIELDS = ("output_dir", "run_name", "logging_dir")
REFERENCES = ("student", "teacher")
REFERENCE_LABELS = {"student": "student (untrained)", "teacher": "teacher"}
TRAIN_FILE, RESULT_FILE, RECIPE_FILE = "train.json", "result.json", "distill.yaml"

# `--smoke`: the config's pipeline on tiny random models, bundled prompts, one short step per run.
SMOKE_DISTILL = {
    "dtype": "float32",
    "bf16": False,
    "use_vllm": False,
    "use_cpu": True,
    "gradient_checkpointing": False,
    "max_steps": 1,
    "per_device_train_batch_size": 2,
    "gradient_accumulation_steps": 1,
    "max_completion_length": 8,
    "segmentation": "fixed",
    "segment_window": 3,
    "logging_steps": 1,
    "save_strategy": "no",
    "report_to": "none",
    "release_diagnostics_steps": 0,
    "dataset_prompt_column": "prompt",
    "dataset_prompt_as_chat": False,
    "dataset_train_split": "train",
}
SMOKE_DROP = ("vllm_max_model_length", "teacher_model_init_kwargs", "model_init_kwargs", "attn_implementation")
SMOKE_EVALUATION = {"max_new_tokens": 8, "batch_size": 4, "backend": "transformers"}
SMOKE_EVAL_SET = {"num_problems": 4, "num_samples": 1, "split": "train", "config": None, "prompt_column": "prompt"}
SMOKE_EVAL_SET |= {"answer_column": "answer", "prompt_as_chat": False, "answer_type": "math", "prompt_template": None}
# `--smoke` with `preset: lab`: a tiny lab pair and the lab's own splits, long enough for a few lines per completion.
SMOKE_LAB_DISTILL = {"max_completion_length": 24, "segmentation": "newline"}
SMOKE_LAB_EVAL_SET = {"num_problems": 4, "num_samples": 2}
SMOKE_DIAGNOSTICS = {"num_prompts": 4, "batch_size": 4}
# `preset: lab` without `evaluation.datasets`: the in-domain held-out split and the longer-chain one.
LAB_EVAL_SETS = [
    {"name": "in_domain", "dataset": "lab:test", "num_problems": 256, "num_samples": 4, "greedy": True},
    {"name": "ood", "dataset": "lab:ood", "num_problems": 128, "num_samples": 4, "greedy": True},
]


class CompareConfigError(ValueError):
    """The comparison config is invalid; the message names the field and the fix."""


# ---------------------------------------------------------------------------------------------------------------
# The config
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Policy:
    """One row of the table: a name and the distill fields that make it (`{"supervision": "release"}`)."""

    name: str
    fields: dict


@dataclass
class EvalSet:
    """Held-out problems (`trl_ltc.evaluation.load_eval_problems`) and how they are scored."""

    name: str
    dataset: str
    split: str = "train"
    config: str | None = None
    prompt_column: str = "prompt"
    answer_column: str = "answer"
    prompt_as_chat: bool = False
    answer_type: str = "math"
    num_problems: int | None = None
    num_samples: int = 1
    prompt_template: str | None = None
    greedy: bool = False  # also decode greedily once per problem: `accuracy_greedy`


@dataclass
class Evaluation:
    sets: list[EvalSet]
    max_new_tokens: int
    temperature: float
    batch_size: int = 8
    seed: int = 0
    backend: str = "transformers"
    vllm: dict = field(default_factory=dict)
    release_prefix: bool = False  # also the reverse KL on the release prefix of each sample: `reverse_kl_prefix`


@dataclass
class Diagnostics:
    """Collapse diagnostics of the untrained student on the first `num_prompts` training prompts (`trl-ltc
    diagnose` with the recipe's release settings), written to `<output_dir>/diagnose`."""

    num_prompts: int = 128
    batch_size: int = 32
    seed: int = 0


@dataclass
class Comparison:
    """A resolved comparison: the merged distill recipe, the policies, the seeds, the evaluation, where it goes."""

    distill: dict
    policies: list[Policy]
    seeds: list[int]
    evaluation: Evaluation
    output_dir: Path
    launcher: list[str] | None = None
    keep_models: bool = True
    source: str = ""
    diagnostics: Diagnostics | None = None
    resolved: dict = field(default_factory=dict)  # `median_release` once the diagnostics have run

    @property
    def student(self) -> str:
        return self.distill["model_name_or_path"]

    @property
    def teacher(self) -> str:
        return self.distill["teacher_model_name_or_path"]

    def runs(self) -> list[Run]:
        """Every (policy, seed), seed-major: a partial comparison holds whole seeds first."""
        return [Run(policy, seed, self) for seed in self.seeds for policy in self.policies]


@dataclass
class Run:
    policy: Policy
    seed: int
    comparison: Comparison

    @property
    def name(self) -> str:
        return f"{self.policy.name}__seed{self.seed}"

    @property
    def directory(self) -> Path:
        return self.comparison.output_dir / "runs" / self.name

    def distill_fields(self, placeholder: int | None = None) -> dict:
        """The full `trl-ltc distill` recipe of this run: base, then the policy, then seed and placement.

        `median_release` values take the diagnostics' value (`placeholder` until the diagnostics have run)."""
        fields = {**self.comparison.distill, **self.policy.fields}
        for key, value in fields.items():
            if value == MEDIAN_RELEASE:
                resolved = self.comparison.resolved.get(MEDIAN_RELEASE, placeholder)
                if resolved is None:
                    raise CompareConfigError(
                        f"policy {self.policy.name!r}: `{key}: {MEDIAN_RELEASE}` is not resolved yet: the collapse "
                        "diagnostics of the untrained student must run first."
                    )
                fields[key] = resolved
        fields["seed"] = self.seed
        if "release_seed" not in self.policy.fields:
            fields["release_seed"] = self.seed
        fields["output_dir"] = str(self.directory)
        fields["run_name"] = self.name
        return fields

    def settings(self) -> dict:
        """What the result depends on (stored with it, compared on resume)."""
        fields = {k: v for k, v in self.distill_fields().items() if k not in PLACEMENT_FIELDS}
        return {"distill": fields, "evaluation": _evaluation_settings(self.comparison.evaluation)}


def _evaluation_settings(evaluation: Evaluation) -> dict:
    return json.loads(json.dumps(asdict(evaluation)))


def recipe_path(name: str = CONFIG) -> str:
    """`configs/<name>` of the source tree, else (non-editable install) its identical copy in the package."""
    from ..quickstart import recipe_path as find

    return find(name)


def _fail(where: str, message: str) -> None:
    raise CompareConfigError(f"{where}: {message}")


def _positive_int(where: str, value, allow_none: bool = False) -> int | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        _fail(where, f"must be a positive integer; got {value!r}.")
    return value


def expand_policies(entries) -> list[Policy]:
    """The policies of the config's `policies` list.

    An entry is a policy name (`release`: `{"supervision": "release"}`) or a mapping of distill fields with a
    `supervision` and an optional `name`. A list value sweeps: `{supervision: fixed_prefix, fixed_prefix_length: [24,
    48]}` gives `fixed_prefix-24` and `fixed_prefix-48` (several lists: every combination). Without `name`, a policy is
    named by its supervision and its other values in order (`token_teachability-entropy`); with one, by the name and
    the swept values.
    """
    if not isinstance(entries, list) or not entries:
        _fail("policies", f"must be a non-empty list of policy names or mappings; got {entries!r}.")
    policies: dict[str, Policy] = {}
    for index, entry in enumerate(entries):
        where = f"policies[{index}]"
        if isinstance(entry, str):
            entry = {"supervision": entry}
        if not isinstance(entry, dict):
            _fail(where, f"must be a policy name or a mapping of distill fields; got {entry!r}.")
        entry = dict(entry)
        name = entry.pop("name", None)
        if "supervision" not in entry:
            _fail(where, f"has no `supervision`; add one of {', '.join(SUPERVISIONS)}.")
        for key in RUN_FIELDS:
            if key in entry:
                _fail(
                    where, f"sets `{key}`, which the comparison sets for every run; remove it (seeds go in `seeds`)."
                )
        swept = [key for key, value in entry.items() if isinstance(value, list)]
        for key in swept:
            if not entry[key]:
                _fail(f"{where}.{key}", "is an empty list; give at least one value to sweep.")
        for values in itertools.product(*(entry[key] for key in swept)):
            fields = {**entry, **dict(zip(swept, values))}
            if fields["supervision"] not in SUPERVISIONS:
                _fail(
                    f"{where}.supervision",
                    f"unknown policy {fields['supervision']!r}; choose one of {', '.join(SUPERVISIONS)}.",
                )
            if name is None:
                parts = [fields["supervision"], *(str(v) for k, v in fields.items() if k != "supervision")]
            else:
                parts = [str(name), *(str(v) for v in values)]
            label = "-".join(parts)
            if label in policies:
                _fail(where, f"policy {label!r} appears twice; give one of them a different `name`.")
            if not label or any(c in label for c in "/\\") or label.startswith("."):
                _fail(where, f"{label!r} cannot name a run directory; set `name`.")
            policies[label] = Policy(label, fields)
    return list(policies.values())


def parse_seeds(value, where: str = "seeds") -> list[int]:
    """Seeds from a YAML list or a comma-separated string; at least one, integers, no duplicates."""
    if isinstance(value, str):
        items = [item.strip() for item in value.split(",") if item.strip()]
        try:
            value = [int(item) for item in items]
        except ValueError:
            _fail(where, f"must be comma-separated integers such as 0,1,2; got {','.join(items)!r}.")
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, list) or not value:
        _fail(where, "is empty: give at least one seed, e.g. `seeds: [0, 1, 2]` or `--seeds 0,1,2`.")
    if any(isinstance(v, bool) or not isinstance(v, int) for v in value):
        _fail(where, f"must be integers; got {value!r}.")
    if len(set(value)) != len(value):
        _fail(where, f"has duplicates: {value!r}.")
    return list(value)


def _eval_sets(raw, preset: str | None) -> list[EvalSet]:
    if raw is None:
        raw = LAB_EVAL_SETS if preset == "lab" else [{"name": "math"}] if preset else None
    if not isinstance(raw, list) or not raw:
        _fail(
            "evaluation.datasets", "must be a non-empty list of held-out sets ({name, dataset, answer_column, ...})."
        )
    sets, known = [], {f.name for f in EvalSet.__dataclass_fields__.values()}
    for index, entry in enumerate(raw):
        where = f"evaluation.datasets[{index}]"
        if not isinstance(entry, dict):
            _fail(where, f"must be a mapping with at least `dataset`; got {entry!r}.")
        unknown = set(entry) - known
        if unknown:
            _fail(where, f"unknown keys {sorted(unknown)}; allowed: {sorted(known)}.")
        entry = dict(entry)
        if entry.get("dataset") is None:
            if preset != "quickstart":
                _fail(where, "has no `dataset` (a local file, a directory or a `datasets` name).")
            entry["dataset"] = embedded.quickstart_dataset_path("test")
        if str(entry["dataset"]).startswith("lab:"):  # a split of the lab task: statement answers, text prompts
            entry["dataset"] = lab.lab_dataset_path(_lab_split(where, str(entry["dataset"])))
            entry.setdefault("answer_type", "statement")
        entry.setdefault("name", Path(str(entry["dataset"])).stem)
        eval_set = EvalSet(**entry)
        _positive_int(f"{where}.num_problems", eval_set.num_problems, allow_none=True)
        _positive_int(f"{where}.num_samples", eval_set.num_samples)
        from ..evaluation import ANSWER_TYPES

        if eval_set.answer_type not in ANSWER_TYPES:
            _fail(f"{where}.answer_type", f"must be one of {', '.join(ANSWER_TYPES)}; got {eval_set.answer_type!r}.")
        sets.append(eval_set)
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        _fail("evaluation.datasets", f"names must differ; got {names}.")
    return sets


def _lab_split(where: str, dataset: str) -> str:
    split = dataset.removeprefix("lab:")
    if split not in lab.SPLITS:
        _fail(f"{where}.dataset", f"unknown lab split {split!r}; use one of {', '.join('lab:' + s for s in lab.SPLITS)}.")
    return split


def _diagnostics(raw, smoke: bool) -> Diagnostics | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        _fail("diagnostics", f"must be a mapping ({', '.join(DIAGNOSTICS_KEYS)}); got {raw!r}.")
    unknown = set(raw) - set(DIAGNOSTICS_KEYS)
    if unknown:
        _fail("diagnostics", f"unknown keys {sorted(unknown)}; allowed: {', '.join(DIAGNOSTICS_KEYS)}.")
    diagnostics = Diagnostics(**{**raw, **(SMOKE_DIAGNOSTICS if smoke else {})})
    _positive_int("diagnostics.num_prompts", diagnostics.num_prompts)
    _positive_int("diagnostics.batch_size", diagnostics.batch_size)
    return diagnostics


def _load_yaml(path: Path, what: str) -> dict:
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise CompareConfigError(f"{what} {path} does not exist.") from None
    except yaml.YAMLError as error:
        raise CompareConfigError(f"{what} {path} is not valid YAML: {error}") from None
    if not isinstance(data, dict):
        raise CompareConfigError(f"{what} {path} must be a mapping of keys to values.")
    return data


def _find_recipe(name: str, config_path: Path) -> Path:
    candidates = [Path(name).expanduser()] if Path(name).expanduser().is_absolute() else []
    candidates += [config_path.parent / name, Path(name)]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    _fail("recipe", f"{name!r} not found next to {config_path} nor in {Path.cwd()}.")


def load_comparison(
    path: str | os.PathLike,
    seeds=None,
    output_dir: str | os.PathLike | None = None,
    smoke: bool = False,
    policies: list[str] | None = None,
) -> Comparison:
    """Read and check a comparison config (module docstring); `seeds`, `output_dir` and `policies` (names to keep)
    override it. `smoke` swaps in the tiny random pair (built under `output_dir`) and the bundled prompts, and
    shrinks every run and evaluation to seconds. Models are not loaded here (the quickstart pair is built, once)."""
    path = Path(path)
    raw = _load_yaml(path, "Comparison config")
    unknown = set(raw) - set(TOP_LEVEL_KEYS)
    if unknown:
        _fail(str(path), f"unknown keys {sorted(unknown)}; allowed: {', '.join(TOP_LEVEL_KEYS)}.")
    preset = raw.get("preset")
    if preset is not None and preset not in PRESETS:
        _fail("preset", f"unknown preset {preset!r}; available: {', '.join(PRESETS)} (or leave it out).")
    distill: dict = {}
    if raw.get("recipe") is not None:
        distill.update(_load_yaml(_find_recipe(str(raw["recipe"]), path), "Recipe"))
    out = Path(output_dir or raw.get("output_dir") or "runs/compare")
    if smoke and preset == "lab":
        teacher_dir, student_dir = lab.prepare_lab_pair(pair=lab.SMOKE_PAIR, directory=out / "smoke_models" / "lab")
        distill.update(model_name_or_path=student_dir, teacher_model_name_or_path=teacher_dir)
        distill["dataset_name"] = lab.lab_dataset_path("train")
    elif smoke:
        teacher_dir, student_dir = embedded.prepare_tiny_pair(out / "smoke_models")
        distill.update(model_name_or_path=student_dir, teacher_model_name_or_path=teacher_dir)
        distill["dataset_name"] = embedded.quickstart_dataset_path("train")
    elif preset == "lab":
        print(f"Preparing the lab teacher and student in {embedded.cache_root()} ...", flush=True)
        teacher_dir, student_dir = lab.prepare_lab_pair()
        distill.update(model_name_or_path=student_dir, teacher_model_name_or_path=teacher_dir)
        distill["dataset_name"] = lab.lab_dataset_path("train")
    elif preset == "quickstart":
        print(f"Preparing the quickstart teacher and student in {embedded.cache_root()} ...", flush=True)
        teacher_dir, student_dir = embedded.prepare_smollm2_pair()
        distill.update(model_name_or_path=student_dir, teacher_model_name_or_path=teacher_dir)
        distill["dataset_name"] = embedded.quickstart_dataset_path("train")
    overrides = raw.get("distill") or {}
    if not isinstance(overrides, dict):
        _fail("distill", f"must be a mapping of `trl-ltc distill` fields; got {overrides!r}.")
    for key in RUN_FIELDS:
        if key in overrides:
            _fail(f"distill.{key}", "is set by the comparison for every run; remove it (seeds go in `seeds`).")
    distill.update(overrides)
    if smoke:
        distill.update(SMOKE_DISTILL)
        if preset == "lab":
            distill.update(SMOKE_LAB_DISTILL)
        for key in SMOKE_DROP:
            distill.pop(key, None)
    for key, flag in (("model_name_or_path", "the student"), ("teacher_model_name_or_path", "the teacher")):
        if not distill.get(key):
            _fail(
                f"distill.{key}",
                f"{flag} is missing: set `{key}` in the recipe or in `distill:` (a Hub id or a local directory), or "
                "use `preset: quickstart`.",
            )
    if not distill.get("dataset_name") and not distill.get("datasets"):
        _fail(
            "distill.dataset_name", "the training prompts are missing: set `dataset_name` in the recipe or `distill:`."
        )

    policy_list = expand_policies(raw.get("policies"))
    if policies:
        names = {p.name for p in policy_list}
        missing = [name for name in policies if name not in names]
        if missing:
            _fail("--policies", f"unknown {missing}; the config's policies are {sorted(names)}.")
        policy_list = [p for p in policy_list if p.name in policies]
    seed_list = parse_seeds(seeds if seeds is not None else raw.get("seeds", [0]), "--seeds" if seeds else "seeds")

    evaluation_raw = raw.get("evaluation") or {}
    if not isinstance(evaluation_raw, dict):
        _fail("evaluation", f"must be a mapping; got {evaluation_raw!r}.")
    unknown = set(evaluation_raw) - set(EVALUATION_KEYS)
    if unknown:
        _fail("evaluation", f"unknown keys {sorted(unknown)}; allowed: {', '.join(EVALUATION_KEYS)}.")
    sets = _eval_sets(evaluation_raw.get("datasets"), preset or ("quickstart" if smoke else None))
    evaluation_fields = {k: v for k, v in evaluation_raw.items() if k != "datasets"}
    if smoke and preset == "lab":
        sets = [EvalSet(**{**asdict(s), **SMOKE_LAB_EVAL_SET}) for s in sets]
        evaluation_fields.update(SMOKE_EVALUATION, max_new_tokens=SMOKE_LAB_DISTILL["max_completion_length"])
    elif smoke:
        sets = [
            EvalSet(**{**asdict(s), **SMOKE_EVAL_SET, "dataset": embedded.quickstart_dataset_path("test")})
            for s in sets
        ]
        evaluation_fields.update(SMOKE_EVALUATION)
    evaluation_fields.setdefault("max_new_tokens", distill.get("max_completion_length", 256))
    evaluation_fields.setdefault("temperature", distill.get("temperature", 1.0))
    evaluation = Evaluation(sets=sets, **evaluation_fields)
    _positive_int("evaluation.max_new_tokens", evaluation.max_new_tokens)
    _positive_int("evaluation.batch_size", evaluation.batch_size)
    if not isinstance(evaluation.temperature, (int, float)) or not evaluation.temperature > 0:
        _fail("evaluation.temperature", f"must be > 0; got {evaluation.temperature!r}.")
    if evaluation.backend not in BACKENDS:
        _fail("evaluation.backend", f"must be one of {', '.join(BACKENDS)}; got {evaluation.backend!r}.")

    launcher = None if smoke else raw.get("launcher")
    if launcher is not None and not isinstance(launcher, (str, list)):
        _fail(
            "launcher", f"must be a command prefix such as 'accelerate launch --config_file X.yaml'; got {launcher!r}."
        )
    if isinstance(launcher, str):
        launcher = shlex.split(launcher)
    comparison = Comparison(
        distill=distill,
        policies=policy_list,
        seeds=seed_list,
        evaluation=evaluation,
        output_dir=out,
        launcher=launcher or None,
        keep_models=bool(raw.get("keep_models", True)),
        source=str(path),
        diagnostics=_diagnostics(raw.get("diagnostics"), smoke),
    )
    if comparison.diagnostics is None:
        for policy in policy_list:
            if MEDIAN_RELEASE in policy.fields.values():
                _fail(
                    f"policy {policy.name!r}",
                    f"uses `{MEDIAN_RELEASE}`, which the collapse diagnostics of the untrained student resolve; add a "
                    "`diagnostics:` section (e.g. `diagnostics: {num_prompts: 128}`).",
                )
    _check_runs(comparison)
    return comparison


def _check_runs(comparison: Comparison) -> None:
    """Parse every run's recipe as `trl-ltc distill` will, so that a bad field fails now, not an hour in."""
    import tempfile

    from ..distill import parse_args

    with tempfile.TemporaryDirectory() as scratch:
        for policy in comparison.policies:
            run = Run(policy, comparison.seeds[0], comparison)
            recipe = Path(scratch) / f"{policy.name}.yaml"
            recipe.write_text(yaml.safe_dump(run.distill_fields(placeholder=1), sort_keys=False))
            try:
                parse_args(["--config", str(recipe)])
            except (ValueError, TypeError) as error:
                raise CompareConfigError(f"policy {policy.name!r} ({policy.fields}): {error}") from None
            except SystemExit:
                raise CompareConfigError(
                    f"policy {policy.name!r} ({policy.fields}): invalid distill fields."
                ) from None


# ---------------------------------------------------------------------------------------------------------------
# Training and evaluation of one run
# ---------------------------------------------------------------------------------------------------------------


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


def train_run(run: Run, teacher=None) -> dict:
    """Train one run; save its model (or adapter) into `run.directory`; return its training summary.

    In-process (no `launcher`) the trainer shares `teacher`; with a launcher, `trl-ltc distill` runs in that
    subprocess (e.g. `accelerate launch` over several GPUs) and the summary is read from its `trainer_state.json`.
    """
    from ..reporting import mean_train_metrics

    recipe = run.directory / RECIPE_FILE
    launcher = run.comparison.launcher
    start = time.perf_counter()
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

        trainer, _ = build_trainer(["--config", str(recipe)], teacher_model=teacher)
        train_start = time.perf_counter()
        trainer.train()
        train_seconds = time.perf_counter() - train_start
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
    return {
        "steps": steps,
        "train_seconds": round(train_seconds, 2),
        "seconds_per_step": train_seconds / steps if steps else None,
        "kept_token_frac": kept,
        "tokens_trained": sum(trained) if trained else None,
        "train_metrics": metrics,
    }


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


def release_settings(distill: dict) -> dict:
    """The release rule's settings of a recipe (`release_prefix_mask` / `trl-ltc diagnose` arguments)."""
    return {
        "top_k": distill.get("release_top_k", 10),
        "segmentation": distill.get("segmentation", "nltk"),
        "segment_window": distill.get("segment_window", 64),
    }


def evaluate_target(model, teacher, tokenizer, comparison: Comparison, problems, model_dir: str | None = None) -> dict:
    """Metrics of one model on every evaluation set (`{set name: metrics}`), samples left out.

    `teacher=None` skips the KL (the teacher's own row, 0 by definition, is filled in by the caller). A set with
    `greedy: true` also gets `accuracy_greedy` (one greedy completion per problem); `evaluation.release_prefix` adds
    `reverse_kl_prefix`, the KL on the tokens the release rule keeps of each sample.
    """
    from ..evaluation import evaluate_model

    evaluation, results = comparison.evaluation, {}
    release = release_settings(comparison.distill) if evaluation.release_prefix and teacher is not None else None
    for eval_set in evaluation.sets:
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


SUMMARY_METRICS = ("reverse_kl", "reverse_kl_prefix", "accuracy", "accuracy_greedy", "completion_length", "truncated_frac")


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
            self._teacher = load_teacher(["--config", str(self.first_recipe)])
        return self._teacher


DIAGNOSE_DIR, COLLAPSE_FILE = "diagnose", "collapse.json"


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
    "trajectories", "accepted_fraction", "accepted_frac_null", "margin_before_change", "margin_after_change",
    "kept_fraction_mean", "num_segments_mean", "completion_length_mean",
)  # fmt: skip


def run_comparison(comparison: Comparison) -> dict:
    """Train and evaluate whatever is not done yet, then write results.csv, results.md and results.png.

    Returns `{"runs": [...], "references": {...}, "files": {...}}`.
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
        (run.directory / RECIPE_FILE).write_text(yaml.safe_dump(run.distill_fields(), sort_keys=False))
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

    # Runs: train (unless train.json exists), evaluate (unless result.json exists).
    results, timed = [], []
    for index, run in enumerate(runs, 1):
        settings = run.settings()
        result_path, train_path = run.directory / RESULT_FILE, run.directory / TRAIN_FILE
        stored = _read_json(result_path)
        if stored is not None:
            _check_settings(stored["settings"], settings, result_path)
            results.append(stored)
            continue
        run_start = time.perf_counter()
        label = f"[{index}/{len(runs)}] {run.policy.name} seed {run.seed}"
        train = _read_json(train_path)
        if train is not None:
            _check_settings(train["settings"], settings, train_path)
        else:
            print(f"{label}: training ({json.dumps(run.policy.fields)}) ...", flush=True)
            teacher = None if comparison.launcher else models.teacher()
            train = {"settings": settings, **train_run(run, teacher)}
            train_path.write_text(json.dumps(train, indent=2, default=str) + "\n")
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
    files = write_results(results, references, comparison, collapse)
    return {"runs": results, "references": references, "files": files, "collapse": collapse}


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


# ---------------------------------------------------------------------------------------------------------------
# Tables and plot
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """A metric column: where its value is, how it is shown, and which mean is best (`"min"`, `"max"` or `None`)."""

    key: str
    header: str
    scale: float = 1.0
    digits: int = 1
    better: str | None = None
    eval_set: str | None = None  # a per-set metric of `result["eval"]`; else a top-level one
    training: bool = False  # only trained runs have it (no value on the reference rows)

    def value(self, result: dict):
        if self.eval_set is None:
            return result.get(self.key)
        return (result.get("eval") or {}).get(self.eval_set, {}).get(self.key)

    @property
    def title(self) -> str:
        return self.header + {"min": " ↓", "max": " ↑"}.get(self.better, "")


METRICS = (
    Column("reverse_kl", "held-out reverse KL", digits=4, better="min"),
    Column("reverse_kl_prefix", "reverse KL on the release prefix", digits=4, better="min"),
    Column("accuracy", "accuracy (%)", scale=100.0, better="max"),
    Column("accuracy_greedy", "greedy accuracy (%)", scale=100.0, better="max"),
    Column("completion_length", "completion length"),
    Column("kept_token_frac", "kept tokens (%)", scale=100.0, training=True),
    Column("tokens_trained", "tokens trained (k)", scale=1e-3, training=True),
    Column("seconds_per_step", "s/step", training=True),
)


def table_columns(results: list[dict], set_names: list[str]) -> list[Column]:
    """The table's metric columns, those that some run has; with several evaluation sets, one accuracy column per
    set (and one greedy accuracy column per set that has it) before the averages."""
    columns = []
    for column in METRICS:
        if column.key in ("reverse_kl_prefix", "accuracy_greedy", "tokens_trained") and all(
            column.value(r) is None for r in results
        ):
            continue
        if column.key in ("accuracy", "accuracy_greedy") and len(set_names) > 1:
            kind = "" if column.key == "accuracy" else " greedy"
            per_set = [Column(column.key, f"{n}{kind} (%)", 100.0, 1, "max", eval_set=n) for n in set_names]
            columns += [c for c in per_set if any(c.value(r) is not None for r in results)]
            column = Column(column.key, f"average{kind} accuracy (%)", 100.0, 1, "max")
        columns.append(column)
    return columns


def aggregate(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """`(mean, sample standard deviation (n - 1), n)` of the non-missing values; std is `None` below two values."""
    present = [float(v) for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not present:
        return None, None, 0
    std = statistics.stdev(present) if len(present) > 1 else None
    return statistics.fmean(present), std, len(present)


def _cell(mean, std, scale: float, digits: int, signed: bool = False) -> str:
    if mean is None:
        return "–"
    text = f"{mean * scale:{'+' if signed else ''}.{digits}f}"
    return f"{text} ± {std * scale:.{digits}f}" if std is not None else text


def results_table(results: list[dict], references: dict, policies: list[str], set_names: list[str]) -> str:
    """The markdown table: reference rows, then one row per policy with mean ± std over its seeds; for the quality
    metrics (reverse KL: lowest, accuracy: highest) the best policy mean, as displayed, is bold."""
    columns = table_columns(results, set_names)
    header = ["policy", "seeds", *(column.title for column in columns)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in REFERENCES:
        if name in references:
            cells = ["–" if c.training else _cell(c.value(references[name]), None, c.scale, c.digits) for c in columns]
            lines.append(f"| {REFERENCE_LABELS[name]} | – | " + " | ".join(cells) + " |")
    stats = {
        policy: [aggregate([c.value(r) for r in results if r["policy"] == policy]) for c in columns]
        for policy in policies
    }
    best = {}
    for j, column in enumerate(columns):
        shown = [round(s[j][0] * column.scale, column.digits) for s in stats.values() if s[j][0] is not None]
        if column.better and shown:
            best[j] = min(shown) if column.better == "min" else max(shown)
    for policy in policies:
        n_seeds = len({r["seed"] for r in results if r["policy"] == policy})
        cells = []
        for j, column in enumerate(columns):
            mean, std, _ = stats[policy][j]
            text = _cell(mean, std, column.scale, column.digits)
            if j in best and mean is not None and round(mean * column.scale, column.digits) == best[j]:
                text = f"**{text}**"
            cells.append(text)
        lines.append(f"| {policy} | {n_seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_differences(results: list[dict], policies: list[str], baseline: str, set_names: list[str] = ()) -> str:
    """Markdown table of each policy minus `baseline` on the same seed (mean ± std over seeds): the same seed means
    the same prompts and order, so the seed-to-seed spread of the difference is the noise to judge it against. Quality
    columns only: reverse KL (and on the release prefix), accuracy (per set when there are several, greedy too)."""
    by = {(r["policy"], r["seed"]): r for r in results}
    columns = [
        c for c in table_columns(results, list(set_names) or ["accuracy"])
        if c.better and not (len(set_names) > 1 and c.eval_set is None and c.key.startswith("accuracy"))
    ]  # fmt: skip
    titles = [f"Δ {c.header.replace('(%)', '(points)')}" for c in columns]
    lines = [f"| policy − {baseline} | seeds | " + " | ".join(titles) + " |", "|---|---|" + "---|" * len(columns)]
    for policy in policies:
        if policy == baseline:
            continue
        seeds = sorted(seed for (p, seed) in by if p == policy and (baseline, seed) in by)
        cells = []
        for column in columns:
            pairs = [(column.value(by[(policy, s)]), column.value(by[(baseline, s)])) for s in seeds]
            mean, std, _ = aggregate([a - b for a, b in pairs if a is not None and b is not None])
            cells.append(_cell(mean, std, column.scale, column.digits, signed=True))
        lines.append(f"| {policy} | {len(seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _baseline(policies: list[Policy]) -> str | None:
    for policy in policies:
        if policy.fields == {"supervision": "full"}:
            return policy.name
    return None


def collapse_markdown(collapse: dict, comparison: Comparison) -> list[str]:
    """The collapse diagnostics section of results.md: is there a downward change point to find at all?"""

    def number(key, digits=3):
        value = collapse.get(key)
        return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    release = release_settings(comparison.distill)
    return [
        "## Collapse diagnostics of the untrained student",
        "",
        f"`trl-ltc diagnose` on {collapse.get('trajectories')} of the student's own rollouts of training prompts "
        f"(K={release['top_k']}, segmentation `{release['segmentation']}`): {number('num_segments_mean', 1)} segments "
        f"and {number('completion_length_mean', 1)} tokens per completion on average.",
        "",
        "| accepted drop | accepted on shuffled segments (null) | margin before / after the change | "
        "median release position (tokens) |",
        "|---|---|---|---|",
        f"| {number('accepted_fraction')} | {number('accepted_frac_null')} | {number('margin_before_change')} / "
        f"{number('margin_after_change')} | {collapse[MEDIAN_RELEASE]} |",
        "",
        "Local teachability collapse is only shown where the accepted fraction clearly exceeds the null's (the same "
        "BIC rule on the same segment scores shuffled within each trajectory) and the margin curve falls "
        f"(`{DIAGNOSE_DIR}/margin_curve.png`, `{DIAGNOSE_DIR}/summary.md`). `fixed_prefix` at `median_release` keeps "
        "that many tokens of every completion.",
    ]


def results_markdown(results: list[dict], references: dict, comparison: Comparison, collapse: dict | None = None) -> str:
    policies = [p.name for p in comparison.policies]
    set_names = [s.name for s in comparison.evaluation.sets]
    d, ev = comparison.distill, comparison.evaluation
    batch = d.get("per_device_train_batch_size", 8) * d.get("gradient_accumulation_steps", 1)
    sets = "; ".join(
        f"{s.name}: {s.num_problems or 'all'} problems x {s.num_samples} sample(s) ({s.answer_type})" for s in ev.sets
    )
    stderr = [Column("accuracy_stderr", "", eval_set=n).value(r) for r in results for n in set_names]
    stderr = [v for v in stderr if v is not None]
    lines = [
        "# Supervision policies compared",
        "",
        f"Student `{comparison.student}`, teacher `{comparison.teacher}`; {d.get('max_steps')} steps x {batch} "
        f"prompts "
        f"x <= {d.get('max_completion_length')} tokens per run (`loss_type: {d.get('loss_type', 'advantage')}`, "
        f"LoRA: {bool(d.get('use_peft'))}); seeds {', '.join(map(str, comparison.seeds))}. Evaluation: {sets}; "
        f"<= {ev.max_new_tokens} new tokens at temperature {ev.temperature}, evaluation seed {ev.seed}.",
        "",
        results_table(results, references, policies, set_names),
        "",
        "Mean ± sample standard deviation over seeds (one trained student per seed); **bold**: the best policy mean "
        "(lowest reverse KL, highest accuracy). Held-out reverse KL: mean per-token KL(student || teacher) in nats on "
        "the student's own samples of the held-out problems, exact over the vocabulary. Accuracy: pass@1 estimated "
        "from the samples per problem at the evaluation temperature (greedy: one greedy completion per problem); "
        "final answers checked with math-verify (`math`), as a choice letter (`choice`) or as the text of the last "
        "`answer:` line (`statement`). Reverse KL on the release prefix: the same KL on the tokens "
        "`supervision: release` keeps of each sample. Kept tokens: supervised completion tokens / completion tokens "
        "during training; tokens trained: their sum over the run. s/step: training wall time per optimizer step.",
    ]
    if stderr:
        lines += [
            "",
            f"Evaluation noise: one run's accuracy has a standard error over problems of about "
            f"{100 * statistics.fmean(stderr):.1f} points.",
        ]
    baseline = _baseline(comparison.policies)
    if baseline is not None and len(policies) > 1:
        lines += [
            "",
            f"## Paired differences against `{baseline}` (same seed, mean ± std over seeds)",
            "",
            paired_differences(results, policies, baseline, set_names),
        ]
    if collapse is not None:
        lines += ["", *collapse_markdown(collapse, comparison)]
    return "\n".join(lines) + "\n"


CSV_FIELDS = [
    "kind", "policy", "seed", "supervision", "fields", "reverse_kl", "reverse_kl_prefix", "accuracy",
    "accuracy_greedy", "accuracy_stderr", "completion_length", "truncated_frac", "kept_token_frac", "tokens_trained",
    "seconds_per_step", "steps", "train_seconds", "eval_seconds",
]  # fmt: skip


PER_SET_FIELDS = ("reverse_kl", "reverse_kl_prefix", "accuracy", "accuracy_greedy", "completion_length")


def write_csv(results: list[dict], references: dict, set_names: list[str], path: Path) -> Path:
    per_set = [f"{n}/{k}" for n in set_names for k in PER_SET_FIELDS]
    per_set = per_set if len(set_names) > 1 else []
    rows = []
    for name in REFERENCES:
        if name in references:
            rows.append({"kind": "reference", "policy": REFERENCE_LABELS[name], **_flat(references[name], set_names)})
    for r in results:
        rows.append({
            "kind": "run", "policy": r["policy"], "seed": r["seed"], "supervision": r["fields"].get("supervision"),
            "fields": json.dumps(r["fields"]), "steps": r.get("steps"), "train_seconds": r.get("train_seconds"),
            "eval_seconds": r.get("eval_seconds"), "kept_token_frac": r.get("kept_token_frac"),
            "tokens_trained": r.get("tokens_trained"),
            "seconds_per_step": r.get("seconds_per_step"), **_flat(r, set_names),
        })  # fmt: skip
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=CSV_FIELDS + per_set, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def _flat(result: dict, set_names: list[str]) -> dict:
    row = {k: result.get(k) for k in SUMMARY_METRICS}
    stderr = [Column("accuracy_stderr", "", eval_set=n).value(result) for n in set_names]
    row["accuracy_stderr"] = stderr[0] if len(stderr) == 1 else None
    for n in set_names:
        for k in PER_SET_FIELDS:
            row[f"{n}/{k}"] = Column(k, "", eval_set=n).value(result)
    return row


def plot_results(results: list[dict], references: dict, policies: list[str], path: Path) -> Path:
    """One panel per metric: policies on x, one dot per seed, the mean ± std as a bar, references as lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in METRICS if c.key != "seconds_per_step"]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, column in zip(axes[0], panels):
        scale = column.scale
        for i, policy in enumerate(policies):
            values = [column.value(r) for r in results if r["policy"] == policy and column.value(r) is not None]
            if not values:
                continue
            mean, std, _ = aggregate(values)
            color = "tab:red" if policy.startswith("release") else "tab:blue"
            ax.bar(i, mean * scale, width=0.6, color=color, alpha=0.25)
            if std is not None:
                ax.errorbar(i, mean * scale, yerr=std * scale, color=color, capsize=3)
            jitter = [(j - (len(values) - 1) / 2) * 0.08 for j in range(len(values))]
            ax.scatter([i + dx for dx in jitter], [v * scale for v in values], color=color, s=14, zorder=3)
        for name, style in (("student", "--"), ("teacher", ":")):
            value = None if column.training else column.value(references.get(name, {}))
            if value is not None:
                ax.axhline(value * scale, linestyle=style, color="gray", label=REFERENCE_LABELS[name])
        arrow = {"min": " (lower is better)", "max": " (higher is better)"}.get(column.better, "")
        ax.set_title(column.header + arrow, fontsize=10)
        ax.set_xticks(list(range(len(policies))))
        ax.set_xticklabels(policies, rotation=60, ha="right", fontsize=8)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_results(
    results: list[dict], references: dict, comparison: Comparison, collapse: dict | None = None
) -> dict[str, Path]:
    out = comparison.output_dir
    policies = [p.name for p in comparison.policies]
    set_names = [s.name for s in comparison.evaluation.sets]
    (out / "results.md").write_text(results_markdown(results, references, comparison, collapse))
    return {
        "results.csv": write_csv(results, references, set_names, out / "results.csv"),
        "results.md": out / "results.md",
        "results.png": plot_results(results, references, policies, out / "results.png"),
    }


def __getattr__(name):  # the command line, now in `trl_ltc.commands.compare`
    if name in ('build_parser', 'main'):
        from ..commands import compare

        return getattr(compare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

