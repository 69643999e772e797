"""Prompt-only datasets for on-policy distillation: load them, check them, map a column onto `prompt`.

`TeachabilityGKDTrainer`, like `trl.DistillationTrainer`, reads only a `prompt` column and samples the completions
itself. A row's prompt is either a string (TRL's *standard* format) or a list of `{"role", "content"}` messages (the
*conversational* format, rendered with the tokenizer's chat template). Datasets are checked here, before any model
is loaded, so that a wrong column fails in seconds rather than after loading two models.
"""

from __future__ import annotations

import logging
import os

from datasets import Dataset, DatasetDict, IterableDataset, load_dataset, load_from_disk
from trl.data_utils import is_conversational

logger = logging.getLogger(__name__)

PROMPT_COLUMN = "prompt"
# Local file suffix -> `datasets` builder.
FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


def load_prompt_dataset(
    name_or_path: str, config: str | None = None, split: str = "train", *, streaming: bool = False
) -> Dataset | IterableDataset:
    """Load one split of a prompt dataset.

    Args:
        name_or_path: a local `.json`/`.jsonl`/`.parquet`/`.csv` file, a directory written by `Dataset.save_to_disk`,
            any other local directory or Hub dataset that `datasets.load_dataset` reads.
        config: the dataset configuration name (`load_dataset(..., name=config)`).
        split: the split, with `datasets`' slicing syntax (`"train[:1000]"`). A local file is the `"train"` split.
        streaming: return an `IterableDataset`.

    The dataset is returned as loaded; see `validate_prompt_dataset` and `prepare_prompt_dataset`.
    """
    path = os.path.expanduser(name_or_path)
    if os.path.isfile(path):
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in FILE_BUILDERS:
            raise ValueError(
                f"Cannot read the dataset file {name_or_path!r}: the supported suffixes are "
                f"{', '.join(FILE_BUILDERS)}. Convert it, or pass a `datasets` name or directory as `dataset_name`."
            )
        if os.path.getsize(path) == 0:
            raise ValueError(f"Dataset file {name_or_path!r} is empty: on-policy distillation needs prompts.")
        return load_dataset(FILE_BUILDERS[suffix], data_files=path, split=split, streaming=streaming)
    if os.path.isdir(path) and any(
        os.path.isfile(os.path.join(path, marker)) for marker in ("state.json", "dataset_dict.json")
    ):
        dataset = load_from_disk(path)
        if isinstance(dataset, DatasetDict):
            if split not in dataset:
                raise ValueError(f"Dataset {name_or_path!r} has no split {split!r}; its splits are {list(dataset)}.")
            dataset = dataset[split]
        return dataset.to_iterable_dataset() if streaming else dataset
    return load_dataset(name_or_path, name=config, split=split, streaming=streaming)


def _first_row(dataset: Dataset | IterableDataset) -> dict | None:
    if isinstance(dataset, IterableDataset):
        return next(iter(dataset.take(1)), None)
    return dataset[0] if len(dataset) else None


def _columns(dataset: Dataset | IterableDataset, first: dict | None) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    return list(first or [])  # a streaming dataset with unknown features


def validate_prompt_dataset(dataset: Dataset | IterableDataset, name: str, prompt_column: str = PROMPT_COLUMN) -> None:
    """Raise a `ValueError` unless `dataset` has rows and a usable prompt column.

    Args:
        dataset: the loaded split.
        name: how the dataset is named in errors (its path or id).
        prompt_column: the column expected to hold the prompts.

    The column must exist and its first row must be a string (standard format) or a non-empty list of
    `{"role", "content"}` messages (conversational format). Only the first row is read, so this stays cheap on large
    or streaming datasets.
    """
    first = _first_row(dataset)
    if first is None:
        raise ValueError(
            f"Dataset {name!r} is empty: on-policy distillation needs at least one prompt. Check the file or the "
            "split (`dataset_train_split`)."
        )
    columns = _columns(dataset, first)
    if prompt_column not in columns:
        candidates = [column for column in columns if _is_prompt(first.get(column))]
        hint = f" (columns that could hold them: {candidates})" if candidates else ""
        raise ValueError(
            f"Dataset {name!r} has no {prompt_column!r} column; found columns {columns}. Expected a prompt-only "
            f"dataset with a {PROMPT_COLUMN!r} column holding strings (standard format) or lists of "
            f"{{'role', 'content'}} messages (conversational format). Set `dataset_prompt_column` to the column "
            f"that holds the prompts{hint}, or rename it in the data."
        )
    value = first[prompt_column]
    if _is_prompt(value):
        return
    raise ValueError(
        f"Column {prompt_column!r} of dataset {name!r} must hold strings (standard format) or non-empty lists of "
        f"{{'role', 'content'}} messages (conversational format); its first row holds {type(value).__name__}: "
        f"{str(value)[:80]!r}."
    )


def _is_prompt(value) -> bool:
    """A standard (text) or conversational (non-empty list of role/content messages) prompt."""
    return isinstance(value, str) or (isinstance(value, list) and bool(value) and is_conversational({"prompt": value}))


def prepare_prompt_dataset(
    dataset: Dataset | IterableDataset, name: str, prompt_column: str = PROMPT_COLUMN, as_chat: bool = False
) -> Dataset | IterableDataset:
    """Validate `dataset`, then expose its prompts as the `prompt` column the trainer reads.

    Args:
        dataset: the loaded split.
        name: how the dataset is named in errors.
        prompt_column: the column holding the prompts. Another name than `prompt` is renamed to `prompt` (an existing
            `prompt` column is replaced). E.g. `"question"` for `zwhe99/DeepMath-103K`.
        as_chat: wrap each string prompt into a single user message, `[{"role": "user", "content": prompt}]`, so
            that the tokenizer's chat template is applied (chat/instruct students). Conversational prompts are kept.
    """
    validate_prompt_dataset(dataset, name, prompt_column)
    if prompt_column != PROMPT_COLUMN:
        if PROMPT_COLUMN in _columns(dataset, _first_row(dataset)):
            dataset = dataset.remove_columns(PROMPT_COLUMN)
        dataset = dataset.rename_column(prompt_column, PROMPT_COLUMN)
    if as_chat and isinstance(_first_row(dataset)[PROMPT_COLUMN], str):
        dataset = dataset.map(_as_user_message, input_columns=PROMPT_COLUMN)
    return dataset


def _as_user_message(prompt):
    return {PROMPT_COLUMN: [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt}


def truncate_prompt_ids(prompt_ids: list[list[int]], max_length: int) -> tuple[list[list[int]], int]:
    """Keep the last `max_length` tokens of every tokenized prompt.

    Prompts are cut from the left: their end -- the question and the chat template's generation prompt, which the
    completion continues -- is kept, a long context or system message loses its beginning.

    Returns:
        `(prompt_ids, number of prompts that were truncated)`.
    """
    if max_length < 1:
        raise ValueError(f"`max_prompt_length` must be >= 1; got {max_length}.")
    truncated = sum(len(ids) > max_length for ids in prompt_ids)
    if not truncated:
        return prompt_ids, 0
    return [list(ids[-max_length:]) if len(ids) > max_length else ids for ids in prompt_ids], truncated


def truncate_prompts(
    prompt_ids: list[list[int]], max_length: int, multimodal: bool = False, warn: bool = True
) -> tuple[list[list[int]], bool]:
    """`truncate_prompt_ids` as the trainer applies it: refused for prompts with images, reported with a warning.

    Args:
        prompt_ids: the tokenized prompts of one generation batch.
        max_length: `max_prompt_length`.
        multimodal: the prompts carry images (truncating them would cut image tokens: an error).
        warn: log the warning if a prompt is truncated (the trainer warns once per run).

    Returns:
        `(prompt_ids, whether any prompt was truncated)`.
    """
    longest = max(map(len, prompt_ids), default=0)
    prompt_ids, truncated = truncate_prompt_ids(prompt_ids, max_length)
    if truncated and multimodal:
        raise ValueError(
            f"A prompt has {longest} tokens, more than `max_prompt_length={max_length}`, and carries images: "
            "truncating it would cut image tokens. Raise `max_prompt_length` or shorten the prompts."
        )
    if truncated and warn:
        logger.warning(
            "%d of %d prompts are longer than `max_prompt_length=%d` tokens (the longest has %d) and were "
            "truncated from the left, keeping their end. Raise `max_prompt_length` to keep them whole. This "
            "warning is shown once.",
            truncated, len(prompt_ids), max_length, longest,
        )  # fmt: skip
    return prompt_ids, truncated > 0
