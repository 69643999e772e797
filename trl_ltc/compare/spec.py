"""The comparison config: its dataclasses (`Comparison`, `Policy`, `EvalSet`, `Evaluation`, `Diagnostics`, `Run`),
constants and validation, and `load_comparison`, which reads and checks a comparison YAML."""

from __future__ import annotations

import itertools
import json
import os
import shlex
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from .. import embedded, lab
from ..config import SUPERVISIONS

CONFIG = "compare_quickstart.yaml"
PRESETS = ("quickstart", *lab.LAB_PRESETS)  # lab presets: `lab.LAB_PRESETS` names their pairs
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
    "curves",
)
EVALUATION_KEYS = (
    "max_new_tokens", "temperature", "batch_size", "seed", "backend", "vllm", "datasets", "release_prefix",
)  # fmt: skip
DIAGNOSTICS_KEYS = ("num_prompts", "batch_size", "seed")
CURVES_KEYS = ("every", "datasets", "target_gain")
# A `max_flops` value resolved to the final `compute/flops` of the baseline policy (`full`) on the same seed.
BASELINE_FLOPS = "full_flops"
# A policy value resolved from the collapse diagnostics of the untrained student (`diagnostics:`).
MEDIAN_RELEASE = "median_release"
# Fields a policy may not set: they are what the harness itself varies or places.
RUN_FIELDS = ("seed", "output_dir", "run_name")
# Keys of the stored settings that do not change a run's result (where it lives).
PLACEMENT_FIELDS = ("output_dir", "run_name", "logging_dir")
REFERENCES = ("student", "teacher")
REFERENCE_LABELS = {"student": "student (untrained)", "teacher": "teacher"}
TRAIN_FILE, RESULT_FILE, RECIPE_FILE = "train.json", "result.json", "distill.yaml"
DIAGNOSE_DIR, COLLAPSE_FILE = "diagnose", "collapse.json"  # the untrained student's collapse diagnostics
# A run's headline metrics (`summarize_sets`: the mean over the evaluation sets).
SUMMARY_METRICS = (
    "reverse_kl", "reverse_kl_prefix", "accuracy", "accuracy_greedy", "completion_length", "truncated_frac",
)  # fmt: skip


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
# `--smoke` with `curves:`: two steps per run, a curve point after each.
SMOKE_CURVES_STEPS, SMOKE_CURVES_EVERY = 2, 1
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
class Curves:
    """Evaluation at checkpoints along training (`curves:`): every `every` optimizer steps and at the last one, on
    `sets` (default: the evaluation's; a smaller set keeps the budget), plus the untrained student at step 0.
    `target_gain`: the matched-compute column "compute to reach this share of `full`'s accuracy gain"."""

    every: int
    sets: list[EvalSet] | None = None
    target_gain: float = 0.9


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
    curves: Curves | None = None

    @property
    def curve_sets(self) -> list[EvalSet]:
        return (self.curves.sets if self.curves is not None else None) or self.evaluation.sets

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
            elif key == "max_flops" and value == BASELINE_FLOPS:
                resolved = self.comparison.resolved.get((BASELINE_FLOPS, self.seed), placeholder)
                if resolved is None:
                    raise CompareConfigError(
                        f"policy {self.policy.name!r}: `max_flops: {BASELINE_FLOPS}` needs the `full` run of seed "
                        f"{self.seed} first: list `full` before it in `policies`."
                    )
                fields[key] = float(resolved)
        fields["seed"] = self.seed
        if "release_seed" not in self.policy.fields:
            fields["release_seed"] = self.seed
        fields["output_dir"] = str(self.directory)
        fields["run_name"] = self.name
        return fields

    def settings(self) -> dict:
        """What the result depends on (stored with it, compared on resume)."""
        fields = {k: v for k, v in self.distill_fields().items() if k not in PLACEMENT_FIELDS}
        settings = {"distill": fields, "evaluation": _evaluation_settings(self.comparison.evaluation)}
        if self.comparison.curves is not None:
            settings["curves"] = json.loads(json.dumps(asdict(self.comparison.curves)))
        return settings


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


def _eval_sets(raw, preset: str | None, where: str = "evaluation.datasets") -> list[EvalSet]:
    top = where
    if raw is None:
        raw = LAB_EVAL_SETS if preset == "lab" else [{"name": "math"}] if preset else None
    if not isinstance(raw, list) or not raw:
        _fail(top, "must be a non-empty list of held-out sets ({name, dataset, answer_column, ...}).")
    sets, known = [], {f.name for f in EvalSet.__dataclass_fields__.values()}
    for index, entry in enumerate(raw):
        where = f"{top}[{index}]"
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
        _fail(top, f"names must differ; got {names}.")
    return sets


def _lab_split(where: str, dataset: str) -> str:
    split = dataset.removeprefix("lab:")
    if split not in lab.SPLITS:
        splits = ", ".join("lab:" + s for s in lab.SPLITS)
        _fail(f"{where}.dataset", f"unknown lab split {split!r}; use one of {splits}.")
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


def _curves(raw, preset: str | None, smoke: bool) -> Curves | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        _fail("curves", f"must be a mapping ({', '.join(CURVES_KEYS)}); got {raw!r}.")
    unknown = set(raw) - set(CURVES_KEYS)
    if unknown:
        _fail("curves", f"unknown keys {sorted(unknown)}; allowed: {', '.join(CURVES_KEYS)}.")
    if "every" not in raw:
        _fail("curves.every", "is missing: evaluate every how many optimizer steps, e.g. `curves: {every: 20}`.")
    every = _positive_int("curves.every", raw["every"])
    target = raw.get("target_gain", 0.9)
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0 < target <= 1:
        _fail("curves.target_gain", f"must be in (0, 1], a share of `full`'s accuracy gain; got {target!r}.")
    sets = None
    if raw.get("datasets") is not None:
        sets = _eval_sets(raw["datasets"], preset, where="curves.datasets")
    if smoke:
        every = SMOKE_CURVES_EVERY
        if sets is not None:
            if preset == "lab":
                sets = [EvalSet(**{**asdict(s), **SMOKE_LAB_EVAL_SET}) for s in sets]
            else:
                test = embedded.quickstart_dataset_path("test")
                sets = [EvalSet(**{**asdict(s), **SMOKE_EVAL_SET, "dataset": test}) for s in sets]
    return Curves(every=every, sets=sets, target_gain=float(target))


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
    lab_name = preset  # every lab preset shares the lab's splits and smoke settings; only its pair differs
    lab_pair, smoke_lab_pair = lab.LAB_PRESETS.get(preset, (None, None))
    preset = "lab" if lab_pair is not None else preset
    distill: dict = {}
    if raw.get("recipe") is not None:
        distill.update(_load_yaml(_find_recipe(str(raw["recipe"]), path), "Recipe"))
    out = Path(output_dir or raw.get("output_dir") or "runs/compare")
    if smoke and preset == "lab":
        teacher_dir, student_dir = lab.prepare_lab_pair(pair=smoke_lab_pair, directory=out / "smoke_models" / lab_name)
        distill.update(model_name_or_path=student_dir, teacher_model_name_or_path=teacher_dir)
        distill["dataset_name"] = lab.lab_dataset_path("train")
    elif smoke:
        teacher_dir, student_dir = embedded.prepare_tiny_pair(out / "smoke_models")
        distill.update(model_name_or_path=student_dir, teacher_model_name_or_path=teacher_dir)
        distill["dataset_name"] = embedded.quickstart_dataset_path("train")
    elif preset == "lab":
        print(f"Preparing the lab teacher and student in {embedded.cache_root()} ...", flush=True)
        teacher_dir, student_dir = lab.prepare_lab_pair(pair=lab_pair)
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
        curves=_curves(raw.get("curves"), preset or ("quickstart" if smoke else None), smoke),
    )
    if smoke:  # one or two steps per run, whatever a policy asks for
        for policy in policy_list:
            policy.fields.pop("max_steps", None)
    if comparison.curves is not None:
        if comparison.launcher:
            _fail("curves", "evaluates the student while it trains, in this process: remove `launcher` (or `curves`).")
        if smoke:
            distill["max_steps"] = SMOKE_CURVES_STEPS
    for policy in policy_list:
        if policy.fields.get("max_flops") == BASELINE_FLOPS:
            baseline = [p.name for p in policy_list if p.fields == {"supervision": "full"}]
            if not baseline or policy_list.index(policy) < [p.name for p in policy_list].index(baseline[0]):
                _fail(
                    f"policy {policy.name!r}",
                    f"`max_flops: {BASELINE_FLOPS}` takes the final compute of the `full` run on the same seed: "
                    "list a plain `full` policy before it.",
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
    from ..distill import recipe_args

    for policy in comparison.policies:
        run = Run(policy, comparison.seeds[0], comparison)
        try:
            recipe_args(run.distill_fields(placeholder=1))
        except (ValueError, TypeError) as error:
            raise CompareConfigError(f"policy {policy.name!r} ({policy.fields}): {error}") from None
        except SystemExit:
            raise CompareConfigError(f"policy {policy.name!r} ({policy.fields}): invalid distill fields.") from None


def release_settings(distill: dict) -> dict:
    """The release rule's settings of a recipe (`release_prefix_mask` / `trl-ltc diagnose` arguments)."""
    return {
        "top_k": distill.get("release_top_k", 10),
        "segmentation": distill.get("segmentation", "nltk"),
        "segment_window": distill.get("segment_window", 64),
    }
