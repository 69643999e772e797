"""`TeachabilityGKDConfig`: `trl.DistillationConfig` plus where the OPD supervision goes."""

import warnings
from dataclasses import dataclass, field, fields

from trl import DistillationConfig

SUPERVISIONS = ("full", "fixed_prefix", "release", "random_release", "adv_std_release", "token_teachability")
SEGMENTATIONS = ("nltk", "newline", "fixed")
LOSS_TYPES = ("advantage", "parent")
TOKEN_SCORES = ("teachability", "tip", "entropy", "divergence", "random")
ROLLOUT_TRUNCATIONS = ("none", "online")
# Policies whose weights need the teacher's distribution over the student's top-K, not only log pT(y_t).
MARGIN_POLICIES = ("release", "random_release", "token_teachability")


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"`{name}` must be one of {', '.join(map(repr, allowed))}; got {value!r}.")


@dataclass
class TeachabilityGKDConfig(DistillationConfig):
    r"""
    Configuration for [`TeachabilityGKDTrainer`]: every field of `trl.DistillationConfig`, plus the supervision policy.

    The trainer is fully on-policy (the student samples every completion) and makes one update per rollout, as in
    "Prefix Teach, Suffix Fade" (arXiv 2605.13643). The loss is the sampled-token OPD loss
    `L = -sum(w * stopgrad(log pT(y) - log pS(y)) * log pS(y)) / N`; the policy only chooses the weights `w`:

    - `"full"`: every completion token (standard OPD).
    - `"fixed_prefix"`: the first `fixed_prefix_length` completion tokens, mass-preserving rescale.
    - `"release"` (default): per trajectory, the prefix before the downward change point of the per-sentence
      teacher margin over the student's top-`release_top_k` (formula 4-7 of the design).
    - `"random_release"`: the release fractions of `"release"` permuted across the trajectories of the generation
      batch of an optimizer step (all its micro-batches and processes); one extra no-grad forward of both models.
    - `"adv_std_release"`: the same change point on the per-segment standard deviation of the advantage.
    - `"token_teachability"`: TA-OPD (arXiv 2605.26844), the top `token_keep_ratio` positions of the batch by
      `token_score`.

    Parameters:
        supervision (`str`, defaults to `"release"`): the supervision policy above.
        release_top_k (`int`, defaults to `10`): K, the size of the student's candidate set for the teacher margin.
        segmentation (`str`, defaults to `"nltk"`): how completions are split into segments: NLTK Punkt sentences,
            lines, or windows of `segment_window` tokens.
        segment_window (`int`, defaults to `64`): tokens per segment with `segmentation="fixed"`.
        fixed_prefix_length (`int`, *optional*): L for `supervision="fixed_prefix"` (required there).
        release_seed (`int`, *optional*): seed of the `random_release` permutation and of `token_score="random"`;
            defaults to `seed`.
        loss_type (`str`, defaults to `"advantage"`): `"advantage"` is the sampled-token OPD loss above; `"parent"`
            is `trl.DistillationTrainer`'s generalized JSD (see `beta`) with the supervision weights applied per token,
            so `supervision="full"` with `loss_type="parent"` is exactly `trl.DistillationTrainer`. `beta` has no
            effect with `"advantage"` (setting it warns).
        signal_chunk_size (`int`, *optional*): completion positions projected to the vocabulary at a time when the
            per-token signals are computed; by default about 64M logits per chunk.
        max_prompt_length (`int`, *optional*): prompts longer than this many tokens (after the chat template) are
            truncated from the left, keeping their end (the question and the generation prompt), with one warning.
            `None` (default) keeps every prompt whole.
        release_diagnostics_steps (`int`, defaults to `10`): the release records of the last N steps are kept and
            plotted into `output_dir` at each save and at the end of training (`trl_ltc.diagnostics`), and the plots
            are logged to the `report_to` trackers that take images (wandb, tensorboard); 0 turns it off.
        release_diagnostics_max_records (`int`, defaults to `256`): at most this many trajectories are kept (the
            oldest dropped first), so `release_records.jsonl` stays bounded: about 30 bytes per completion token,
            e.g. ~8 MB for 256 trajectories of 1,000 tokens.
        token_score, token_keep_ratio, token_top_k, token_min_keep: TA-OPD selection, see the fields' help.
        rollout_truncation (`str`, defaults to `"none"`): `"online"` runs the release rule while the student
            generates and stops each trajectory once its supervision is released (formula 9 of the design): the
            released suffix is neither generated to the end, nor scored, nor trained on. Only with
            `supervision="release"`.
        online_min_segments (`int`, defaults to `3`): complete segments a trajectory needs before it can be stopped.
        online_patience (`int`, defaults to `2`): complete segments that must follow the drop before stopping.
        online_check_tokens (`int`, defaults to `16`): new tokens generated between two teacher scoring blocks.
    """

    supervision: str = field(
        default="release",
        metadata={
            "help": f"Where the OPD supervision goes. One of: {', '.join(SUPERVISIONS)}.",
            "choices": SUPERVISIONS,
        },
    )
    release_top_k: int = field(
        default=10,
        metadata={"help": "K: size of the student's top-K candidate set on which the teacher margin is measured (>= 2)."},
    )
    segmentation: str = field(
        default="nltk",
        metadata={
            "help": f"How completions are split into segments. One of: {', '.join(SEGMENTATIONS)}.",
            "choices": SEGMENTATIONS,
        },
    )
    segment_window: int = field(
        default=64,
        metadata={"help": "Tokens per segment when `segmentation='fixed'`."},
    )
    fixed_prefix_length: int | None = field(
        default=None,
        metadata={"help": "Number of leading completion tokens supervised when `supervision='fixed_prefix'`."},
    )
    release_seed: int | None = field(
        default=None,
        metadata={"help": "Seed for `random_release` and `token_score='random'`. Defaults to `seed`."},
    )
    loss_type: str = field(
        default="advantage",
        metadata={
            "help": "'advantage': sampled-token OPD loss -sum(w * sg(log pT - log pS) * log pS) / N. 'parent': the "
            "parent trainer's generalized JSD (`beta`) weighted per token by the supervision weights.",
            "choices": LOSS_TYPES,
        },
    )
    signal_chunk_size: int | None = field(
        default=None,
        metadata={"help": "Completion positions per vocabulary projection chunk (default: ~64M logits per chunk)."},
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Truncate prompts longer than this many tokens (after the chat template) from the left, with one "
            "warning. None keeps every prompt whole."
        },
    )
    release_diagnostics_steps: int = field(
        default=10,
        metadata={
            "help": "Keep the per-trajectory release records of the last N optimizer steps and write release.png, "
            "margin_curve.png and release_records.jsonl into output_dir at each save and at the end (0: off)."
        },
    )
    release_diagnostics_max_records: int = field(
        default=256,
        metadata={
            "help": "At most this many trajectories are kept for the release diagnostics (oldest dropped first): "
            "bounds release_records.jsonl to about 30 bytes per completion token of the kept trajectories."
        },
    )
    token_score: str = field(
        default="teachability",
        metadata={
            "help": f"Token score for `supervision='token_teachability'`. One of: {', '.join(TOKEN_SCORES)}.",
            "choices": TOKEN_SCORES,
        },
    )
    token_keep_ratio: float = field(
        default=0.05,
        metadata={"help": "Fraction of the batch's completion tokens kept by `token_teachability`, in (0, 1]."},
    )
    token_top_k: int = field(
        default=16,
        metadata={"help": "Support size K of the TA-OPD token features (>= 1)."},
    )
    token_min_keep: int = field(
        default=1,
        metadata={"help": "Tokens kept at least per trajectory by `token_teachability` (>= 0)."},
    )
    rollout_truncation: str = field(
        default="none",
        metadata={
            "help": "'online': stop generating a trajectory once the release rule has released its supervision "
            "(the change point on the segments so far, checked every `online_check_tokens` tokens); only with "
            "`supervision='release'`. 'none': generate every completion to EOS or max length.",
            "choices": ROLLOUT_TRUNCATIONS,
        },
    )
    online_min_segments: int = field(
        default=3,
        metadata={"help": "With rollout_truncation='online': complete segments needed before a stop (>= 1)."},
    )
    online_patience: int = field(
        default=2,
        metadata={"help": "With rollout_truncation='online': complete segments after the drop before a stop (>= 1)."},
    )
    online_check_tokens: int = field(
        default=16,
        metadata={"help": "With rollout_truncation='online': new tokens generated between teacher scoring blocks."},
    )

    def __post_init__(self):
        super().__post_init__()
        _choice("supervision", self.supervision, SUPERVISIONS)
        _choice("segmentation", self.segmentation, SEGMENTATIONS)
        _choice("loss_type", self.loss_type, LOSS_TYPES)
        _choice("token_score", self.token_score, TOKEN_SCORES)
        if self.release_top_k < 2:
            raise ValueError(
                f"`release_top_k` must be >= 2 (the margin compares the top two) and at most the vocabulary size; "
                f"got {self.release_top_k}."
            )
        if self.release_diagnostics_steps < 0:
            raise ValueError(f"`release_diagnostics_steps` must be >= 0 (0 turns it off); got {self.release_diagnostics_steps}.")
        if self.release_diagnostics_max_records < 1:
            raise ValueError(
                f"`release_diagnostics_max_records` must be >= 1; got {self.release_diagnostics_max_records}."
            )
        beta_default = next(f.default for f in fields(DistillationConfig) if f.name == "beta")
        if self.loss_type == "advantage" and self.beta != beta_default:
            warnings.warn(
                f"`beta={self.beta}` has no effect with `loss_type='advantage'`: `beta` chooses the parent's "
                "generalized JSD, used only with `loss_type='parent'`. Set `loss_type='parent'` to use it, or leave "
                "`beta` unset.",
                UserWarning,
                stacklevel=3,
            )
        if self.segment_window < 1:
            raise ValueError(f"`segment_window` must be >= 1; got {self.segment_window}.")
        if self.supervision == "fixed_prefix" and (self.fixed_prefix_length is None or self.fixed_prefix_length <= 0):
            raise ValueError(
                "`fixed_prefix_length` must be a positive number of tokens when `supervision='fixed_prefix'`; "
                f"got {self.fixed_prefix_length}."
            )
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(
                f"`max_prompt_length` must be >= 1 or None (no truncation); got {self.max_prompt_length}."
            )
        if self.signal_chunk_size is not None and self.signal_chunk_size < 1:
            raise ValueError(f"`signal_chunk_size` must be >= 1; got {self.signal_chunk_size}.")
        if not 0.0 < self.token_keep_ratio <= 1.0:
            raise ValueError(f"`token_keep_ratio` must be in (0, 1]; got {self.token_keep_ratio}.")
        if self.token_top_k < 1:
            raise ValueError(f"`token_top_k` must be >= 1; got {self.token_top_k}.")
        if self.token_min_keep < 0:
            raise ValueError(f"`token_min_keep` must be >= 0; got {self.token_min_keep}.")
        _choice("rollout_truncation", self.rollout_truncation, ROLLOUT_TRUNCATIONS)
        if self.rollout_truncation == "online" and self.supervision != "release":
            raise ValueError(
                "`rollout_truncation='online'` stops generation where the release rule stops supervising, so it needs "
                f"`supervision='release'`; got supervision={self.supervision!r}. Set `supervision='release'` or "
                "`rollout_truncation='none'`."
            )
        for name in ("online_min_segments", "online_patience", "online_check_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1; got {getattr(self, name)}.")
        if self.release_seed is None:
            self.release_seed = self.seed
