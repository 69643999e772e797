"""`trl-ltc evaluate` and its pieces: the answer verifier, `evaluate_model`, loading base models and LoRA adapters."""

import json
from pathlib import Path

import pytest
import torch
from helpers import make_model, make_tokenizer
from peft import LoraConfig, get_peft_model
from trl.trainer.utils import pad

from trl_ltc import cli
from trl_ltc.evaluation import (
    answer_is_correct,
    choice_letter,
    evaluate_model,
    load_eval_problems,
    load_for_evaluation,
    reverse_kl,
)
from trl_ltc.generation import Rollouts, tokenize_prompts

# --- The verifier ------------------------------------------------------------------------------------------------

MATH_CASES = [
    # (completion, reference answer, correct?)
    ("6 packs x 7 = 42 balloons. She gives away 30, so 42 - 30 = 12 balloons are left.", "12", True),
    ("The answer is 12. Check: 6 * 7 = 42 and 42 - 30 = 12.", "12", True),
    ("The change is $13.00.", "13", True),
    ("In total it travels 180 + 165 = 345 km", "345", True),
    ("She has 1,200 stickers now.", "1200", True),
    ("So the final answer is $\\boxed{12}$.", "12", True),
    ("Half of it: 3/4 of a pizza is left", "0.75", True),
    ("The result is $\\frac{14}{3}$", "\\frac{14}{3}", True),
    ("12 balloons, wait, no: 6 * 7 - 30 = 14", "12", False),  # the last number is the answer
    ("The answer is 1,200", "12", False),
    ("Priya has twelve balloons left.", "12", False),  # no number: nothing to check
    ("", "12", False),
]


@pytest.mark.parametrize(("completion", "answer", "expected"), MATH_CASES)
def test_math_answers(completion, answer, expected):
    assert answer_is_correct(completion, answer) is expected


def test_choice_answers():
    assert choice_letter("A train leaves at noon. The answer is (C).") == "C"
    assert choice_letter("Answer: **B**") == "B"
    assert choice_letter("(A) is wrong and (D) is right") == "D"
    assert choice_letter("so the answer is \\boxed{B}, not (A)") == "B"
    assert choice_letter("A train leaves at noon.") is None
    assert answer_is_correct("The answer is (C).", "c", answer_type="choice")
    assert not answer_is_correct("The answer is (C).", "D", answer_type="choice")
    assert not answer_is_correct("no letter here", "A", answer_type="choice")
    with pytest.raises(ValueError, match="answer_type"):
        answer_is_correct("12", "12", answer_type="exact")


# --- evaluate_model on hand-made completions ------------------------------------------------------------------------

PROMPTS = [
    [{"role": "user", "content": "Tom has 12 apples and gives away 5. How many are left?"}],
    [{"role": "user", "content": "Let x = 3. What is 2x + 1?"}],
]


def _rollouts(tokenizer, texts, eos_after):
    """Prompts repeated per completion (problem-major) and the given completion texts, EOS appended where asked."""
    per_problem = len(texts) // len(PROMPTS)
    prompts = [torch.tensor(ids) for ids in tokenize_prompts(tokenizer, PROMPTS) for _ in range(per_problem)]
    completions = []
    for text, eos in zip(texts, eos_after):
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([tokenizer.eos_token_id] if eos else [])
        completions.append(torch.tensor(ids))

    def ones(rows):
        return [torch.ones_like(row) for row in rows]

    return Rollouts(
        pad(prompts, padding_value=tokenizer.pad_token_id, padding_side="left"),
        pad(ones(prompts), padding_value=0, padding_side="left"),
        pad(completions, padding_value=tokenizer.pad_token_id, padding_side="right"),
        pad(ones(completions), padding_value=0, padding_side="right"),
    )


def test_evaluate_model_metrics_on_known_completions(tokenizer):
    student, teacher = make_model(len(tokenizer), seed=1), make_model(len(tokenizer), seed=2)
    texts = ["so 7 remain.", "Tom has 12 apples.", "2x + 1 = 7", "the answer is 7"]  # problem 0: 1/2, problem 1: 2/2
    rollouts = _rollouts(tokenizer, texts, eos_after=[True, False, True, True])
    metrics = evaluate_model(student, teacher, tokenizer, PROMPTS, ["7", "7"], num_samples=2, rollouts=rollouts)
    assert metrics["accuracy"] == pytest.approx((0.5 + 1.0) / 2)
    assert metrics["accuracy_stderr"] == pytest.approx(0.25)  # std of (0.5, 1.0) = 0.3536, / sqrt(2)
    lengths = rollouts.completion_mask.sum(1).float()
    assert metrics["completion_length"] == pytest.approx(float(lengths.mean()))
    assert metrics["truncated_frac"] == pytest.approx(0.25)  # one completion without EOS
    assert metrics["reverse_kl"] == pytest.approx(reverse_kl(student, teacher, rollouts), rel=1e-6)
    assert [s["correct"] for s in metrics["samples"]] == [True, False, True, True]
    assert [s["problem"] for s in metrics["samples"]] == [0, 0, 1, 1]
    assert metrics["samples"][1]["completion"] == "Tom has 12 apples."

    no_teacher = evaluate_model(student, None, tokenizer, PROMPTS, None, num_samples=2, rollouts=rollouts)
    assert no_teacher["reverse_kl"] is None and no_teacher["accuracy"] is None
    with pytest.raises(ValueError, match="one answer per prompt"):
        evaluate_model(student, None, tokenizer, PROMPTS, ["7"], rollouts=rollouts)


def test_evaluate_model_samples_are_seeded_and_leave_the_rng_alone(tokenizer):
    student, teacher = make_model(len(tokenizer), seed=1), make_model(len(tokenizer), seed=2)
    torch.manual_seed(123)
    expected_next = torch.rand(())
    torch.manual_seed(123)
    kwargs = dict(num_samples=2, max_new_tokens=5, batch_size=3, seed=7, progress=False)
    first = evaluate_model(student, teacher, tokenizer, PROMPTS, ["7", "7"], **kwargs)
    assert torch.rand(()) == expected_next
    second = evaluate_model(student, teacher, tokenizer, PROMPTS, ["7", "7"], **kwargs)
    assert [s["completion"] for s in first["samples"]] == [s["completion"] for s in second["samples"]]
    assert first["reverse_kl"] == second["reverse_kl"] > 0
    assert len(first["samples"]) == 4 and all(s["length"] <= 5 for s in first["samples"])


def test_load_eval_problems(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "solution": str(2 * i)} for i in range(5)]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    prompts, answers = load_eval_problems(
        str(path), prompt_column="question", answer_column="solution", num_problems=3
    )
    assert prompts == ["What is 0 + 0?", "What is 1 + 1?", "What is 2 + 2?"] and answers == ["0", "2", "4"]
    prompts, _ = load_eval_problems(str(path), prompt_column="question", answer_column="solution", prompt_as_chat=True)
    assert len(prompts) == 5 and prompts[0] == [{"role": "user", "content": "What is 0 + 0?"}]
    with pytest.raises(ValueError, match="no answer column 'answer'.*'question', 'solution'"):
        load_eval_problems(str(path), prompt_column="question")


# --- `trl-ltc evaluate` on saved checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A tiny teacher and student saved as model folders, a LoRA adapter of the student, and held-out problems."""
    root = tmp_path_factory.mktemp("checkpoints")
    tokenizer = make_tokenizer()
    dirs = {}
    for name, seed in (("teacher", 2), ("student", 1)):
        dirs[name] = root / name
        make_model(len(tokenizer), seed=seed).save_pretrained(dirs[name])
        tokenizer.save_pretrained(dirs[name])
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(dirs["student"])  # so the adapter names this folder as its base
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    dirs["adapter"] = root / "adapter"
    get_peft_model(base, config).save_pretrained(dirs["adapter"])
    problems = root / "problems.jsonl"
    rows = [{"prompt": p, "answer": "7"} for p in PROMPTS * 2]
    problems.write_text("".join(json.dumps(row) + "\n" for row in rows))
    dirs["problems"] = problems
    return {name: str(path) for name, path in dirs.items()}


def _evaluate(checkpoints, tmp_path, model, *extra):
    out = tmp_path / f"{len(list(tmp_path.iterdir()))}.json"
    argv = ["evaluate", "--model_name_or_path", model, "--teacher_model_name_or_path", checkpoints["teacher"]]
    argv += ["--dataset_name", checkpoints["problems"]]
    argv += [
        "--num_problems",
        "3",
        "--num_samples",
        "2",
        "--max_completion_length",
        "6",
        "--batch_size",
        "4",
        "--disable_tqdm",
    ]
    assert cli.main([*argv, "--output_dir", str(out), *extra]) == 0
    return json.loads(out.read_text()), out


def test_evaluate_command_on_a_model_and_a_lora_adapter(checkpoints, tmp_path, capsys):
    base, out = _evaluate(checkpoints, tmp_path, checkpoints["student"], "--save_samples")
    assert base["num_problems"] == 3 and base["num_samples"] == 2 and base["max_new_tokens"] == 6
    assert base["reverse_kl"] > 0 and 0.0 <= base["accuracy"] <= 1.0 and 0 < base["completion_length"] <= 6
    assert base["model"] == checkpoints["student"] and base["teacher"] == checkpoints["teacher"]
    samples = [json.loads(line) for line in out.with_suffix(".samples.jsonl").read_text().splitlines()]
    assert len(samples) == 6 and {"problem", "completion", "length", "correct"} <= set(samples[0])
    printed = capsys.readouterr().out
    assert f"{base['reverse_kl']:.4f} nats/token" in printed and str(out) in printed

    # The adapter is loaded on the base its config names, so it evaluates as the PEFT model in memory does.
    adapter, _ = _evaluate(checkpoints, tmp_path, checkpoints["adapter"])
    model, tokenizer = load_for_evaluation(checkpoints["adapter"])
    from peft import PeftModel

    assert isinstance(model, PeftModel)
    prompts, answers = load_eval_problems(checkpoints["problems"], num_problems=3)
    direct = evaluate_model(
        model, load_for_evaluation(checkpoints["teacher"])[0], tokenizer, prompts, answers,
        num_samples=2, max_new_tokens=6, batch_size=4, seed=0, progress=False,
    )  # fmt: skip
    assert adapter["reverse_kl"] == pytest.approx(direct["reverse_kl"], rel=1e-6)
    assert adapter["reverse_kl"] != pytest.approx(base["reverse_kl"], rel=1e-3)  # the adapter changes the model
    explicit, _ = _evaluate(checkpoints, tmp_path, checkpoints["adapter"], "--base_model", checkpoints["student"])
    assert explicit["reverse_kl"] == pytest.approx(adapter["reverse_kl"], rel=1e-6)


def test_evaluate_command_default_output_in_the_model_folder(checkpoints):
    argv = ["evaluate", "--model_name_or_path", checkpoints["adapter"], "--teacher_model_name_or_path"]
    argv += [checkpoints["teacher"], "--dataset_name", checkpoints["problems"], "--num_problems", "1"]
    argv += ["--max_completion_length", "2", "--disable_tqdm"]
    assert cli.main(argv) == 0
    path = Path(checkpoints["adapter"]) / "eval_metrics.json"
    assert json.loads(path.read_text())["num_problems"] == 1
    path.unlink()


def test_evaluate_command_errors(checkpoints, capsys):
    with pytest.raises(SystemExit) as exit_info:
        argv = ["--model_name_or_path", checkpoints["student"], "--dataset_name", checkpoints["problems"]]
        cli.main(["evaluate", *argv])
    assert exit_info.value.code == 2
    assert "missing --teacher_model_name_or_path" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        argv = ["--model_name_or_path", "m", "--teacher_model_name_or_path", "t", "--dataset_name", "d"]
        cli.main(["evaluate", *argv, "--num_samples", "0"])
    assert "--num_samples must be >= 1" in capsys.readouterr().err
    with pytest.raises(ValueError, match="only for LoRA adapter"):
        load_for_evaluation(checkpoints["student"], base_model=checkpoints["teacher"])


def test_evaluate_command_old_flag_spellings_still_work(checkpoints, tmp_path):
    new, _ = _evaluate(checkpoints, tmp_path, checkpoints["student"])
    out = tmp_path / "old.json"
    argv = ["evaluate", "--model", checkpoints["student"], "--teacher", checkpoints["teacher"], "--dataset"]
    argv += [checkpoints["problems"], "--dataset_split", "train", "--prompt_column", "prompt", "--num_problems", "3"]
    argv += ["--num_samples", "2", "--max_new_tokens", "6", "--batch_size", "4", "--no_progress", "--output", str(out)]
    with pytest.warns(FutureWarning, match="--max_new_tokens` is deprecated.*--max_completion_length"):
        assert cli.main(argv) == 0
    old = json.loads(out.read_text())
    old.pop("seconds"), new.pop("seconds")
    assert old == new  # same options, same metrics, same keys


def test_evaluate_command_with_a_distill_recipe(checkpoints, tmp_path):
    """`--config RECIPE --model_name_or_path CHECKPOINT`: the recipe's teacher, prompts and completion length."""
    recipe = tmp_path / "recipe.yaml"
    fields = {
        "model_name_or_path": "the-initial-student", "teacher_model_name_or_path": checkpoints["teacher"],
        "dataset_name": checkpoints["problems"], "max_completion_length": 5, "top_k": 3, "supervision": "release",
        "use_peft": True, "lora_r": 4, "output_dir": str(tmp_path / "training_run"), "learning_rate": 1e-4,
    }  # fmt: skip
    recipe.write_text("".join(f"{key}: {json.dumps(value)}\n" for key, value in fields.items()))
    output_dir = tmp_path / "metrics"
    argv = ["evaluate", "--config", str(recipe), "--model_name_or_path", checkpoints["student"], "--num_problems"]
    argv += ["2", "--disable_tqdm", "--output_dir", str(output_dir)]
    assert cli.main(argv) == 0
    metrics = json.loads((output_dir / "eval_metrics.json").read_text())
    assert metrics["model"] == checkpoints["student"] and metrics["teacher"] == checkpoints["teacher"]
    assert metrics["max_new_tokens"] == 5 and metrics["num_problems"] == 2
    assert not (tmp_path / "training_run").exists()  # the recipe's output_dir is its training folder: not used
