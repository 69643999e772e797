"""The `trl-ltc` command line: `--help`, `--version`, `distill --help`, the script entry point, argument errors."""

import dataclasses
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from trl import DatasetMixtureConfig, ModelConfig

from trl_ltc import TeachabilityGKDConfig, __version__
from trl_ltc.cli import main
from trl_ltc.commands.compare import CompareArguments
from trl_ltc.commands.diagnose import DiagnoseArguments
from trl_ltc.commands.distill import LaunchArguments
from trl_ltc.commands.evaluate import EvaluateArguments
from trl_ltc.commands.quickstart import QuickstartArguments
from trl_ltc.distill import DistillScriptArguments

ROOT = Path(__file__).resolve().parents[1]


def _run(capsys, argv):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines; compare whitespace-normalised text


def _flags(*dataclass_types):
    for dataclass_type in dataclass_types:
        for field in dataclasses.fields(dataclass_type):
            if field.init and not field.name.startswith("_"):
                yield field


def test_version(capsys):
    assert _run(capsys, ["--version"]) == f"trl-ltc {__version__}"


def test_help_lists_the_commands(capsys):
    out = _run(capsys, ["--help"])
    assert "usage: trl-ltc" in out and "distill" in out and "YAML recipe" in out


def test_distill_help_lists_every_field_with_its_help(capsys):
    out = _run(capsys, ["distill", "--help"])
    assert out.startswith("usage: trl-ltc distill")
    for field in _flags(DistillScriptArguments, TeachabilityGKDConfig, ModelConfig, DatasetMixtureConfig):
        assert f"--{field.name}" in out, field.name
    own = {f.name for f in dataclasses.fields(TeachabilityGKDConfig)} - {
        f.name for f in dataclasses.fields(TeachabilityGKDConfig.__mro__[1])
    }
    assert {"supervision", "release_top_k", "segmentation", "fixed_prefix_length", "token_score"} <= own
    for field in _flags(TeachabilityGKDConfig, DistillScriptArguments):
        if field.name in own | {"dataset_prompt_column", "dataset_prompt_as_chat"}:
            help_text = " ".join(field.metadata["help"].split())
            assert help_text in out, field.name
    assert (
        "--supervision {full,fixed_prefix,release,random_release,adv_std_release,token_teachability,iw_opd} "
        "Where the OPD supervision goes. One of: full, fixed_prefix, release" in out
    )
    assert "--use_peft" in out and "--lora_target_modules" in out and "--teacher_model_name_or_path" in out
    for field in _flags(LaunchArguments):
        assert f"--{field.name}" in out and " ".join(field.metadata["help"].split()) in out, field.name


@pytest.mark.parametrize(
    ("command", "dataclass_type"),
    [
        ("diagnose", DiagnoseArguments),
        ("evaluate", EvaluateArguments),
        ("quickstart", QuickstartArguments),
        ("compare", CompareArguments),
    ],
)
def test_command_help_lists_every_field_with_its_help(capsys, monkeypatch, command, dataclass_type):
    monkeypatch.setenv("COLUMNS", "1000")  # no wrapping inside a flag or a help text
    out = _run(capsys, [command, "--help"])
    assert out.startswith(f"usage: trl-ltc {command}") and "--config" in out
    for field in _flags(dataclass_type):
        assert f"--{field.name}" in out, field.name
        assert " ".join(field.metadata["help"].split()) in out, field.name


def test_unknown_flag_is_an_error():
    with pytest.raises(ValueError, match="supervison"):
        main(["distill", "--use_cpu", "--supervison", "full"])


def test_script_entry_point_is_the_same_command(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["scripts/distill.py", "--help"])
    with pytest.raises(SystemExit) as exit_info:
        runpy.run_path(str(ROOT / "scripts" / "distill.py"), run_name="__main__")
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "--supervision" in out and "--release_top_k" in out


def test_console_script_is_installed():
    executable = Path(sys.executable).with_name("trl-ltc")
    if not executable.exists():
        pytest.skip(f"no `trl-ltc` console script next to {sys.executable} (package not pip-installed)")
    result = subprocess.run([str(executable), "--version"], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})  # fmt: skip
    assert result.returncode == 0 and result.stdout.strip() == f"trl-ltc {__version__}"
