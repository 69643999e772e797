"""`trl-ltc distill`: recipes, prompt datasets, and tiny end-to-end runs through the command line (CPU)."""

import dataclasses
import json
import math
import os
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset
from helpers import make_model, make_tokenizer

from trl_ltc import TeachabilityGKDConfig, TeachabilityGKDTrainer
from trl_ltc.cli import main as cli_main
from trl_ltc.commands.distill import build_parser, parse_args
from trl_ltc.distill import DistillScriptArguments, build_trainer, recipe_args
from trl_ltc.prompts import load_prompt_dataset, prepare_prompt_dataset, validate_prompt_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MAIN_RECIPE = CONFIGS / "qwen3-1.7b_from_qwen3-30b-a3b.yaml"
# Distill recipes: every YAML in configs/ but the accelerate configs and the `trl-ltc compare` configs.
RECIPES = sorted(
    p for p in CONFIGS.rglob("*.yaml") if "accelerate" not in p.parts and not p.name.startswith("compare_")
)
TEACHER = "Qwen/Qwen3-30B-A3B-Instruct-2507"
# Fields a baseline may change relative to the release recipe: the supervision block and the run names.
SUPERVISION_FIELDS = set(
    "supervision fixed_prefix_length release_seed token_score token_keep_ratio token_top_k token_min_keep "
    "output_dir run_name".split()
)
# The tiny runs: 2 layers, hidden 64, completions of at most 8 tokens, one optimizer step, nothing saved mid-run.
TINY = (
    "--max_steps 1 --per_device_train_batch_size 2 --max_completion_length 8 --use_cpu --report_to none --bf16 false "
    "--gradient_checkpointing false --save_strategy no --segmentation fixed --segment_window 3 --learning_rate 0.05"
).split()


def _parse(*argv):
    # Recipes set `bf16: true` for GPUs; on this CPU-only machine TrainingArguments accepts bf16 only with use_cpu.
    return build_parser().parse_args_and_config(list(argv) + ["--use_cpu"])


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


# --- Recipes ---------------------------------------------------------------------------------------------------------


def test_the_recipes_cover_table_1():
    names = {str(p.relative_to(CONFIGS)) for p in RECIPES}
    expected = {
        "qwen3-1.7b_from_qwen3-30b-a3b.yaml",
        "qwen3-4b_from_qwen3-30b-a3b.yaml",
        "qwen3-8b_from_qwen3-30b-a3b.yaml",
        "baselines/qwen3-1.7b_full.yaml",
        "baselines/qwen3-1.7b_random_release.yaml",
        "baselines/qwen3-1.7b_adv_std_release.yaml",
        "baselines/qwen3-1.7b_token_teachability.yaml",
        *(f"baselines/qwen3-1.7b_fixed_prefix_{n}.yaml" for n in (1024, 2048, 4096, 8192)),
    }
    assert expected <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(CONFIGS)))
def test_every_recipe_parses(recipe):
    """Every recipe in configs/ holds only known fields, with values the config accepts."""
    script_args, training_args, _, _ = _parse("--config", str(recipe))
    assert isinstance(script_args, DistillScriptArguments) and isinstance(training_args, TeachabilityGKDConfig)
    assert training_args.supervision == yaml.safe_load(recipe.read_text()).get("supervision", "release")


TABLE_1 = {  # file -> (student, supervision, extra fields)
    "qwen3-1.7b_from_qwen3-30b-a3b.yaml": ("Qwen/Qwen3-1.7B", "release", {}),
    "qwen3-4b_from_qwen3-30b-a3b.yaml": ("Qwen/Qwen3-4B", "release", {}),
    "qwen3-8b_from_qwen3-30b-a3b.yaml": ("Qwen/Qwen3-8B", "release", {}),
    "baselines/qwen3-1.7b_full.yaml": ("Qwen/Qwen3-1.7B", "full", {}),
    **{
        f"baselines/qwen3-1.7b_fixed_prefix_{n}.yaml": ("Qwen/Qwen3-1.7B", "fixed_prefix", {"fixed_prefix_length": n})
        for n in (1024, 2048, 4096, 8192)
    },
    "baselines/qwen3-1.7b_random_release.yaml": ("Qwen/Qwen3-1.7B", "random_release", {}),
    "baselines/qwen3-1.7b_adv_std_release.yaml": ("Qwen/Qwen3-1.7B", "adv_std_release", {}),
    "baselines/qwen3-1.7b_token_teachability.yaml": (
        "Qwen/Qwen3-1.7B",
        "token_teachability",
        {"token_score": "teachability", "token_keep_ratio": 0.05},
    ),
}


@pytest.mark.parametrize("name", sorted(TABLE_1))
def test_table_1_settings(name):
    student, supervision, extra = TABLE_1[name]
    script_args, args, model_args, _ = _parse("--config", str(CONFIGS / name))
    assert (model_args.model_name_or_path, args.teacher_model_name_or_path) == (student, TEACHER)
    assert (args.supervision, args.release_top_k, args.segmentation) == (supervision, 10, "nltk")
    assert all(getattr(args, field) == value for field, value in extra.items()), extra
    assert args.per_device_train_batch_size * 8 * args.gradient_accumulation_steps == 1024  # prompts per step, 8 GPUs
    assert (args.max_steps, args.max_completion_length, args.vllm_max_model_length) == (100, 16384, 2048 + 16384)
    assert (args.use_vllm, args.vllm_mode, args.bf16, model_args.dtype) == (True, "colocate", True, "bfloat16")
    assert (script_args.dataset_name, script_args.dataset_prompt_column) == ("zwhe99/DeepMath-103K", "question")
    assert script_args.dataset_prompt_as_chat


@pytest.mark.parametrize("recipe", [p for p in RECIPES if p.parent.name == "baselines" or "from_qwen3" in p.name])
def test_recipes_differ_from_release_only_where_they_should(recipe):
    reference, other = (yaml.safe_load(p.read_text()) for p in (MAIN_RECIPE, recipe))
    allowed = SUPERVISION_FIELDS | ({"model_name_or_path"} if recipe.parent == CONFIGS else set())
    changed = {key for key in reference.keys() | other.keys() if reference.get(key) != other.get(key)}
    assert changed <= allowed, changed - allowed


def test_flags_override_the_recipe():
    flags = "--supervision full --max_steps 3 --model_name_or_path /tmp/student".split()
    _, args, model_args, _ = _parse("--config", str(MAIN_RECIPE), *flags)
    assert (args.supervision, args.max_steps, model_args.model_name_or_path) == ("full", 3, "/tmp/student")
    assert args.teacher_model_name_or_path == TEACHER  # untouched fields keep the recipe's values


@pytest.mark.skipif(torch.cuda.is_available(), reason="transformers accepts bf16 on a bf16-capable GPU")
def test_a_gpu_recipe_on_cpu_names_the_flags_to_pass(tmp_path):
    argv = ["distill", "--config", str(MAIN_RECIPE), "--output_dir", str(tmp_path)]
    with pytest.raises(ValueError, match=r"support bf16.*pass `--bf16 false --use_cpu true`"):
        cli_main(argv)
    _, args, _, _ = parse_args([*argv[1:], "--bf16", "false", "--use_cpu", "true"])  # the advice works
    assert (args.bf16, args.use_cpu, args.supervision) == (False, True, "release")


def test_unknown_recipe_field_is_an_error(tmp_path):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("model_name_or_path: student\nsupervison: full\n")
    with pytest.raises(ValueError, match="supervison"):
        _parse("--config", str(recipe))


@pytest.mark.parametrize(
    "name, distributed_type, processes",
    [("single_gpu", "NO", 1), ("multi_gpu", "MULTI_GPU", 8), ("fsdp2", "FSDP", 8), ("zero3", "DEEPSPEED", 8)],
)
def test_accelerate_configs_load(name, distributed_type, processes):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(CONFIGS / "accelerate" / f"{name}.yaml"))  # rejects unknown keys
    assert (config.distributed_type, config.num_processes, config.mixed_precision) == (
        distributed_type,
        processes,
        "bf16",
    )
    if name == "fsdp2":
        assert config.fsdp_config["fsdp_version"] == 2
    if name == "zero3":
        assert config.deepspeed_config["zero_stage"] == 3


# --- Prompt datasets -------------------------------------------------------------------------------------------------


def test_load_standard_and_conversational_files(tmp_path):
    standard = _write_jsonl(tmp_path / "standard.jsonl", [{"prompt": "2 + 2 ="}, {"prompt": "3 + 3 ="}])
    chat = [{"prompt": [{"role": "user", "content": "Hi"}]}]
    Dataset.from_list(chat).to_parquet(tmp_path / "chat.parquet")
    (tmp_path / "chat.json").write_text(json.dumps(chat))
    assert load_prompt_dataset(standard)["prompt"] == ["2 + 2 =", "3 + 3 ="]
    for path in (tmp_path / "chat.parquet", tmp_path / "chat.json"):
        dataset = load_prompt_dataset(str(path))
        validate_prompt_dataset(dataset, str(path))
        assert dataset[0]["prompt"] == [{"role": "user", "content": "Hi"}]
    assert load_prompt_dataset(standard, split="train[:1]")["prompt"] == ["2 + 2 ="]


def test_load_a_saved_dataset_directory(tmp_path):
    Dataset.from_dict({"prompt": ["a", "b"]}).save_to_disk(tmp_path / "saved")
    assert load_prompt_dataset(str(tmp_path / "saved"))["prompt"] == ["a", "b"]


def test_missing_prompt_column_names_found_and_expected_columns(tmp_path):
    path = _write_jsonl(tmp_path / "qa.jsonl", [{"id": 1, "question": "Why?", "answer": "Because."}])
    with pytest.raises(ValueError) as error:
        validate_prompt_dataset(load_prompt_dataset(path), path)
    message = str(error.value)
    assert "no 'prompt' column" in message and "['id', 'question', 'answer']" in message
    assert "dataset_prompt_column" in message and "could hold them: ['question', 'answer']" in message


@pytest.mark.parametrize(
    "rows, match",
    [
        ([{"prompt": 3}], "must hold strings .* first row holds int"),
        ([{"prompt": []}], "must hold strings .* first row holds list"),
        ([{"prompt": [{"text": "no role"}]}], "must hold strings"),
    ],
)
def test_unusable_prompt_values(tmp_path, rows, match):
    with pytest.raises(ValueError, match=match):
        validate_prompt_dataset(Dataset.from_list(rows), "rows")


def test_empty_datasets(tmp_path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="empty.jsonl' is empty"):
        load_prompt_dataset(str(tmp_path / "empty.jsonl"))
    with pytest.raises(ValueError, match="'none' is empty"):
        validate_prompt_dataset(Dataset.from_dict({"prompt": []}), "none")


def test_unsupported_file_suffix(tmp_path):
    (tmp_path / "prompts.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"supported suffixes are \.json, \.jsonl, \.parquet"):
        load_prompt_dataset(str(tmp_path / "prompts.txt"))


def test_prepare_maps_a_column_onto_prompt_and_wraps_chat(tmp_path):
    path = _write_jsonl(tmp_path / "q.jsonl", [{"prompt": "old", "question": "What is 2 + 2?", "answer": "4"}])
    for streaming in (False, True):
        dataset = load_prompt_dataset(path, streaming=streaming)
        row = next(iter(prepare_prompt_dataset(dataset, path, "question", as_chat=True)))
        assert row == {"prompt": [{"role": "user", "content": "What is 2 + 2?"}], "answer": "4"}
    chat = Dataset.from_list([{"prompt": [{"role": "system", "content": "Be brief."}]}])
    assert prepare_prompt_dataset(chat, "chat", as_chat=True)[0] == chat[0]  # conversational prompts are kept


# --- Through the command line ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    """A student and a teacher (tiny random Qwen2 models sharing one tokenizer) saved to local directories."""
    root = tmp_path_factory.mktemp("models")
    tokenizer = make_tokenizer()
    dirs = {}
    for name, seed in (("student", 1), ("teacher", 2)):
        dirs[name] = str(root / name)
        make_model(len(tokenizer), seed=seed).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    return dirs


@pytest.fixture
def questions(tmp_path):
    rows = [{"question": f"Tom has {i} apples. How many are left?", "answer": str(i)} for i in range(4)]
    return _write_jsonl(tmp_path / "questions.jsonl", rows)


def _distill_argv(model_dirs, dataset, output_dir, extra=""):
    models = ["--model_name_or_path", model_dirs["student"], "--teacher_model_name_or_path", model_dirs["teacher"]]
    return [*models, "--dataset_name", dataset, "--output_dir", str(output_dir), *TINY, *extra.split()]


def _without(argv, flag):
    index = argv.index(flag)
    return argv[:index] + argv[index + 2 :]


def test_dataset_errors_come_before_any_model_is_loaded(tmp_path, questions):
    missing = str(tmp_path / "no-such-model")
    argv = _distill_argv({"student": missing, "teacher": missing}, questions, tmp_path / "out")
    with pytest.raises(ValueError, match=r"no 'prompt' column; found columns \['question', 'answer'\]"):
        build_trainer(*parse_args(argv))
    with pytest.raises(ValueError, match="No prompts: set `--dataset_name`"):
        build_trainer(*parse_args(_without(argv, "--dataset_name")))
    with pytest.raises(ValueError, match="Set the teacher with `--teacher_model_name_or_path`"):
        build_trainer(*parse_args(_without(argv, "--teacher_model_name_or_path")))
    with pytest.raises(OSError, match="no-such-model"):  # a valid dataset: now the model path is the problem
        build_trainer(*parse_args([*argv, "--dataset_prompt_column", "question"]))


def test_build_trainer_takes_the_parsed_arguments(tmp_path, model_dirs, questions):
    extra = (
        "--dataset_prompt_column question --dataset_prompt_as_chat --supervision fixed_prefix --fixed_prefix_length 4"
    )
    argv = _distill_argv(model_dirs, questions, tmp_path, extra)
    script_args, args, model_args, dataset_args = parse_args(argv)
    trainer = build_trainer(script_args, args, model_args, dataset_args)
    assert trainer.args is args and args.supervision == "fixed_prefix" and args.fixed_prefix_length == 4
    assert model_args.model_name_or_path == model_dirs["student"] and dataset_args.datasets == []
    assert trainer.train_dataset[0]["prompt"] == [{"role": "user", "content": "Tom has 0 apples. How many are left?"}]
    assert args.model_init_kwargs["dtype"] == "float32"  # ModelConfig's dtype reaches both models
    assert next(trainer.model.parameters()).dtype == torch.float32
    assert trainer.state.global_step == 0  # built, not trained


def test_dataset_mixture_and_eval_split_from_the_recipe(tmp_path, model_dirs, questions):
    recipe = tmp_path / "mixture.yaml"
    mixture = {
        "datasets": [{"path": "json", "data_files": questions, "columns": ["question"]}],
        "test_split_size": 0.5,
    }
    recipe.write_text(yaml.safe_dump({**mixture, "dataset_prompt_column": "question", "eval_strategy": "steps"}))
    argv = _without(_distill_argv(model_dirs, questions, tmp_path / "out"), "--dataset_name")
    trainer = build_trainer(*parse_args(["--config", str(recipe), *argv]))
    assert len(trainer.train_dataset) == len(trainer.eval_dataset) == 2
    prompts = [*trainer.train_dataset["prompt"], *trainer.eval_dataset["prompt"]]
    assert sorted(prompts) == [f"Tom has {i} apples. How many are left?" for i in range(4)]


def test_cli_trains_and_saves_the_student(tmp_path, model_dirs, questions):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "out"
    argv = _distill_argv(model_dirs, questions, out, "--dataset_prompt_column question --dataset_prompt_as_chat")
    assert cli_main(["distill", *argv]) == 0
    saved = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= saved
    before = AutoModelForCausalLM.from_pretrained(model_dirs["student"]).state_dict()
    after = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[name], after[name]) for name in before)  # the saved model was updated

    # The same run through the Python API of the README gives the same model.
    rows = [json.loads(line) for line in Path(questions).read_text().splitlines()]
    trainer = TeachabilityGKDTrainer(
        model=model_dirs["student"],
        teacher_model=model_dirs["teacher"],
        args=TeachabilityGKDConfig(
            output_dir=str(tmp_path / "api"),
            max_steps=1,
            per_device_train_batch_size=2,
            max_completion_length=8,
            use_cpu=True,
            report_to="none",
            bf16=False,
            gradient_checkpointing=False,
            save_strategy="no",
            segmentation="fixed",
            segment_window=3,
            learning_rate=0.05,
        ),
        train_dataset=Dataset.from_list([{"prompt": [{"role": "user", "content": row["question"]}]} for row in rows]),
    )
    trainer.train()
    for name, value in trainer.model.state_dict().items():
        torch.testing.assert_close(after[name], value, msg=name)


def test_cli_lora_saves_only_the_adapter(tmp_path, model_dirs, questions):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    lora = "--use_peft --lora_r 4 --lora_alpha 8 --lora_target_modules q_proj v_proj"
    argv = _distill_argv(model_dirs, questions, out, f"--dataset_prompt_column question {lora}")
    assert cli_main(["distill", *argv]) == 0
    files = {p.name for p in out.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files and "model.safetensors" not in files
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["r"] == 4 and adapter["lora_alpha"] == 8 and set(adapter["target_modules"]) == {"q_proj", "v_proj"}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dirs["student"]), out)
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert len(lora_b) == 2 * 2  # q_proj and v_proj of 2 layers
    assert any(p.abs().sum() > 0 for p in lora_b.values())  # B starts at 0: a non-zero B was trained
    assert all(math.isfinite(p.abs().sum().item()) for p in lora_b.values())


def test_recipe_args_reads_a_recipe_as_the_config_flag_does(tmp_path):
    recipe = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    recipe |= {"learning_rate": "1e-4", "model_name_or_path": "student", "env": {"TRL_LTC_TEST_RECIPE_ENV": "1"}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    flags = ["--max_steps", "3", "--supervision", "full"]
    from_dict, from_file = recipe_args(recipe, flags), parse_args(["--config", str(path), *flags])
    assert [type(args) for args in from_dict] == [type(args) for args in from_file]
    for a, b in zip(from_dict, from_file):
        assert dataclasses.asdict(a) == dataclasses.asdict(b)
    _, args, model_args, _ = from_dict
    assert args.learning_rate == 1e-4 and args.max_steps == 3 and args.supervision == "full"
    assert model_args.model_name_or_path == "student" and os.environ.pop("TRL_LTC_TEST_RECIPE_ENV") == "1"
    with pytest.raises(ValueError, match="supervison"):
        recipe_args({"supervison": "full"})
