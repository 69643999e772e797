"""`TeachabilityGKDConfig`: `trl.DistillationConfig` plus where the OPD supervision goes."""

import warnings
from dataclasses import dataclass, field, fields

from trl import DistillationConfig

# Defined once in `trl_ltc.spec` (the segmentations in `trl_ltc.segmentation`, the token scores in
# `trl_ltc.teachability`); importable from here as before.
from .spec import (  # noqa: F401
    LOSS_TYPES,
    MARGIN_POLICIES,
    ROLLOUT_TRUNCATIONS,
    SEGMENTATIONS,
    SUPERVISIONS,
    TOKEN_SCORES,
    SupervisionSpec,
)

_DEFAULT = SupervisionSpec()  # the supervision fields' defaults


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
    - `"iw_opd"`: IW-OPD (arXiv 2606.22600), `w_t = 1 + iw_opd_gamma * (1 - S_<t / S)` with `S_<t` the sum of `|A_s|`
      before `t` and `S` over the completion; not mass-preserving.

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
        release_alpha (`float`, *optional*): calibrate the change point (formula 10 of the design): a drop is accepted
            only where the paper's rule accepts it and its permutation p-value (`release_permutations` shuffles of the
            trajectory's segment scores) is at most `release_alpha`, so scores without any order are released at most
            that often; online release spends it across its looks. `None` (default) is the paper's rule exactly. Used
            by `release`, `random_release` (its fractions), `adv_std_release` and `rollout_truncation="online"`.
        release_permutations (`int`, defaults to `199`): shuffles per trajectory of the calibrated test.
        release_keep_advantage_below (`float`, *optional*): release-type policies keep supervising the released
            tokens whose advantage `log pT(y) - log pS(y)` is below this many nats (the teacher clearly rejects the
            sampled token), mass-preserving; e.g. `-2.3` (the teacher gives it a tenth of the student's probability).
        iw_opd_gamma (`float`, defaults to `0.5`): gamma of `supervision="iw_opd"`.
        max_flops (`float`, *optional*): stop training once the estimated compute (`compute/flops`) reaches this.
        rollout_truncation (`str`, defaults to `"none"`): `"online"` runs the release rule while the student
            generates and stops each trajectory once its supervision is released (formula 9 of the design): the
            released suffix is neither generated to the end, nor scored, nor trained on. Only with
            `supervision="release"`.
        online_min_segments (`int`, defaults to `3`): complete segments a trajectory needs before it can be stopped.
        online_patience (`int`, defaults to `2`): complete segments that must follow the drop before stopping.
        online_check_tokens (`int`, defaults to `16`): new tokens generated between two teacher scoring blocks.
        teacher_server_url (`str`, *optional*): base URL of an OpenAI-compatible server that serves the teacher
            (vLLM's `vllm serve`, llama.cpp's `python -m llama_cpp.server`), e.g. `"http://localhost:8000"`. The
            trainer then needs no `teacher_model`: each completion is scored by the server's completions endpoint
            (prompt log-probs), see `trl_ltc.teacher_server` and `docs/teacher_server.md`.
        teacher_server_model (`str`, *optional*): the model name the server must serve; by default its only model.
        teacher_server_top_logprobs (`int`, defaults to `20`): n, the teacher's top-n log-probs asked per position
            (the margins and TA-OPD features bound the teacher's log-prob of candidates outside them by the n-th).
        teacher_server_timeout (`float`, defaults to `120`): seconds one request may take.
        teacher_server_max_retries (`int`, defaults to `3`): retries of a failed request (with backoff) before the
            step fails; a step is never trained on partial scores.
        teacher_server_concurrency (`int`, defaults to `4`): requests in flight at once.
    """

    supervision: str = field(
        default=_DEFAULT.policy,
        metadata={
            "help": f"Where the OPD supervision goes. One of: {', '.join(SUPERVISIONS)}.",
            "choices": SUPERVISIONS,
        },
    )
    release_top_k: int = field(
        default=_DEFAULT.release_top_k,
        metadata={
            "help": "K: size of the student's top-K candidate set on which the teacher margin is measured (>= 2)."
        },
    )
    segmentation: str = field(
        default=_DEFAULT.segmentation,
        metadata={
            "help": f"How completions are split into segments. One of: {', '.join(SEGMENTATIONS)}.",
            "choices": SEGMENTATIONS,
        },
    )
    segment_window: int = field(
        default=_DEFAULT.segment_window,
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
        default=_DEFAULT.loss_type,
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
        default=_DEFAULT.token_score,
        metadata={
            "help": f"Token score for `supervision='token_teachability'`. One of: {', '.join(TOKEN_SCORES)}.",
            "choices": TOKEN_SCORES,
        },
    )
    token_keep_ratio: float = field(
        default=_DEFAULT.token_keep_ratio,
        metadata={"help": "Fraction of the batch's completion tokens kept by `token_teachability`, in (0, 1]."},
    )
    token_top_k: int = field(
        default=_DEFAULT.token_top_k,
        metadata={"help": "Support size K of the TA-OPD token features (>= 1)."},
    )
    token_min_keep: int = field(
        default=_DEFAULT.token_min_keep,
        metadata={"help": "Tokens kept at least per trajectory by `token_teachability` (>= 0)."},
    )
    rollout_truncation: str = field(
        default=_DEFAULT.rollout_truncation,
        metadata={
            "help": "'online': stop generating a trajectory once the release rule has released its supervision "
            "(the change point on the segments so far, checked every `online_check_tokens` tokens); only with "
            "`supervision='release'`. 'none': generate every completion to EOS or max length.",
            "choices": ROLLOUT_TRUNCATIONS,
        },
    )
    online_min_segments: int = field(
        default=_DEFAULT.online_min_segments,
        metadata={"help": "With rollout_truncation='online': complete segments needed before a stop (>= 1)."},
    )
    online_patience: int = field(
        default=_DEFAULT.online_patience,
        metadata={"help": "With rollout_truncation='online': complete segments after the drop before a stop (>= 1)."},
    )
    online_check_tokens: int = field(
        default=_DEFAULT.online_check_tokens,
        metadata={"help": "With rollout_truncation='online': new tokens generated between teacher scoring blocks."},
    )

    release_alpha: float | None = field(
        default=_DEFAULT.release_alpha,
        metadata={
            "help": "Calibrated change point: accept a drop only where its permutation p-value is <= this (e.g. "
            "0.05). "
            "None: the paper's BIC rule."
        },
    )
    release_permutations: int = field(
        default=_DEFAULT.release_permutations,
        metadata={"help": "Shuffles per trajectory of the calibrated change point (p-values on a 1/(P+1) grid)."},
    )
    release_keep_advantage_below: float | None = field(
        default=_DEFAULT.release_keep_advantage_below,
        metadata={
            "help": "Release-type policies keep the released tokens whose advantage is below this many nats "
            "(e.g. -2.3). None: drop the whole released suffix."
        },
    )
    iw_opd_gamma: float = field(
        default=_DEFAULT.iw_opd_gamma, metadata={"help": "gamma of supervision='iw_opd' (>= 0)."}
    )
    max_flops: float | None = field(
        default=None,
        metadata={"help": "Stop training once the estimated compute `compute/flops` reaches this. None: no budget."},
    )

    teacher_server_url: str | None = field(
        default=None,
        metadata={"help": "Base URL of an OpenAI-compatible server serving the teacher (no teacher_model then)."},
    )
    teacher_server_model: str | None = field(
        default=None, metadata={"help": "Model name the teacher server must serve (default: its only model)."}
    )
    teacher_server_top_logprobs: int = field(
        default=20, metadata={"help": "n: the teacher's top-n log-probs asked from the server per position (>= 2)."}
    )
    teacher_server_timeout: float = field(
        default=120.0, metadata={"help": "Seconds one teacher server request may take."}
    )
    teacher_server_max_retries: int = field(
        default=3, metadata={"help": "Retries of a failed teacher server request before the step fails."}
    )
    teacher_server_concurrency: int = field(
        default=4, metadata={"help": "Teacher server requests in flight at once."}
    )

    def __post_init__(self):
        super().__post_init__()
        if self.release_seed is None:
            self.release_seed = self.seed
        SupervisionSpec.from_config(self)  # the supervision fields, validated once (`trl_ltc.spec`)
        if self.release_diagnostics_steps < 0:
            raise ValueError(
                f"`release_diagnostics_steps` must be >= 0 (0 turns it off); got {self.release_diagnostics_steps}."
            )
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
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(
                f"`max_prompt_length` must be >= 1 or None (no truncation); got {self.max_prompt_length}."
            )
        if self.max_flops is not None and not self.max_flops > 0:
            raise ValueError(f"`max_flops` must be > 0 (a compute budget) or None; got {self.max_flops}.")
        if self.signal_chunk_size is not None and self.signal_chunk_size < 1:
            raise ValueError(f"`signal_chunk_size` must be >= 1; got {self.signal_chunk_size}.")
        if self.teacher_server_url is not None:
            from .teacher_server import check_server_config

            check_server_config(self)
