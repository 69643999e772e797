"""`trl-ltc compare`: config checks, policy sweeps, the smoke pipeline end to end, resume, and the results table."""

import csv
import json
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml

from trl_ltc import cli, compare, embedded, lab
from trl_ltc.compare import (
    CompareConfigError,
    expand_policies,
    load_comparison,
    paired_differences,
    parse_seeds,
    results_table,
    runner,
)
from trl_ltc.config import SUPERVISIONS

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "configs" / "compare_quickstart.yaml"
QWEN3 = ROOT / "configs" / "compare_qwen3.yaml"


# --- Config -------------------------------------------------------------------------------------------------------


def test_policies_expand_sweeps_and_name_them():
    policies = expand_policies([
        "full",
        {"supervision": "fixed_prefix", "fixed_prefix_length": [16, 32]},
        {"supervision": "token_teachability", "token_score": ["entropy", "random"], "token_keep_ratio": 0.1},
        {"name": "k5", "supervision": "release", "release_top_k": 5},
    ])  # fmt: skip
    assert [p.name for p in policies] == [
        "full",
        "fixed_prefix-16",
        "fixed_prefix-32",
        "token_teachability-entropy-0.1",
        "token_teachability-random-0.1",
        "k5",
    ]
    assert policies[2].fields == {"supervision": "fixed_prefix", "fixed_prefix_length": 32}
    assert policies[4].fields == {
        "supervision": "token_teachability",
        "token_score": "random",
        "token_keep_ratio": 0.1,
    }


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        (["full", "relase"], r"policies\[1\]\.supervision: unknown policy 'relase'; choose one of full, fixed_prefix"),
        ([{"fixed_prefix_length": 8}], r"policies\[0\]: has no `supervision`"),
        (["full", "full"], r"policies\[1\]: policy 'full' appears twice"),
        ([{"supervision": "release", "seed": 3}], r"sets `seed`"),
        ([{"supervision": "fixed_prefix", "fixed_prefix_length": []}], r"fixed_prefix_length: is an empty list"),
        ([], r"policies: must be a non-empty list"),
        ([3], r"policies\[0\]: must be a policy name or a mapping"),
    ],
)
def test_bad_policies_name_the_field(entries, message):
    with pytest.raises(CompareConfigError, match=message):
        expand_policies(entries)


def test_seeds():
    assert parse_seeds("0,1, 2") == [0, 1, 2] and parse_seeds([3]) == [3] and parse_seeds(7) == [7]
    for bad, message in (("", "empty"), ([], "empty"), ("0,x", "comma-separated integers"), ([1, 1], "duplicates")):
        with pytest.raises(CompareConfigError, match=message):
            parse_seeds(bad)


def _config(tmp_path, **fields) -> Path:
    base = {
        "recipe": str(ROOT / "configs" / "quickstart.yaml"),
        "distill": {
            "model_name_or_path": "student",
            "teacher_model_name_or_path": "teacher",
            "dataset_name": "p.jsonl",
        },
        "policies": ["full", "release"],
        "seeds": [0, 1],
        "evaluation": {"datasets": [{"name": "math", "dataset": "held_out.jsonl"}]},
    }
    base.update(fields)
    path = tmp_path / "compare.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_load_comparison_merges_recipe_distill_policy_and_seed(tmp_path):
    config = _config(tmp_path, distill={
        "model_name_or_path": "student", "teacher_model_name_or_path": "teacher", "dataset_name": "p.jsonl",
        "max_steps": 3,
    })  # fmt: skip
    comparison = load_comparison(config, output_dir=tmp_path / "out")
    recipe = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    runs = comparison.runs()
    assert [(r.policy.name, r.seed) for r in runs] == [("full", 0), ("release", 0), ("full", 1), ("release", 1)]
    fields = runs[2].distill_fields()
    assert fields["supervision"] == "full" and fields["seed"] == 1 and fields["release_seed"] == 1
    assert fields["max_steps"] == 3 and fields["learning_rate"] == recipe["learning_rate"]  # distill over recipe
    assert fields["output_dir"] == str(tmp_path / "out" / "runs" / "full__seed1")
    # The evaluation defaults to the runs' completion length and temperature.
    assert comparison.evaluation.max_new_tokens == recipe["max_completion_length"]
    assert comparison.evaluation.temperature == recipe["temperature"]
    # --seeds and --policies override the config.
    narrowed = load_comparison(config, seeds="5", policies=["release"], output_dir=tmp_path / "out")
    assert [(r.policy.name, r.seed) for r in narrowed.runs()] == [("release", 5)]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"distill": {"model_name_or_path": "s", "dataset_name": "p"}},
            r"distill.teacher_model_name_or_path: the teacher is missing",
        ),
        ({"seeds": []}, r"seeds: is empty"),
        ({"policies": ["full", "fast"]}, r"policies\[1\].supervision: unknown policy 'fast'"),
        ({"polices": ["full"]}, r"unknown keys \['polices'\]"),
        ({"policies": ["full", "fixed_prefix"]}, r"policy 'fixed_prefix'.*fixed_prefix_length"),
        ({"policies": [{"supervision": "release", "release_topk": 4}]}, r"policy 'release-4'.*release_topk"),
        ({"evaluation": {"datasets": [{"name": "x"}]}}, r"evaluation.datasets\[0\]: has no `dataset`"),
        ({"evaluation": {"datasets": [{"dataset": "d", "num_samples": 0}]}}, r"num_samples: must be a positive"),
        ({"evaluation": {"backend": "tgi", "datasets": [{"dataset": "d"}]}}, r"evaluation.backend: must be one of"),
        ({"preset": "smollm"}, r"preset: unknown preset 'smollm'"),
        ({"recipe": "missing.yaml"}, r"recipe: 'missing.yaml' not found"),
    ],
)
def test_bad_configs_fail_early_naming_the_field(tmp_path, fields, message):
    with pytest.raises(CompareConfigError, match=message):
        load_comparison(_config(tmp_path, **fields), output_dir=tmp_path / "out")


def test_command_line_errors_exit_with_the_message(tmp_path, capsys):
    config = _config(tmp_path, seeds=[0])
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--config", str(config), "--seeds", ",", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--seeds: is empty" in capsys.readouterr().err


def test_shipped_configs_cover_every_policy(monkeypatch):
    monkeypatch.setattr(embedded, "prepare_tiny_pair", lambda directory: ("teacher", "student"))
    comparison = load_comparison(QUICKSTART, smoke=True, output_dir="/nonexistent/never-written")
    supervisions = {p.fields["supervision"] for p in comparison.policies}
    assert supervisions == set(SUPERVISIONS), "a new policy in config.SUPERVISIONS belongs in the comparison"
    scores = {
        p.fields.get("token_score") for p in comparison.policies if p.fields["supervision"] == "token_teachability"
    }
    assert {"teachability", "entropy", "random"} <= scores
    assert sum(p.fields["supervision"] == "fixed_prefix" for p in comparison.policies) >= 2
    raw = yaml.safe_load(QUICKSTART.read_text())
    assert len(raw["seeds"]) >= 2 and raw["preset"] == "quickstart"
    packaged = ROOT / "trl_ltc" / "resources" / QUICKSTART.name
    assert packaged.read_bytes() == QUICKSTART.read_bytes(), "copy configs/compare_quickstart.yaml over it"
    assert Path(compare.recipe_path()) == QUICKSTART

    qwen3 = yaml.safe_load(QWEN3.read_text())
    assert "qwen3-1.7b_from_qwen3-30b-a3b.yaml" in qwen3["recipe"] and qwen3["evaluation"]["backend"] == "vllm"
    assert [s["name"] for s in qwen3["evaluation"]["datasets"]] == [
        "AIME25", "HMMT-Feb25", "HMMT-Nov25", "MATH500", "Minerva", "GPQA-Diamond",
    ]  # fmt: skip
    smoke = load_comparison(QWEN3, smoke=True, output_dir="/nonexistent/never-written")
    assert {p.fields["supervision"] for p in smoke.policies} == set(SUPERVISIONS)
    assert smoke.launcher is None and smoke.evaluation.backend == "transformers"
    assert {"1024", "8192"} <= {str(p.fields.get("fixed_prefix_length")) for p in smoke.policies}


# --- The smoke pipeline end to end, and resume ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare") / "out"
    argv = ["compare", "--smoke", "--seeds", "0,1", "--output_dir", str(out)]
    threads = torch.get_num_threads()
    assert cli.main(argv) == 0
    assert torch.get_num_threads() == threads  # --smoke runs on one thread and gives the others back
    return out, argv


def _rows(out):
    with open(out / "results.csv", encoding="utf-8") as file:
        return list(csv.DictReader(file))


def test_smoke_end_to_end(smoke_run):
    out, _ = smoke_run
    policies = [p.name for p in load_comparison(QUICKSTART, smoke=True, output_dir=out).policies]
    rows = _rows(out)
    references = [r for r in rows if r["kind"] == "reference"]
    runs = [r for r in rows if r["kind"] == "run"]
    assert [r["policy"] for r in references] == ["student (untrained)", "teacher"]
    assert float(references[1]["reverse_kl"]) == 0.0 and float(references[0]["reverse_kl"]) > 0
    assert sorted((r["policy"], int(r["seed"])) for r in runs) == sorted((p, s) for p in policies for s in (0, 1))
    for row in runs:
        assert float(row["reverse_kl"]) > 0 and 0 <= float(row["accuracy"]) <= 1
        assert 0 < float(row["completion_length"]) <= 8 and 0 < float(row["kept_token_frac"]) <= 1
        assert int(row["steps"]) == 1 and float(row["seconds_per_step"]) > 0
        assert json.loads(row["fields"])["supervision"] == row["supervision"]
    full = {float(r["kept_token_frac"]) for r in runs if r["policy"] == "full"}
    assert full == {1.0}
    markdown = (out / "results.md").read_text()
    assert "| student (untrained) |" in markdown and "| teacher |" in markdown
    assert all(f"| {policy} | 2 |" in markdown for policy in policies)
    assert "**" in markdown and "Paired differences against `full`" in markdown
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    run_dir = out / "runs" / "release__seed1"
    assert {"distill.yaml", "train.json", "result.json", "adapter_config.json"} <= {p.name for p in run_dir.iterdir()}
    assert yaml.safe_load((run_dir / "distill.yaml").read_text())["supervision"] == "release"


def test_rerun_trains_and_evaluates_nothing(smoke_run, monkeypatch):
    out, argv = smoke_run
    calls = {"train": 0, "evaluate": 0}
    train, evaluate = compare.train_run, compare.evaluate_target

    def count(name, function):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(runner, "train_run", count("train", train))
    monkeypatch.setattr(runner, "evaluate_target", count("evaluate", evaluate))
    before = _rows(out)
    assert cli.main(argv) == 0
    assert calls == {"train": 0, "evaluate": 0}
    assert _rows(out) == before

    # A run evaluated but lost its result: evaluated again, not retrained. A run without anything: both.
    (out / "runs" / "full__seed1" / "result.json").unlink()
    victim = out / "runs" / "release__seed0"
    for path in victim.iterdir():
        path.unlink()
    assert cli.main(argv) == 0
    assert calls == {"train": 1, "evaluate": 2}
    assert len(_rows(out)) == len(before)


def test_changed_settings_are_refused_not_mixed(smoke_run, tmp_path, capsys):
    out, _ = smoke_run
    config = tmp_path / "changed.yaml"
    raw = yaml.safe_load(QUICKSTART.read_text())
    raw["recipe"] = str(ROOT / "configs" / "quickstart.yaml")
    raw["distill"]["learning_rate"] = 0.5
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["compare", "--smoke", "--config", str(config), "--seeds", "0", "--output_dir", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "full__seed0" in error and "learning_rate: 0.001 -> 0.5" in error and "another --output_dir" in error


# --- The table ------------------------------------------------------------------------------------------------------


def _result(policy, seed, kl, accuracy, length=50.0, kept=1.0, step=2.0):
    return {
        "policy": policy, "seed": seed, "fields": {"supervision": policy}, "reverse_kl": kl, "accuracy": accuracy,
        "completion_length": length, "kept_token_frac": kept, "seconds_per_step": step,
        "eval": {"math": {"reverse_kl": kl, "accuracy": accuracy, "completion_length": length}},
    }  # fmt: skip


def test_results_table_mean_std_and_bold():
    results = [
        _result("full", 0, 0.30, 0.10), _result("full", 1, 0.34, 0.20), _result("full", 2, 0.32, 0.30),
        _result("release", 0, 0.28, 0.25, kept=0.6), _result("release", 1, 0.32, 0.15, kept=0.4),
    ]  # fmt: skip
    references = {
        "student": {"reverse_kl": 0.5, "accuracy": 0.05, "completion_length": 80.0},
        "teacher": {"reverse_kl": 0.0, "accuracy": 0.4, "completion_length": 60.0},
    }
    table = results_table(results, references, ["full", "release"], ["math"]).splitlines()
    assert table[0].startswith("| policy | seeds | held-out reverse KL ↓ | accuracy (%) ↑ | completion length |")
    assert table[2] == "| student (untrained) | – | 0.5000 | 5.0 | 80.0 | – | – |"
    assert table[3] == "| teacher | – | 0.0000 | 40.0 | 60.0 | – | – |"
    # full: KL mean 0.32, sample std 0.02; accuracy 20.0 +- 10.0. release: KL 0.30 +- 0.0283; accuracy 20.0 +- 7.1.
    assert table[4] == "| full | 3 | 0.3200 ± 0.0200 | **20.0 ± 10.0** | 50.0 ± 0.0 | 100.0 ± 0.0 | 2.0 ± 0.0 |"
    assert table[5] == "| release | 2 | **0.3000 ± 0.0283** | **20.0 ± 7.1** | 50.0 ± 0.0 | 50.0 ± 14.1 | 2.0 ± 0.0 |"

    paired = paired_differences(results, ["full", "release"], "full").splitlines()
    # seed 0: -0.02 / +15 points; seed 1: -0.02 / -5 points (seed 2 has no release run).
    assert paired[2] == "| release | 2 | -0.0200 ± 0.0000 | +5.0 ± 14.1 |"


def test_results_table_with_several_sets_and_one_seed():
    result = _result("release", 0, 0.2, 0.3)
    result["eval"] = {"a": {"accuracy": 0.2}, "b": {"accuracy": 0.4}}
    table = results_table([result], {}, ["release"], ["a", "b"]).splitlines()
    assert "| a (%) ↑ | b (%) ↑ | average accuracy (%) ↑ |" in table[0]
    assert table[2] == "| release | 1 | **0.2000** | **20.0** | **40.0** | **30.0** | 50.0 | 100.0 | 2.0 |"


# --- vLLM sampling, with a stand-in engine ------------------------------------------------------------------------


def test_vllm_sampling_builds_rollouts_like_the_trainer(monkeypatch, tmp_path, tokenizer):
    from trl_ltc.generation import sample_completions_vllm

    created = {}
    eos = tokenizer.eos_token_id

    class LLM:
        def __init__(self, model, **kwargs):
            created.update(model=model, **kwargs)

        def generate(self, requests, params, lora_request=None, use_tqdm=True):
            created.update(requests=requests, params=params, lora=lora_request)

            def sample(ids, reason, stop=None):
                output = types.SimpleNamespace(token_ids=ids, finish_reason=reason, stop_reason=stop)
                return types.SimpleNamespace(outputs=[output])

            return [sample([5, 6, eos], "stop"), sample([7, 8, 9], "length"), sample([4], "stop", eos)]

    vllm = types.ModuleType("vllm")
    vllm.LLM, vllm.SamplingParams = LLM, lambda **kwargs: kwargs
    lora = types.ModuleType("vllm.lora.request")
    lora.LoRARequest = lambda name, index, path: ("lora", path)
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    monkeypatch.setitem(sys.modules, "vllm.lora", types.ModuleType("vllm.lora"))
    monkeypatch.setitem(sys.modules, "vllm.lora.request", lora)

    prompts = ["one", "two", "three"]
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "base", "r": 32}))
    rollouts = sample_completions_vllm(str(adapter), tokenizer, prompts, 3, temperature=0.7, seed=5)
    assert created["model"] == "base" and created["enable_lora"] and created["max_lora_rank"] == 32
    assert created["seed"] == 5 and created["lora"] == ("lora", str(adapter))
    assert created["params"]["temperature"] == 0.7 and created["params"]["max_tokens"] == 3
    assert eos in created["params"]["stop_token_ids"]
    assert created["requests"][0]["prompt_token_ids"] == tokenizer("one")["input_ids"]
    # EOS kept; a stop without its token in the ids gets it appended; cut at the length cap otherwise.
    assert rollouts.completion_ids[0].tolist() == [5, 6, eos]
    assert rollouts.completion_ids[1].tolist() == [7, 8, 9]
    assert rollouts.completion_ids[2, :2].tolist() == [4, eos] and rollouts.completion_mask[2].tolist() == [1, 1, 0]

    created.clear()
    sample_completions_vllm(str(tmp_path), tokenizer, prompts, 3, llm_kwargs={"gpu_memory_utilization": 0.5})
    assert created["model"] == str(tmp_path) and "enable_lora" not in created and created["lora"] is None
    assert created["gpu_memory_utilization"] == 0.5


def test_gpqa_rows():
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        from make_gpqa_prompts import gpqa_row
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    record = {"Question": "Which is heaviest? ", "Correct Answer": "lead", "Incorrect Answer 1": "air",
              "Incorrect Answer 2": "water", "Incorrect Answer 3": "wood"}  # fmt: skip
    rows = [gpqa_row(record, index) for index in range(8)]
    assert rows == [gpqa_row(record, index) for index in range(8)]  # seeded
    for row in rows:
        options = dict(
            line.split(") ", 1) for line in row["prompt"].splitlines() if line[:3] in ("A) ", "B) ", "C) ", "D) ")
        )
        assert sorted(options) == ["A", "B", "C", "D"] and options[row["answer"]] == "lead"
        assert row["prompt"].startswith("Which is heaviest?\n\nA) ")
    assert len({row["answer"] for row in rows}) > 1  # the correct option moves


def test_launcher_trains_each_run_in_a_subprocess(tmp_path):
    """`launcher:` runs `trl-ltc distill` in a subprocess; the summary comes back from its trainer_state.json."""
    teacher, student = embedded.prepare_tiny_pair(tmp_path / "models")
    distill = {**compare.SMOKE_DISTILL, "model_name_or_path": student, "teacher_model_name_or_path": teacher}
    distill["dataset_name"] = embedded.quickstart_dataset_path("train")
    eval_set = {"name": "math", "dataset": embedded.quickstart_dataset_path("test"), "num_problems": 2}
    config = tmp_path / "compare.yaml"
    config.write_text(
        yaml.safe_dump({
            "recipe": str(ROOT / "configs" / "quickstart.yaml"),
            "launcher": [sys.executable],
            "distill": distill,
            "policies": ["release"],
            "seeds": [3],
            "evaluation": {"max_new_tokens": 4, "batch_size": 2, "datasets": [eval_set]},
            "keep_models": False,
        })
    )  # fmt: skip
    comparison = load_comparison(config, output_dir=tmp_path / "out")
    assert comparison.launcher == [sys.executable]
    (result,) = compare.run_comparison(comparison)["runs"]
    assert result["steps"] == 1 and 0 < result["kept_token_frac"] <= 1 and result["seconds_per_step"] > 0
    assert result["reverse_kl"] > 0 and result["eval"]["math"]["num_problems"] == 2
    run_dir = tmp_path / "out" / "runs" / "release__seed3"
    assert (run_dir / "trainer_state.json").is_file() and (run_dir / "adapter_config.json").is_file()
    assert not list(run_dir.glob("*.safetensors"))  # keep_models: false drops the weights once evaluated


# --- The lab bench preset -------------------------------------------------------------------------------------------

LAB = ROOT / "configs" / "compare_lab.yaml"


def test_lab_config_is_the_papers_protocol(monkeypatch):
    monkeypatch.setattr(lab, "prepare_lab_pair", lambda **kwargs: ("teacher", "student"))
    comparison = load_comparison(LAB, output_dir="/nonexistent/never-written")
    assert comparison.distill["loss_type"] == "advantage" and comparison.distill["segmentation"] == "newline"
    assert comparison.distill["dataset_name"].endswith("running_sum_mod10_train.jsonl")
    names = [p.name for p in comparison.policies]
    assert names == [
        "full", "release", "release_calibrated", "release_calibrated_keep", "release_online_calibrated", "iw_opd",
        "esr_45", "random_release",
    ]  # fmt: skip
    fields = {p.name: p.fields for p in comparison.policies}
    assert fields["release_calibrated"] == {"supervision": "release", "release_alpha": 0.05}
    assert fields["release_calibrated_keep"]["release_keep_advantage_below"] == -2.3
    assert fields["release_online_calibrated"]["rollout_truncation"] == "online"
    assert fields["esr_45"]["supervision"] == "full" and fields["esr_45"]["max_completion_length"] == 45
    assert fields["esr_45"]["max_flops"] == compare.BASELINE_FLOPS  # trained to full's compute on the same seed
    assert fields["iw_opd"] == {"supervision": "iw_opd"}
    assert len(comparison.seeds) >= 3 and comparison.diagnostics.num_prompts >= 128
    assert comparison.curves.every == 20 and comparison.curves.target_gain == 0.9
    assert [s.num_problems for s in comparison.curve_sets] == [128]
    sets = comparison.evaluation.sets
    assert [s.name for s in sets] == ["in_domain", "ood"]
    assert all(s.answer_type == "statement" and s.greedy and s.num_samples == 2 for s in sets)
    assert sets[0].num_problems >= 256 and sets[1].dataset.endswith("running_sum_mod10_ood.jsonl")
    assert (ROOT / "trl_ltc" / "resources" / LAB.name).read_bytes() == LAB.read_bytes()
    assert (ROOT / "trl_ltc" / "resources" / "lab.yaml").read_bytes() == (ROOT / "configs" / "lab.yaml").read_bytes()


def test_median_release_needs_the_diagnostics(tmp_path, monkeypatch):
    monkeypatch.setattr(lab, "prepare_lab_pair", lambda **kwargs: ("teacher", "student"))
    raw = yaml.safe_load(LAB.read_text())
    raw.pop("diagnostics")
    raw["policies"].append({"supervision": "fixed_prefix", "fixed_prefix_length": "median_release"})
    raw["recipe"] = str(ROOT / "configs" / "lab.yaml")
    config = tmp_path / "lab.yaml"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(CompareConfigError, match="fixed_prefix-median_release.*add a `diagnostics:` section"):
        load_comparison(config, output_dir=tmp_path / "out")
    raw["evaluation"]["datasets"] = [{"name": "x", "dataset": "lab:dev"}]
    raw["diagnostics"] = {"num_prompts": 4}
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(CompareConfigError, match=r"datasets\[0\]\.dataset: unknown lab split 'dev'"):
        load_comparison(config, output_dir=tmp_path / "out")


def test_lab_smoke_end_to_end(tmp_path):
    out = tmp_path / "lab"
    raw = yaml.safe_load(LAB.read_text())  # the bench and the fixed prefix at the diagnostics' median release
    raw["policies"].append({"supervision": "fixed_prefix", "fixed_prefix_length": "median_release"})
    raw["recipe"] = str(ROOT / "configs" / "lab.yaml")
    raw["evaluation"]["release_prefix"] = True
    config = tmp_path / "lab.yaml"
    config.write_text(yaml.safe_dump(raw))
    argv = ["compare", "--config", str(config), "--smoke", "--seeds", "0", "--output_dir", str(out)]
    assert cli.main([*argv, "--policies", "full,release,fixed_prefix-median_release"]) == 0
    collapse = json.loads((out / "diagnose" / "collapse.json").read_text())
    records = [json.loads(line) for line in (out / "diagnose" / "records.jsonl").read_text().splitlines()]
    from trl_ltc.diagnostics import release_cut

    cuts = sorted(release_cut(r) for r in records)
    assert len(records) == 4 and collapse["median_release"] == max(1, cuts[(len(cuts) - 1) // 2])
    recipe = yaml.safe_load((out / "runs" / "fixed_prefix-median_release__seed0" / "distill.yaml").read_text())
    assert recipe["fixed_prefix_length"] == collapse["median_release"] and recipe["segmentation"] == "newline"
    rows = {r["policy"]: r for r in _rows(out)}
    for name in ("full", "release", "fixed_prefix-median_release"):
        row = rows[name]
        assert 0 <= float(row["in_domain/accuracy_greedy"]) <= 1 and 0 <= float(row["ood/accuracy"]) <= 1
        assert float(row["reverse_kl_prefix"]) > 0 and float(row["tokens_trained"]) > 0
    # full trains on every generated token; the fixed prefix on at most its length per completion (2 prompts a step)
    fixed = rows["fixed_prefix-median_release"]
    assert float(fixed["tokens_trained"]) <= int(fixed["steps"]) * 2 * collapse["median_release"]
    assert float(rows["full"]["kept_token_frac"]) == 1.0
    markdown = (out / "results.md").read_text()
    assert "## Collapse diagnostics of the untrained student" in markdown and "in_domain greedy (%)" in markdown


# --- Curves and matched compute -------------------------------------------------------------------------------------


def test_lab_smoke_writes_curves_and_compute_columns(tmp_path):
    out = tmp_path / "lab"
    argv = ["compare", "--config", str(LAB), "--smoke", "--seeds", "0", "--output_dir", str(out)]
    policies = "full,release_calibrated,release_online_calibrated,iw_opd,esr_45"
    assert cli.main([*argv, "--policies", policies]) == 0
    with open(out / "curves.csv", encoding="utf-8") as file:
        curve = list(csv.DictReader(file))
    names = policies.split(",")
    assert {r["policy"] for r in curve} == set(names)
    for name in names:
        points = [r for r in curve if r["policy"] == name]
        steps = [int(r["step"]) for r in points]
        assert steps[0] == 0 and len(steps) >= 3 and steps == sorted(steps)  # step 0 and two checkpoints at least
        flops = [float(r["flops"]) for r in points]
        assert flops[0] == 0 and flops == sorted(set(flops))  # cumulative
        for row in points[1:]:
            assert float(row["generated_tokens"]) > 0 and float(row["teacher_tokens"]) > 0
            assert float(row["trained_tokens"]) > 0 and float(row["wall_seconds"]) > 0
            assert 0 <= float(row["accuracy"]) <= 1 and float(row["reverse_kl"]) > 0
    rows = {r["policy"]: r for r in _rows(out) if r["kind"] == "run"}
    for name in names:
        last = [r for r in curve if r["policy"] == name][-1]
        assert float(rows[name]["flops"]) == pytest.approx(float(last["flops"]))
        assert float(rows[name]["generated_tokens"]) == pytest.approx(float(last["generated_tokens"]))
    # full reaches its own final compute with its own final curve accuracy.
    full_last = [r for r in curve if r["policy"] == "full"][-1]
    assert float(rows["full"]["accuracy_at_full_compute"]) == pytest.approx(float(full_last["accuracy"]))
    # ESR's budget is full's final compute on the same seed.
    esr = yaml.safe_load((out / "runs" / "esr_45__seed0" / "distill.yaml").read_text())
    assert esr["max_flops"] == pytest.approx(float(rows["full"]["flops"]))
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "## Matched compute" in (out / "results.md").read_text()


def test_matched_compute_interpolates_along_the_curves():
    from trl_ltc.compare.report import NOT_REACHED, first_reaching, matched_compute, value_at

    assert value_at([(0, 0.0), (10, 1.0)], 2.5) == 0.25 and value_at([(0, 0.0), (10, 1.0)], 11) is None
    assert first_reaching([(0, 0.1), (4, 0.3), (8, 0.5)], 0.4) == 6.0
    assert first_reaching([(0, 0.1), (4, 0.3)], 0.4) is None

    start = {"flops": 0.0, "accuracy": 0.1}

    def run(policy, points):
        curve = [{"step": i + 1, "flops": f, "accuracy": a} for i, (f, a) in enumerate(points)]
        return {"policy": policy, "seed": 0, "curve": curve}

    results = [
        run("full", [(100.0, 0.3), (200.0, 0.5)]),  # gain 0.4: target 0.1 + 0.9 * 0.4 = 0.46
        run("cheap", [(50.0, 0.4), (150.0, 0.6)]),  # ends before 200: not reached; 0.46 at 50 + 100 * 0.06 / 0.2
        run("long", [(100.0, 0.2), (300.0, 0.4)]),  # at 200: 0.3; never 0.46
    ]
    matched = matched_compute(results, "full", start, 0.9)
    assert matched[("full", 0)]["accuracy_at_full_compute"] == 0.5
    assert matched[("full", 0)]["flops_to_target_gain"] == pytest.approx(100 + 100 * 0.16 / 0.2)
    assert matched[("cheap", 0)]["accuracy_at_full_compute"] == NOT_REACHED
    assert matched[("cheap", 0)]["flops_to_target_gain"] == pytest.approx(50 + 100 * 0.06 / 0.2)
    assert matched[("long", 0)]["accuracy_at_full_compute"] == pytest.approx(0.3)
    assert matched[("long", 0)]["flops_to_target_gain"] == NOT_REACHED
    # Paired at the most compute both spent: cheap ends at 150, where full is 0.3 + 0.2 * 50 / 100 = 0.4.
    assert matched[("cheap", 0)]["delta_at_equal_compute"] == pytest.approx(0.6 - 0.4)
    assert matched[("long", 0)]["delta_at_equal_compute"] == pytest.approx(0.3 - 0.5)
    assert "delta_at_equal_compute" not in matched[("full", 0)]


@pytest.mark.parametrize(
    ("curves", "message"),
    [
        ({"datasets": []}, r"curves.every: is missing"),
        ({"every": 0}, r"curves.every: must be a positive integer"),
        ({"every": 5, "target_gain": 1.5}, r"curves.target_gain: must be in \(0, 1\]"),
        ({"every": 5, "often": 1}, r"curves: unknown keys \['often'\]"),
        ({"every": 5, "datasets": [{"name": "x"}]}, r"curves.datasets\[0\]: has no `dataset`"),
        ([5], r"curves: must be a mapping"),
    ],
)
def test_bad_curves_name_the_field(tmp_path, curves, message):
    with pytest.raises(CompareConfigError, match=message):
        load_comparison(_config(tmp_path, curves=curves), output_dir=tmp_path / "out")


def test_full_flops_needs_full_first(tmp_path):
    policies = [{"supervision": "full", "max_completion_length": 4, "max_flops": "full_flops"}, "full"]
    with pytest.raises(CompareConfigError, match="list a plain `full` policy before it"):
        load_comparison(_config(tmp_path, policies=policies), output_dir=tmp_path / "out")


def test_workers_split_the_policies_and_keep_full_with_its_dependents(monkeypatch):
    monkeypatch.setattr(lab, "prepare_lab_pair", lambda **kwargs: ("teacher", "student"))
    comparison = load_comparison(LAB, output_dir="/nonexistent/never-written")
    names = [p.name for p in comparison.policies]
    for workers in (1, 2, 3, 20):
        groups = runner.worker_groups(comparison, workers)
        assert sorted(n for g in groups for n in g) == sorted(names) and len(groups) <= workers
        assert any({"full", "esr_45"} <= set(g) for g in groups)
        assert max(map(len, groups)) - min(map(len, groups)) <= 1 or workers >= len(names)


def test_parallel_workers_write_the_same_tables(tmp_path):
    out = tmp_path / "lab"
    argv = ["compare", "--config", str(LAB), "--smoke", "--seeds", "0", "--output_dir", str(out), "--workers", "2"]
    assert cli.main([*argv, "--policies", "full,esr_45,iw_opd"]) == 0
    assert (out / "worker0.log").is_file() and (out / "worker1.log").is_file()
    with open(out / "curves.csv", encoding="utf-8") as file:
        assert {r["policy"] for r in csv.DictReader(file)} == {"full", "esr_45", "iw_opd"}
    assert {r["policy"] for r in _rows(out) if r["kind"] == "run"} == {"full", "esr_45", "iw_opd"}
