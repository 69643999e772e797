"""The lab bench's positive control: the fade teacher's data, the fade pair build (reusing the lab student), that a
model trained on faded solutions is sharp early and flat late, and the `lab_fade` comparison preset end to end."""

import collections
import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from trl_ltc import cli, lab

ROOT = Path(__file__).resolve().parents[1]
FADE = ROOT / "configs" / "compare_lab_fade.yaml"


def _lines(text):
    """`[(letter, restated sum, digit, result)]` of a completion's step lines (`b:4+7=1`)."""
    out = []
    for line in text.splitlines()[1:-1]:
        letter, rest = line.split(":")
        total, rest = rest.split("+")
        digit, result = rest.split("=")
        out.append((letter, int(total), int(digit), int(result)))
    return out


def test_faded_solution_keeps_the_prefix_and_the_copies_and_randomises_late_results():
    rng = random.Random(0)
    counts = collections.Counter()
    for trial in range(400):
        problem = lab.make_problem(rng, rng.randint(14, 20))
        digits = problem["digits"]
        text = lab.faded_solution(digits, 8, rng)
        assert len(text) == 8 * len(digits) + 5  # the format, and so the token positions, of `solution`
        correct = lab.solution(digits).splitlines()
        faded = text.splitlines()
        assert faded[:9] == correct[:9]  # line 0 and steps 1..8 are the correct ones
        steps = _lines(text)
        previous = digits[0]
        for step, (letter, total, digit, result) in enumerate(steps, start=1):
            assert letter == lab.LETTERS[step] and digit == digits[step]
            assert total == previous  # every line restates the previous line's result, random or not
            if step <= 8:
                assert result == (total + digit) % 10
            else:
                counts[result] += 1
            previous = result
        assert faded[-1] == f"answer:{previous}"
    # the late result digits are uniform over 0-9 (about 2,800 draws: each share within 0.1 +- 0.025)
    total = sum(counts.values())
    assert set(counts) == set(range(10)) and all(abs(c / total - 0.1) < 0.025 for c in counts.values())
    assert lab.faded_solution([4, 7, 2, 9], 3, random.Random(0)) == lab.solution([4, 7, 2, 9])  # nothing after 3
    with pytest.raises(ValueError, match="fade_after"):
        lab.faded_solution([4, 7], -1, rng)


def test_default_pair_key_unchanged_and_fade_pair_shares_its_student():
    # the folder name of the cached default pair (built by earlier versions): it must not move
    assert lab.DEFAULT_PAIR.key == "running_sum_mod10-t3x128-1500s32b0.001lr-0-s2x128-800s32b0.001lra0.3e5-1"
    fade, default = lab.FADE_PAIR, lab.DEFAULT_PAIR
    assert fade.student == default.student and fade.student_pair is default and fade.key != default.key
    assert fade.teacher.fade_after == lab.FADE_AFTER
    # the fade teacher is the default one in every setting but the data
    assert {**vars(fade.teacher), "fade_after": None} == vars(default.teacher)
    assert lab.LAB_PRESETS["lab"][0] is default and lab.LAB_PRESETS["lab_fade"][0] is fade
    with pytest.raises(ValueError, match="student_pair"):
        lab.LabPair(teacher=fade.teacher, student=lab.LabModel(64, 2, 10, seed=1), student_pair=default)


def test_fade_pair_build_reuses_the_student_of_its_source_pair(tmp_path):
    source = lab.LabPair(
        teacher=lab.LabModel(16, 1, 2, seed=0, batch_size=4), student=lab.LabModel(16, 1, 3, seed=1, batch_size=4)
    )
    fade = lab.LabPair(
        teacher=lab.LabModel(16, 1, 2, seed=0, batch_size=4, fade_after=2), student=source.student, student_pair=source
    )
    teacher, student = lab.prepare_lab_pair(cache_dir=tmp_path, pair=fade, progress=False)
    assert Path(teacher) == tmp_path / "lab" / fade.key / "teacher"
    assert Path(student) == tmp_path / "lab" / source.key / "student"  # built where the source pair keeps it
    assert not (tmp_path / "lab" / fade.key / "student").exists()
    assert json.loads((tmp_path / "lab" / fade.key / "teacher.json").read_text())["fade_after"] == 2
    stamp = (Path(student) / "config.json").stat().st_mtime_ns
    _, source_student = lab.prepare_lab_pair(cache_dir=tmp_path, pair=source, progress=False)
    assert source_student == student and (Path(student) / "config.json").stat().st_mtime_ns == stamp  # reused
    # a student folder recorded with other settings is refused, not reused
    record = tmp_path / "lab" / source.key / "student.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "seed": 7}))
    with pytest.raises(ValueError, match="other settings"):
        lab.prepare_lab_pair(cache_dir=tmp_path, pair=fade, progress=False)


def _memorise(fade_after, steps=120, problems=4):
    """A tiny model trained on the same few problems again and again: whatever in their completions is a function of
    the text is memorised; the faded result digits are drawn afresh on every pass, so they cannot be."""
    tokenizer = lab.build_tokenizer()
    spec = lab.LabModel(64, 1, steps, seed=0, batch_size=problems, fade_after=fade_after)
    model = lab._model(tokenizer, spec)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    fade_rng = random.Random(1)
    for _ in range(steps):
        ids, mask, labels = lab._batch(tokenizer, random.Random(0), problems, fade_after, fade_rng)
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    rng = random.Random(0)  # the problems `_batch` drew
    items = [lab.make_problem(rng, rng.randint(*lab.IN_DOMAIN)) for _ in range(problems)]
    return lab.fade_profile(model.eval(), model, tokenizer, items, top_k=10)


def test_a_model_trained_on_faded_solutions_is_sharp_before_the_fade_and_flat_after_it():
    torch.set_num_threads(1)
    fade_after = 4
    profile = _memorise(fade_after)
    early = [i for i in profile["step"] if 1 <= i <= fade_after]
    late = [i for i in profile["step"] if i > fade_after]
    at = {name: dict(zip(profile["step"], profile[name])) for name in profile if name not in ("step", "answer")}
    # after the fade: flat over the ten digits (entropy near log 10, the right digit at chance, no margin)
    for i in late:
        assert abs(at["result_entropy"][i] - math.log(10)) < 0.15
        assert abs(at["result_logprob"][i] - math.log(0.1)) < 0.6 and at["result_margin"][i] < 0.5
    # before it: sharp and right
    for i in early:
        assert at["result_entropy"][i] < 0.5 * math.log(10) and at["result_logprob"][i] > math.log(0.5)
        assert at["result_margin"][i] > 2.0
    # the mean margin over a whole line (a segment's score) falls after the fade
    mean = lambda name, steps: sum(at[name][i] for i in steps) / len(steps)
    assert mean("line_margin", late) < mean("line_margin", early)
    # control: the same training on correct solutions leaves the late result digits as sharp as the early ones
    control = _memorise(None)
    assert all(e < 0.5 * math.log(10) for i, e in zip(control["step"], control["result_entropy"]) if i > fade_after)


def test_fade_config_is_the_lab_protocol_on_the_fade_pair(monkeypatch):
    built = []
    monkeypatch.setattr(lab, "prepare_lab_pair", lambda **kwargs: built.append(kwargs) or ("teacher", "student"))
    from trl_ltc.compare import load_comparison

    comparison = load_comparison(FADE)
    assert built == [{"pair": lab.FADE_PAIR}]
    names = [p.name for p in comparison.policies]
    assert names == ["full", "release", "release_calibrated", "random_release", "iw_opd"]
    fields = {p.name: p.fields for p in comparison.policies}
    assert fields["release_calibrated"] == {"supervision": "release", "release_alpha": 0.05}
    assert fields["iw_opd"] == {"supervision": "iw_opd"} and "release_alpha" not in fields["release"]
    assert comparison.seeds == [0, 1, 2] and comparison.diagnostics.num_prompts == 256
    # the lab bench's protocol: only the pair and the policies differ
    lab_config = yaml.safe_load((ROOT / "configs" / "compare_lab.yaml").read_text())
    fade_config = yaml.safe_load(FADE.read_text())
    assert set(fade_config) == set(lab_config)
    for key in set(lab_config) - {"preset", "policies", "output_dir"}:
        assert fade_config[key] == lab_config[key], key
    assert fade_config["output_dir"] != lab_config["output_dir"]
    assert comparison.distill["model_name_or_path"] == "student" and comparison.distill["segmentation"] == "newline"
    assert (ROOT / "trl_ltc" / "resources" / FADE.name).read_bytes() == FADE.read_bytes()


def test_lab_fade_smoke_end_to_end(tmp_path):
    out = tmp_path / "fade"
    assert cli.main(["compare", "--config", str(FADE), "--smoke", "--seeds", "0", "--output_dir", str(out)]) == 0
    teacher = json.loads((out / "smoke_models" / "lab_fade" / "teacher.json").read_text())
    assert teacher["fade_after"] == lab.SMOKE_FADE_PAIR.teacher.fade_after
    collapse = json.loads((out / "diagnose" / "collapse.json").read_text())
    assert collapse["trajectories"] == 4 and 0 <= collapse["accepted_fraction"] <= 1
    with open(out / "results.csv", encoding="utf-8") as file:
        rows = {r["policy"]: r for r in csv.DictReader(file) if r["kind"] == "run"}
    for name in ("full", "release", "release_calibrated", "random_release", "iw_opd"):
        assert float(rows[name]["tokens_trained"]) > 0 and 0 <= float(rows[name]["in_domain/accuracy"]) <= 1
    assert float(rows["full"]["kept_token_frac"]) == 1.0
