"""`SupervisionSpec`: what a supervision policy is, which signals it needs and how it is parametrised.

The policy names, the loss types, the segmentations and the token scores are defined here once; `trl_ltc.config`
re-exports them. This module imports neither TRL nor transformers, so analysis code can build a spec without them.

| policy | needs | online release |
|---|---|---|
| `full` | nothing beyond `log pT(y)`, `log pS(y)` | no |
| `fixed_prefix` | nothing | no |
| `release` | the teacher margin (formula 4), segments | yes |
| `random_release` | the teacher margin, segments, one permutation across the generation batch | no |
| `adv_std_release` | segments, the per-segment std of the advantage | no |
| `token_teachability` | the TA-OPD token features (formula 8) | no |
| `iw_opd` | the advantage (formula 11) | no |

Release-type policies (those that decide a change point per trajectory) take `release_alpha` (formula 10) and
`release_keep_advantage_below`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from .segmentation import SEGMENTATION_METHODS
from .teachability import TOKEN_SCORES

__all__ = [
    "LOSS_TYPES",
    "MARGIN_POLICIES",
    "POLICIES",
    "ROLLOUT_TRUNCATIONS",
    "SEGMENTATIONS",
    "SUPERVISIONS",
    "TOKEN_SCORES",
    "RELEASE_POLICIES",
    "PolicyTraits",
    "SupervisionSpec",
    "check_choice",
    "check_top_k",
]


@dataclass(frozen=True)
class PolicyTraits:
    """The signals a policy's weights depend on, and what it supports."""

    needs_margin: bool = False
    """The weights use the teacher margin on the student's top-`release_top_k` (formula 4)."""
    needs_segments: bool = False
    """The weights are decided per segment (a change point over segment scores)."""
    needs_advantage_std: bool = False
    """The segment score is the standard deviation of the advantage over the segment's tokens."""
    needs_teachability_features: bool = False
    """The weights use the TA-OPD token features over the top-`token_top_k` supports (formula 8)."""
    needs_global_permutation: bool = False
    """The release fractions are permuted across the generation batch of an optimizer step (all processes): one
    extra no-grad scoring pass of both models per step."""
    supports_online_release: bool = False
    """`rollout_truncation="online"` (formula 9) stops generation where this policy stops supervising."""


POLICIES = {
    "full": PolicyTraits(),
    "fixed_prefix": PolicyTraits(),
    "release": PolicyTraits(needs_margin=True, needs_segments=True, supports_online_release=True),
    "random_release": PolicyTraits(needs_margin=True, needs_segments=True, needs_global_permutation=True),
    "adv_std_release": PolicyTraits(needs_segments=True, needs_advantage_std=True),
    "token_teachability": PolicyTraits(needs_teachability_features=True),
    "iw_opd": PolicyTraits(),
}
SUPERVISIONS = tuple(POLICIES)
# Policies that release a suffix per trajectory by a change point: `release_alpha` and
# `release_keep_advantage_below` apply to them.
RELEASE_POLICIES = tuple(name for name, traits in POLICIES.items() if traits.needs_segments)
# Policies whose weights need the teacher's distribution over the student's top-K, not only log pT(y_t).
MARGIN_POLICIES = tuple(
    name for name, traits in POLICIES.items() if traits.needs_margin or traits.needs_teachability_features
)
SEGMENTATIONS = SEGMENTATION_METHODS
LOSS_TYPES = ("advantage", "parent")
ROLLOUT_TRUNCATIONS = ("none", "online")


def check_choice(name: str, value, allowed) -> None:
    """Raise a `ValueError` naming the field `name` unless `value` is one of `allowed`."""
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


def check_top_k(name: str, k: int, vocab: int | None = None, minimum: int = 2) -> None:
    """Raise a `ValueError` naming the field `name` unless `minimum <= k <= vocab`.

    A top-K support needs at least `minimum` ids (2 for the teacher margin, which compares the teacher's best two, 1
    for the TA-OPD features) and at most the vocabulary size. With `vocab=None` (not known yet, e.g. in a config)
    only the lower bound is checked.
    """
    if vocab is None:
        if k < minimum:
            raise ValueError(f"`{name}` must be >= {minimum} and at most the vocabulary size; got {k}.")
    elif not minimum <= k <= vocab:
        raise ValueError(f"`{name}` must be in [{minimum}, {vocab}] (the vocabulary size); got {k}.")


@dataclass(frozen=True)
class SupervisionSpec:
    """A supervision policy with its parameters, validated once; the trainer and `trl_ltc.online` read this.

    Build it from a `TeachabilityGKDConfig` with `SupervisionSpec.from_config(args)` (the fields have the config's
    names and defaults, except `policy` for `supervision` and `seed` for `release_seed`). The `needs_*` and
    `supports_online_release` properties are the policy's `PolicyTraits`.
    """

    policy: str = "release"
    loss_type: str = "advantage"
    release_top_k: int = 10
    segmentation: str = "nltk"
    segment_window: int = 64
    fixed_prefix_length: int | None = None
    token_score: str = "teachability"
    token_keep_ratio: float = 0.05
    token_top_k: int = 16
    token_min_keep: int = 1
    seed: int | None = None
    """Seed of the `random_release` permutation and of `token_score="random"` (the config's `release_seed`)."""
    rollout_truncation: str = "none"
    online_min_segments: int = 3
    online_patience: int = 2
    online_check_tokens: int = 16
    release_alpha: float | None = None
    """Formula 10: a change point is accepted only where its permutation p-value is at most this (None: formula 6)."""
    release_permutations: int = 199
    release_keep_advantage_below: float | None = None
    iw_opd_gamma: float = 0.5

    def __post_init__(self):
        check_choice("supervision", self.policy, SUPERVISIONS)
        check_choice("segmentation", self.segmentation, SEGMENTATIONS)
        check_choice("loss_type", self.loss_type, LOSS_TYPES)
        check_choice("token_score", self.token_score, TOKEN_SCORES)
        check_top_k("release_top_k", self.release_top_k)
        if self.segment_window < 1:
            raise ValueError(f"`segment_window` must be >= 1; got {self.segment_window}.")
        if self.policy == "fixed_prefix" and (self.fixed_prefix_length is None or self.fixed_prefix_length <= 0):
            raise ValueError(
                "`fixed_prefix_length` must be a positive number of tokens when `supervision='fixed_prefix'`; "
                f"got {self.fixed_prefix_length}."
            )
        if not 0.0 < self.token_keep_ratio <= 1.0:
            raise ValueError(f"`token_keep_ratio` must be in (0, 1]; got {self.token_keep_ratio}.")
        check_top_k("token_top_k", self.token_top_k, minimum=1)
        if self.token_min_keep < 0:
            raise ValueError(f"`token_min_keep` must be >= 0; got {self.token_min_keep}.")
        check_choice("rollout_truncation", self.rollout_truncation, ROLLOUT_TRUNCATIONS)
        if self.online and not self.supports_online_release:
            raise ValueError(
                "`rollout_truncation='online'` stops generation where the release rule stops supervising, so it needs "
                f"`supervision='release'`; got supervision={self.policy!r}. Set `supervision='release'` or "
                "`rollout_truncation='none'`."
            )
        for name in ("online_min_segments", "online_patience", "online_check_tokens", "release_permutations"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}.")
        if self.release_alpha is not None and not 0.0 < self.release_alpha < 1.0:
            raise ValueError(
                f"`release_alpha` must be in (0, 1) (e.g. 0.05), or None for the paper's rule; "
                f"got {self.release_alpha}."
            )
        if self.release_alpha is not None and 1.0 / (self.release_permutations + 1) > self.release_alpha:
            raise ValueError(
                f"`release_permutations={self.release_permutations}` cannot reach "
                f"`release_alpha={self.release_alpha}`: "
                f"the smallest p-value is 1 / (release_permutations + 1). Use at least "
                f"{math.ceil(1.0 / self.release_alpha)} permutations (199 by default)."
            )
        keep = self.release_keep_advantage_below
        if keep is not None and not math.isfinite(keep):
            raise ValueError(f"`release_keep_advantage_below` must be a finite number of nats or None; got {keep}.")
        if keep is not None and self.policy not in RELEASE_POLICIES:
            raise ValueError(
                "`release_keep_advantage_below` keeps corrections inside a released suffix, so it needs a "
                f"release-type supervision ({', '.join(RELEASE_POLICIES)}); got supervision={self.policy!r}."
            )
        if not (math.isfinite(self.iw_opd_gamma) and self.iw_opd_gamma >= 0):
            raise ValueError(f"`iw_opd_gamma` must be a finite number >= 0; got {self.iw_opd_gamma}.")

    @classmethod
    def from_config(cls, args) -> SupervisionSpec:
        """The spec of a `TeachabilityGKDConfig` (or any object with its field names)."""
        renamed = {"policy": "supervision", "seed": "release_seed"}
        return cls(**{f.name: getattr(args, renamed.get(f.name, f.name)) for f in fields(cls)})

    @property
    def traits(self) -> PolicyTraits:
        return POLICIES[self.policy]

    @property
    def needs_margin(self) -> bool:
        return self.traits.needs_margin

    @property
    def needs_segments(self) -> bool:
        return self.traits.needs_segments

    @property
    def needs_advantage_std(self) -> bool:
        return self.traits.needs_advantage_std

    @property
    def needs_teachability_features(self) -> bool:
        return self.traits.needs_teachability_features

    @property
    def needs_global_permutation(self) -> bool:
        return self.traits.needs_global_permutation

    @property
    def supports_online_release(self) -> bool:
        return self.traits.supports_online_release

    @property
    def online(self) -> bool:
        """`rollout_truncation="online"`: generation stops where the release rule stops supervising."""
        return self.rollout_truncation == "online"

    def weight_kwargs(self) -> dict:
        """The keyword arguments of `trl_ltc.supervision.supervision_weights` that this spec fixes."""
        return {
            "fixed_prefix_length": self.fixed_prefix_length, "token_score": self.token_score,
            "token_keep_ratio": self.token_keep_ratio, "token_min_keep": self.token_min_keep,
            "release_alpha": self.release_alpha, "release_permutations": self.release_permutations,
            "keep_advantage_below": self.release_keep_advantage_below, "iw_opd_gamma": self.iw_opd_gamma,
        }  # fmt: skip

    @property
    def parent_loss(self) -> bool:
        """`loss_type="parent"`: the parent's generalized JSD weighted per token, instead of the OPD advantage loss."""
        return self.loss_type == "parent"

    @property
    def feature_k(self) -> int | None:
        """K of the TA-OPD token features the signals compute, or `None` when the policy does not use them."""
        return self.token_top_k if self.needs_teachability_features else None

    def check_vocabulary(self, vocab: int) -> None:
        """Both top-K supports fit in a vocabulary of `vocab` token ids."""
        check_top_k("release_top_k", self.release_top_k, vocab)
        check_top_k("token_top_k", self.token_top_k, vocab, minimum=1)
