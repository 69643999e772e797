"""The command-line convention of the subcommands: `TrlParser` dataclasses, `--config` (a `trl-ltc distill` recipe
as is), TRL's option names, the deprecated spellings, unknown flags, and `distill --accelerate_config`."""

import dataclasses
import subprocess
import sys
import warnings
import weakref
from pathlib import Path

import pytest
import yaml

from trl_ltc.commands import compare as compare_command
from trl_ltc.commands import diagnose as diagnose_command
from trl_ltc.commands import distill as distill_command
from trl_ltc.commands import evaluate as evaluate_command
from trl_ltc.commands import quickstart as quickstart_command
from trl_ltc.commands._args import rename_deprecated_flags
from trl_ltc.compare import CompareConfigError, load_comparison

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
QWEN3_RECIPE = CONFIGS / "qwen3-1.7b_from_qwen3-30b-a3b.yaml"


def _yaml(tmp_path, name="config.yaml", **fields) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(fields, sort_keys=False))
    return str(path)


def _no_warnings(parse, argv):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        return parse(argv)


# --- `--config` ----------------------------------------------------------------------------------------------------


def test_diagnose_reads_its_options_from_config_and_flags_override(tmp_path):
    config = _yaml(
        tmp_path, model_name_or_path="s", teacher_model_name_or_path="t", dataset_name="p.jsonl",
        release_top_k=5, release_top_k_sweep=[2, 5], num_prompts=3, segmentation="fixed", disable_tqdm=True,
    )  # fmt: skip
    args = _no_warnings(diagnose_command.parse_args, ["--config", config, "--num_prompts", "4"])
    assert isinstance(args, diagnose_command.DiagnoseArguments)
    assert (args.model_name_or_path, args.teacher_model_name_or_path, args.dataset_name) == ("s", "t", "p.jsonl")
    assert (args.release_top_k, args.num_prompts, args.segmentation, args.disable_tqdm) == (5, 4, "fixed", True)
    assert diagnose_command._int_list(args.release_top_k_sweep) == [2, 5]  # a YAML list works as well as "2,5"


def test_evaluate_reads_its_options_from_config(tmp_path):
    config = _yaml(tmp_path, model_name_or_path="m", teacher_model_name_or_path="t", dataset_name="d.jsonl",
                   dataset_test_split="test", num_samples=4, max_completion_length=32)  # fmt: skip
    args = _no_warnings(evaluate_command.parse_args, ["--config", config])
    assert isinstance(args, evaluate_command.EvaluateArguments)
    assert (args.model_name_or_path, args.dataset_test_split, args.num_samples) == ("m", "test", 4)
    assert args.max_completion_length == 32


def test_quickstart_config_is_the_recipe_it_runs(tmp_path):
    recipe = _yaml(tmp_path, supervision="full", max_steps=3, eval_prompts=5)
    args, passthrough = quickstart_command.build_parser().parse_command(
        ["--config", recipe, "--supervision", "release", "--eval_batch_size", "2"], passthrough=True
    )
    assert (args.max_steps, args.eval_prompts, args.eval_batch_size) == (3, 32, 2)  # eval_*: flags only
    assert passthrough == ["--supervision", "release"]  # distill's flags go through, in order
    argv = quickstart_command._distill_argv(args, "T", "S", quickstart_command._config_path(["--config", recipe]))
    assert argv[:2] == ["--config", recipe] and argv[argv.index("--max_steps") + 1] == "3"
    default, _ = quickstart_command.build_parser().parse_command([], passthrough=True)
    assert quickstart_command._distill_argv(default, "T", "S")[1] == quickstart_command.recipe_path()


def test_quickstart_with_a_served_teacher_recipe():
    """`--teacher_server`: the recipe names the server instead of the teacher, with the advantage loss (a server has no
    full distribution for `parent`), and the printed `trl-ltc distill` command says the same."""
    args, passthrough = quickstart_command.build_parser().parse_command(["--teacher_server"], passthrough=True)
    assert args.teacher_server and passthrough == []
    url = "http://127.0.0.1:8000"
    recipe = quickstart_command._recipe(args, "T", "S", server=url)
    assert recipe["teacher_server_url"] == url and recipe["loss_type"] == "advantage"
    assert "teacher_model_name_or_path" not in recipe and "beta" not in recipe
    argv = quickstart_command._distill_argv(args, "T", "S", server=url)
    assert "--teacher_model_name_or_path" not in argv
    assert argv[argv.index("--teacher_server_url") + 1] == url and argv[argv.index("--loss_type") + 1] == "advantage"
    local = quickstart_command._recipe(args, "T", "S")
    assert local["teacher_model_name_or_path"] == "T" and "teacher_server_url" not in local


def test_compare_config_is_the_comparison(tmp_path, monkeypatch):
    seen = {}

    def fake_load(path, **kwargs):
        seen.update(path=path, **kwargs)
        raise CompareConfigError("stop here")

    monkeypatch.setattr(compare_command, "load_comparison", fake_load)
    comparison = _yaml(tmp_path, "comparison.yaml", preset="quickstart", seeds=[0, 1], policies=["full"])
    with pytest.raises(SystemExit) as exit_info:
        compare_command.main(["--config", comparison, "--seeds", "3", "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert seen["path"] == comparison and seen["seeds"] == "3" and seen["output_dir"] == str(tmp_path / "out")


def test_distill_config(tmp_path):
    config = _yaml(tmp_path, model_name_or_path="s", teacher_model_name_or_path="t", release_top_k=7, use_cpu=True)
    script_args, training_args, model_args, _ = distill_command.parse_args(["--config", config])
    assert (model_args.model_name_or_path, training_args.release_top_k) == ("s", 7)


# --- A `trl-ltc distill` recipe, as is -----------------------------------------------------------------------------


def test_diagnose_and_evaluate_accept_a_distill_recipe():
    recipe = yaml.safe_load(QWEN3_RECIPE.read_text())
    args = _no_warnings(diagnose_command.parse_args, ["--config", str(QWEN3_RECIPE)])
    assert args.model_name_or_path == recipe["model_name_or_path"]
    assert args.teacher_model_name_or_path == recipe["teacher_model_name_or_path"]
    assert args.dataset_name == recipe["dataset_name"] and args.dataset_train_split == recipe["dataset_train_split"]
    assert (args.dataset_prompt_column, args.dataset_prompt_as_chat) == ("question", True)
    assert args.release_top_k == recipe["release_top_k"] and args.segmentation == recipe["segmentation"]
    assert args.max_completion_length == recipe["max_completion_length"] and args.seed == recipe["seed"]
    assert args.output_dir == "out/diagnose"  # a recipe's output_dir is its training folder: not read

    args = _no_warnings(evaluate_command.parse_args, ["--config", str(QWEN3_RECIPE), "--model_name_or_path", "runs/x"])
    assert args.model_name_or_path == "runs/x"  # the trained checkpoint, against the recipe's teacher and prompts
    assert args.teacher_model_name_or_path == recipe["teacher_model_name_or_path"]
    assert args.dataset_name == recipe["dataset_name"] and args.dataset_prompt_column == "question"
    assert args.max_completion_length == recipe["max_completion_length"] and args.output_dir is None


@pytest.mark.parametrize("name", ["quickstart.yaml", "lab.yaml"])
def test_bundled_recipes_set_the_release_settings(name):
    recipe = yaml.safe_load((CONFIGS / name).read_text())
    args = _no_warnings(diagnose_command.parse_args, ["--config", str(CONFIGS / name), "--preset", "quickstart"])
    assert args.release_top_k == recipe["release_top_k"] and args.segmentation == recipe["segmentation"]
    assert args.max_completion_length == recipe["max_completion_length"] and args.preset == "quickstart"
    args = _no_warnings(evaluate_command.parse_args, ["--config", str(CONFIGS / name)])
    assert args.max_completion_length == recipe["max_completion_length"] and args.dtype == recipe["dtype"]


def test_a_recipes_top_k_is_not_the_release_k(tmp_path):
    recipe = _yaml(tmp_path, model_name_or_path="s", top_k=50, temperature=0.7)  # TRL's sampling top-k
    args = _no_warnings(diagnose_command.parse_args, ["--config", recipe])
    assert args.release_top_k == 10 and args.temperature == 0.7
    recipe = _yaml(tmp_path, "k.yaml", top_k=50, release_top_k=4)
    assert _no_warnings(diagnose_command.parse_args, ["--config", recipe]).release_top_k == 4
    assert _no_warnings(diagnose_command.parse_args, ["--config", recipe, "--release_top_k", "6"]).release_top_k == 6
    with pytest.warns(FutureWarning, match="--top_k.*--release_top_k"):  # the old flag on the command line
        assert diagnose_command.parse_args(["--config", recipe, "--top_k", "3"]).release_top_k == 3


def test_compare_takes_a_distill_recipe_with_a_test_split(tmp_path):
    fields = yaml.safe_load((CONFIGS / "quickstart.yaml").read_text())
    fields.update(model_name_or_path="s", teacher_model_name_or_path="t", dataset_name="problems.jsonl")
    no_split = _yaml(tmp_path, "recipe.yaml", **fields)
    with pytest.raises(CompareConfigError, match=r"(?s)is a `trl-ltc distill` recipe.*dataset_test_split.*recipe: "):
        compare_command.comparison_config(no_split)
    recipe = _yaml(tmp_path, "recipe_test.yaml", **fields, dataset_test_split="test")
    out = tmp_path / "out"
    written = compare_command.comparison_config(recipe, str(out))
    assert Path(written) == out / "comparison.yaml"
    comparison = load_comparison(written)
    assert [p.name for p in comparison.policies] == ["full", "release"] and comparison.seeds == [0]
    assert comparison.output_dir == out and comparison.distill["release_top_k"] == fields["release_top_k"]
    (eval_set,) = comparison.evaluation.sets
    assert (eval_set.dataset, eval_set.split) == ("problems.jsonl", "test")
    # A comparison config is passed through untouched.
    assert compare_command.comparison_config(str(CONFIGS / "compare_lab.yaml")) == str(CONFIGS / "compare_lab.yaml")


def test_compare_refuses_a_distill_recipe_without_test_split_with_the_fix(tmp_path, capsys):
    recipe = _yaml(tmp_path, supervision="release", model_name_or_path="s")
    with pytest.raises(SystemExit) as exit_info:
        compare_command.main(["--config", recipe, "--output_dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "is a `trl-ltc distill` recipe, not a comparison config" in capsys.readouterr().err


# --- Deprecated spellings ------------------------------------------------------------------------------------------

ALIASES = [
    (diagnose_command, "--student", "s", "model_name_or_path", "s"),
    (diagnose_command, "--teacher", "t", "teacher_model_name_or_path", "t"),
    (diagnose_command, "--dataset", "d.jsonl", "dataset_name", "d.jsonl"),
    (diagnose_command, "--dataset_split", "test", "dataset_train_split", "test"),
    (diagnose_command, "--top_k", "4", "release_top_k", 4),
    (diagnose_command, "--top_k_sweep", "2,4", "release_top_k_sweep", "2,4"),
    (diagnose_command, "--no_progress", None, "disable_tqdm", True),
    (evaluate_command, "--model", "m", "model_name_or_path", "m"),
    (evaluate_command, "--teacher", "t", "teacher_model_name_or_path", "t"),
    (evaluate_command, "--dataset", "d.jsonl", "dataset_name", "d.jsonl"),
    (evaluate_command, "--dataset_split", "test", "dataset_test_split", "test"),
    (evaluate_command, "--prompt_column", "question", "dataset_prompt_column", "question"),
    (evaluate_command, "--prompt_as_chat", None, "dataset_prompt_as_chat", True),
    (evaluate_command, "--max_new_tokens", "12", "max_completion_length", 12),
    (evaluate_command, "--output", "m.json", "output_dir", "m.json"),
    (evaluate_command, "--no_progress", None, "disable_tqdm", True),
]


@pytest.mark.parametrize(
    ("command", "old", "value", "name", "expected"), ALIASES, ids=lambda x: getattr(x, "__name__", x)
)
def test_deprecated_flag_maps_to_the_new_name_and_warns(command, old, value, name, expected):
    assert command.DEPRECATED_FLAGS[old] == f"--{name}"
    argv = [old] if value is None else [old, value]
    with pytest.warns(FutureWarning, match=f"{old}` is deprecated.*use `--{name}`") as record:
        args = command.parse_args(argv)
    assert getattr(args, name) == expected
    assert len([w for w in record if issubclass(w.category, FutureWarning)]) == 1
    if value is not None:  # --old=value too
        with pytest.warns(FutureWarning, match=old):
            assert getattr(command.parse_args([f"{old}={value}"]), name) == expected


def test_every_deprecated_flag_names_an_option():
    for command, dataclass_type in (
        (diagnose_command, diagnose_command.DiagnoseArguments),
        (evaluate_command, evaluate_command.EvaluateArguments),
    ):
        names = {f"--{field.name}" for field in dataclasses.fields(dataclass_type)}
        assert set(command.DEPRECATED_FLAGS.values()) <= names
        assert not set(command.DEPRECATED_FLAGS) & names


def test_rename_warns_once_per_flag_and_leaves_values_alone():
    aliases = {"--student": "--model_name_or_path"}
    with pytest.warns(FutureWarning) as record:
        argv = rename_deprecated_flags(["--student", "a", "--student=b", "--x", "--", "--student"], aliases)
    assert argv == ["--model_name_or_path", "a", "--model_name_or_path=b", "--x", "--", "--student"]
    (warning,) = record
    assert "--student" in str(warning.message) and "--model_name_or_path" in str(warning.message)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert rename_deprecated_flags(["--students", "--model_name_or_path", "x"], aliases)[0] == "--students"


def test_missing_options_name_the_old_spelling_too(capsys):
    with pytest.raises(SystemExit) as exit_info:
        evaluate_command.main(["--dataset_name", "d.jsonl"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "missing --model_name_or_path (formerly --model), --teacher_model_name_or_path (formerly --teacher)" in err


# --- Unknown flags and unknown recipe keys -------------------------------------------------------------------------


@pytest.mark.parametrize("command", [diagnose_command, evaluate_command, compare_command], ids=lambda c: c.__name__)
def test_unknown_command_line_flag_is_an_error(command, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        command.main(["--output_dir", str(tmp_path), "--supervison", "full"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --supervison full" in capsys.readouterr().err


def test_unknown_recipe_keys_are_ignored_but_not_unknown_flags(tmp_path, capsys):
    recipe = _yaml(tmp_path, supervison="full", lora_r=16, model_name_or_path="s")  # a typo is not ours to judge
    assert _no_warnings(diagnose_command.parse_args, ["--config", recipe]).model_name_or_path == "s"
    assert _no_warnings(evaluate_command.parse_args, ["--config", recipe]).model_name_or_path == "s"
    with pytest.raises(SystemExit):
        diagnose_command.parse_args(["--config", recipe, "--lora_r", "8"])
    assert "unrecognized arguments: --lora_r 8" in capsys.readouterr().err
    with pytest.raises(ValueError, match="supervison"):  # distill still checks its recipe's keys
        distill_command.parse_args(["--config", recipe, "--use_cpu"])


def test_bad_values_are_usage_errors(capsys):
    with pytest.raises(SystemExit) as exit_info:
        diagnose_command.main(["--release_top_k_sweep", "2,x"])
    assert exit_info.value.code == 2 and "--release_top_k_sweep" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        diagnose_command.main(["--model_name_or_path", "s", "--teacher_model_name_or_path", "t", "--dataset_name", "d",
                               "--release_top_k", "1"])  # fmt: skip
    assert exit_info.value.code == 2 and "`release_top_k` must be >= 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        diagnose_command.main(["--config"])


# --- `distill --accelerate_config NAME_OR_PATH --num_processes N` --------------------------------------------------

ACCELERATE_CONFIGS = ["fsdp2", "multi_gpu", "single_gpu", "zero3"]


def test_shipped_accelerate_configs_are_copies_of_configs_accelerate():
    assert distill_command.shipped_accelerate_configs() == ACCELERATE_CONFIGS
    for name in ACCELERATE_CONFIGS:
        shipped = Path(distill_command.resolve_accelerate_config(name))
        assert shipped.parent.parts[-2:] == ("resources", "accelerate")
        assert shipped.read_bytes() == (CONFIGS / "accelerate" / f"{name}.yaml").read_bytes(), name
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert '"resources/accelerate/*.yaml"' in pyproject  # shipped in the wheel


def _launched(monkeypatch, argv):
    calls = []

    def fake_run(command, check=False):
        calls.append(command)
        return subprocess.CompletedProcess(command, 3)

    monkeypatch.setattr(distill_command.subprocess, "run", fake_run)
    assert distill_command.main(argv) == 3  # the launch's exit status
    (command,) = calls
    return command


def test_distill_launches_a_shipped_config_by_name(monkeypatch, capsys):
    command = _launched(
        monkeypatch, ["--config", "r.yaml", "--accelerate_config", "fsdp2", "--num_processes", "2", "--max_steps", "1"]
    )
    config = distill_command.resolve_accelerate_config("fsdp2")
    assert command == [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", config, "--num_processes", "2",
        "-m", "trl_ltc.cli", "distill", "--config", "r.yaml", "--max_steps", "1",
    ]  # fmt: skip
    assert "Launching: " in capsys.readouterr().out


def test_distill_launches_a_config_file_by_path(monkeypatch, tmp_path):
    path = tmp_path / "my_accelerate.yaml"
    path.write_text("distributed_type: MULTI_CPU\n")
    command = _launched(monkeypatch, [f"--accelerate_config={path}", "--supervision", "full"])
    assert command[3:5] == ["--config_file", str(path)] and "--num_processes" not in command
    assert command[-5:] == ["-m", "trl_ltc.cli", "distill", "--supervision", "full"]
    command = _launched(monkeypatch, ["--num-processes", "4"])  # accelerate's default config, 4 processes
    assert command[3:] == ["--num_processes", "4", "-m", "trl_ltc.cli", "distill"]


def test_distill_launch_errors(monkeypatch):
    monkeypatch.setattr(distill_command.subprocess, "run", lambda *a, **k: pytest.fail("must not launch"))
    shipped = "fsdp2, multi_gpu, single_gpu, zero3"
    with pytest.raises(ValueError, match=f"'fsdp3' is neither a file nor a config.*{shipped}"):
        distill_command.main(["--accelerate_config", "fsdp3"])
    with pytest.raises(ValueError, match="--num_processes must be >= 1"):
        distill_command.main(["--num_processes", "0"])
    with pytest.raises(ValueError, match="Expected a value after `--accelerate_config`"):
        distill_command.main(["--accelerate_config"])



def test_distill_waits_for_every_process_and_releases_the_process_group_last(monkeypatch):
    # Only the main process saves: the others reach `trainer.end()` (which destroys the process group) right after
    # the last collective of `train`; every process waits in a barrier after the saves and before `end`. The process
    # group's Python object outlives the trainer (whose DDP reducer also holds the group and frees it with the GIL
    # held), so that the group's destructor, which joins gloo's worker threads, runs without the GIL.
    import torch.distributed as dist

    calls, alive_when_trainer_freed = [], []

    class Group:
        pass

    world = {"WORLD": Group()}  # `dist.group.WORLD`, until `trainer.end()` destroys the process group
    group_ref = weakref.ref(world["WORLD"])

    class Recorder:
        def __init__(self, name):
            self.name = name

        def __getattr__(self, attribute):
            return lambda *args, **kwargs: calls.append(f"{self.name}.{attribute}")

    class FakeTrainer(Recorder):
        accelerator = Recorder("accelerator")

        def end(self):
            calls.append("trainer.end")
            world.clear()

        def __del__(self):
            alive_when_trainer_freed.append(group_ref() is not None)

    training_args = type("Args", (), {"resume_from_checkpoint": None, "output_dir": "out", "push_to_hub": False})
    monkeypatch.setattr(distill_command, "parse_args", lambda argv: (None, training_args, None, None))
    monkeypatch.setattr(distill_command, "build_trainer", lambda *args: FakeTrainer("trainer"))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "group", type("group", (), {"WORLD": property(lambda self: world.get("WORLD"))})())
    assert distill_command.main([]) == 0
    assert calls == [
        "trainer.train", "trainer.save_model", "trainer.save_state", "accelerator.print",
        "accelerator.wait_for_everyone", "trainer.end",
    ]  # fmt: skip
    assert alive_when_trainer_freed == [True]  # the trainer went first, while `main` still held the group
    assert group_ref() is None  # and then the group
