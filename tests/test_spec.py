"""`SupervisionSpec`: the flags of each policy, built from a config, its errors, and constants defined once."""

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest

from trl_ltc import TeachabilityGKDConfig
from trl_ltc.spec import (
    MARGIN_POLICIES,
    POLICIES,
    SUPERVISIONS,
    PolicyTraits,
    SupervisionSpec,
    check_top_k,
)

FLAGS = (
    "needs_margin",
    "needs_segments",
    "needs_advantage_std",
    "needs_teachability_features",
    "needs_global_permutation",
    "supports_online_release",
)
EXPECTED = {
    "full": set(),
    "fixed_prefix": set(),
    "release": {"needs_margin", "needs_segments", "supports_online_release"},
    "random_release": {"needs_margin", "needs_segments", "needs_global_permutation"},
    "adv_std_release": {"needs_segments", "needs_advantage_std"},
    "token_teachability": {"needs_teachability_features"},
    "iw_opd": set(),
}


def _config(tmp_path, **fields):
    return TeachabilityGKDConfig(str(tmp_path), report_to="none", use_cpu=True, bf16=False, **fields)


def _spec(policy, **fields):
    if policy == "fixed_prefix":
        fields.setdefault("fixed_prefix_length", 4)
    return SupervisionSpec(policy, **fields)


@pytest.mark.parametrize("policy", SUPERVISIONS)
def test_flags_per_policy(policy):
    spec = _spec(policy)
    assert {flag for flag in FLAGS if getattr(spec, flag)} == EXPECTED[policy]
    assert spec.traits is POLICIES[policy]
    assert spec.feature_k == (spec.token_top_k if policy == "token_teachability" else None)
    assert not spec.online and not spec.parent_loss


def test_policies_and_flags_are_listed_once():
    assert SUPERVISIONS == tuple(EXPECTED) == tuple(POLICIES)
    assert set(FLAGS) == {f.name for f in dataclasses.fields(PolicyTraits)}
    # The policies whose weights need the teacher's distribution over the student's top-K.
    assert MARGIN_POLICIES == ("release", "random_release", "token_teachability")


def test_constants_are_defined_once():
    from trl_ltc import config, segmentation, spec, teachability

    assert config.SEGMENTATIONS is segmentation.SEGMENTATION_METHODS is spec.SEGMENTATIONS
    assert config.TOKEN_SCORES is teachability.TOKEN_SCORES is spec.TOKEN_SCORES
    for name in ("SUPERVISIONS", "LOSS_TYPES", "ROLLOUT_TRUNCATIONS", "MARGIN_POLICIES"):
        assert getattr(config, name) is getattr(spec, name), name


def test_the_spec_imports_without_trl():
    code = "import sys, trl_ltc.spec, trl_ltc.release, trl_ltc.segmentation; assert 'trl' not in sys.modules"
    root = str(Path(__file__).resolve().parents[1])  # this checkout, whichever copy is installed
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


def test_built_from_a_config(tmp_path):
    args = _config(
        tmp_path, supervision="token_teachability", loss_type="parent", release_top_k=4, segmentation="fixed",
        segment_window=7, token_score="tip", token_keep_ratio=0.25, token_top_k=5, token_min_keep=2, seed=11,
    )  # fmt: skip
    spec = SupervisionSpec.from_config(args)
    assert (spec.policy, spec.loss_type, spec.seed) == ("token_teachability", "parent", 11)
    assert (spec.release_top_k, spec.segmentation, spec.segment_window) == (4, "fixed", 7)
    assert (spec.token_score, spec.token_keep_ratio, spec.token_top_k, spec.token_min_keep) == ("tip", 0.25, 5, 2)
    assert spec.parent_loss and spec.feature_k == 5
    online = _config(tmp_path, rollout_truncation="online", online_patience=3)
    spec = SupervisionSpec.from_config(online)
    assert spec.online and spec.supports_online_release and spec.online_patience == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        spec.policy = "full"


def test_defaults_are_the_configs(tmp_path):
    args = _config(tmp_path)
    assert SupervisionSpec.from_config(args) == SupervisionSpec(seed=args.seed)


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"policy": "prefix"}, "`supervision` must be one of 'full', 'fixed_prefix'"),
        ({"loss_type": "kl"}, "`loss_type` must be one of 'advantage', 'parent'"),
        ({"segmentation": "spacy"}, "`segmentation` must be one of"),
        ({"token_score": "loss"}, "`token_score` must be one of"),
        ({"release_top_k": 1}, "`release_top_k` must be >= 2"),
        ({"token_top_k": 0}, "`token_top_k` must be >= 1"),
        ({"token_keep_ratio": 0.0}, r"`token_keep_ratio` must be in \(0, 1\]"),
        ({"token_min_keep": -1}, "`token_min_keep` must be >= 0"),
        ({"segment_window": 0}, "`segment_window` must be >= 1"),
        ({"policy": "fixed_prefix"}, "`fixed_prefix_length` must be a positive number"),
        ({"rollout_truncation": "eager"}, "`rollout_truncation` must be one of"),
        ({"policy": "full", "rollout_truncation": "online"}, "needs `supervision='release'`"),
        ({"online_check_tokens": 0}, "`online_check_tokens` must be >= 1"),
    ],
)
def test_errors_name_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        SupervisionSpec(**fields)


def test_config_errors_come_from_the_spec(tmp_path):
    with pytest.raises(ValueError, match="needs `supervision='release'`"):
        _config(tmp_path, supervision="full", rollout_truncation="online")


def test_check_top_k():
    check_top_k("release_top_k", 2, 2)
    check_top_k("token_top_k", 1, 5, minimum=1)
    check_top_k("release_top_k", 10**6)  # no vocabulary yet: only the lower bound
    with pytest.raises(ValueError, match=r"`release_top_k` must be in \[2, 8\] \(the vocabulary size\); got 9\."):
        check_top_k("release_top_k", 9, 8)
    with pytest.raises(ValueError, match=r"`top_k` must be in \[1, 8\]"):
        check_top_k("top_k", 0, 8, minimum=1)
    with pytest.raises(ValueError, match="`release_top_k` must be >= 2"):
        check_top_k("release_top_k", 1)
    spec = SupervisionSpec(release_top_k=10, token_top_k=16)
    spec.check_vocabulary(16)
    with pytest.raises(ValueError, match=r"`token_top_k` must be in \[1, 12\]"):
        spec.check_vocabulary(12)
    from trl_ltc.signals import check_top_k as exported

    assert exported is check_top_k
