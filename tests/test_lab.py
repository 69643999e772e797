"""The lab task: problems, solutions, tokenizer, answer checking, the pair build, and the lab comparison preset."""

import json
import random
import re

import pytest
import torch

from trl_ltc import lab
from trl_ltc.evaluation import answer_is_correct


def test_solution_by_hand():
    # 4, 4+7=11 -> 1, 1+2=3, 3+9=12 -> 2
    assert lab.solution([4, 7, 2, 9]) == "a:4\nb:4+7=1\nc:1+2=3\nd:3+9=2\nanswer:2\n"


def test_problem_answer_matches_its_solution_and_the_documented_length():
    rng = random.Random(0)
    for length in (2, 14, 20, 26):
        problem = lab.make_problem(rng, length)
        text = lab.solution(problem["digits"])
        assert problem["prompt"].count(" ") == length - 1 and problem["prompt"].endswith("\n")
        assert text.splitlines()[-1] == f"answer:{problem['answer']}"
        assert int(problem["answer"]) == sum(problem["digits"]) % 10
        assert len(text) == 8 * length + 5  # characters, i.e. tokens (EOS comes on top)
    with pytest.raises(ValueError, match="length"):
        lab.make_problem(rng, 27)


def test_tokenizer_named_digits_are_one_token_and_the_rest_one_per_character():
    tokenizer = lab.build_tokenizer()
    prompt, completion = "a4 b7\n", "a:4\nb:4+7=1\nanswer:1\n"
    assert tokenizer.convert_ids_to_tokens(tokenizer(prompt)["input_ids"]) == ["a4", " ", "b7", "\n"]
    ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(completion) and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids) == completion
    assert tokenizer.decode([*ids, tokenizer.eos_token_id], skip_special_tokens=True) == completion
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token_id != tokenizer.eos_token_id
    assert len(tokenizer) == 3 + 41 + 260  # specials, characters, letter-digit pairs


def test_statement_answers_by_hand():
    assert answer_is_correct("a:4\nb:4+7=1\nanswer:1\n", "1", "statement")
    assert not answer_is_correct("a:4\nb:4+7=1\nanswer:11\n", "1", "statement")  # exact, not a prefix
    assert answer_is_correct("answer:3\nanswer: 1 \n", "1", "statement")  # the last statement counts
    assert not answer_is_correct("a:4\nb:4+7=1\n", "1", "statement")  # cut before the answer line
    assert not answer_is_correct("the answer is 1", "1", "statement")


def test_splits_are_fixed_disjoint_in_length_and_cached(tmp_path):
    assert lab.problems("test", 5) == lab.problems("test", 5)
    assert all(14 <= len(p["digits"]) <= 20 for p in lab.problems("test", 64))
    ood = lab.problems("ood", 64)
    assert all(14 <= len(p["digits"]) <= 20 and min(p["digits"]) >= 5 for p in ood)
    assert {d for p in ood for d in p["digits"]} == {5, 6, 7, 8, 9}
    path = lab.lab_dataset_path("ood", cache_dir=tmp_path)
    rows = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert len(rows) == 512 and set(rows[0]) == {"prompt", "answer"}
    assert rows[0]["prompt"] == lab.problems("ood", 1)[0]["prompt"]
    with pytest.raises(ValueError, match="split"):
        lab.lab_dataset_path("dev", cache_dir=tmp_path)


def test_pair_build_is_published_once_and_records_how(tmp_path):
    pair = lab.LabPair(
        teacher=lab.LabModel(16, 1, 3, seed=0, batch_size=4),
        student=lab.LabModel(16, 1, 4, seed=1, batch_size=4, target_accuracy=0.0, eval_every=2),
    )
    teacher, student = lab.prepare_lab_pair(pair=pair, directory=tmp_path, progress=False)
    record = json.loads((tmp_path / "student.json").read_text())
    assert record["steps_trained"] == 2  # stopped at the first check: accuracy >= 0
    assert json.loads((tmp_path / "teacher.json").read_text())["steps_trained"] == 3
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student)
    assert model.config.num_hidden_layers == 1 and len(AutoTokenizer.from_pretrained(teacher)) == model.config.vocab_size
    text = "a4 b7\na:4\nb:4+7=1\nanswer:1\n"  # the saved tokenizer loads back as built (spaces and newlines kept)
    assert AutoTokenizer.from_pretrained(student)(text)["input_ids"] == lab.build_tokenizer()(text)["input_ids"]
    stamp = (tmp_path / "teacher" / "config.json").stat().st_mtime_ns
    assert lab.prepare_lab_pair(pair=pair, directory=tmp_path, progress=False) == (teacher, student)
    assert (tmp_path / "teacher" / "config.json").stat().st_mtime_ns == stamp  # not rebuilt
    assert re.fullmatch(r"[\w.-]+", pair.key) and pair.key != lab.DEFAULT_PAIR.key


def test_pretraining_learns_the_format():
    """A few dozen steps teach a tiny model the line format (loss falls well below uniform over the vocabulary)."""
    tokenizer = lab.build_tokenizer()
    spec = lab.LabModel(32, 1, 30, seed=0, batch_size=8, learning_rate=3e-3)
    model = lab._model(tokenizer, spec)
    ids, mask, labels = lab._batch(tokenizer, random.Random(1), 8)
    before = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    model, steps, _ = lab.train_from_scratch(model, tokenizer, spec, progress=False)
    with torch.no_grad():
        after = model(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert steps == 30 and before > 0.8 * torch.log(torch.tensor(len(tokenizer))).item() and after < 0.75 * before
