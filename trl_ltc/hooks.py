"""The private names of `trl.trainer.distillation_trainer` (TRL 1.16.x) that the trainer swaps, in one place.

`trl.DistillationTrainer` offers no public hook for either, and overriding the methods that call them would copy
their bodies (the model preparation of `_compute_loss`, the teacher loading of `__init__`). Each swap lasts for one
call and is undone after it, also when the call raises. `tests/test_hooks.py` fails loudly when a TRL release
renames them or changes their signatures; `pyproject.toml` pins TRL to the minor series they were checked against.
The colocated vLLM weight sync of vLLM's CPU build (TRL's `VLLMGeneration.sync_weights` and `_iter_named_params`,
vLLM's `reload_weights`) is kept next to this module in `trl_ltc.vllm_compat`, pinned by the same test.
"""

from __future__ import annotations

import contextlib

import trl.trainer.distillation_trainer as _distillation

__all__ = ["DIVERGENCE_LOSS", "MODEL_LOADER", "divergence_loss_replaced", "teacher_loader_replaced"]

DIVERGENCE_LOSS = "_chunked_divergence_loss"
"""Called once by `DistillationTrainer._compute_loss` with both models' hidden states, output heads and logit
post-processing; returns `(loss, entropy_sum, n_valid)`."""
MODEL_LOADER = "create_model_from_path"
"""Called by `DistillationTrainer.__init__` to load a student or teacher given as a path or Hub id."""


@contextlib.contextmanager
def _replaced(name: str, value):
    original = getattr(_distillation, name)
    setattr(_distillation, name, value)
    try:
        yield
    finally:
        setattr(_distillation, name, original)


def divergence_loss_replaced(loss):
    """While active, the parent's `_compute_loss` hands its prepared inputs to `loss` instead of its JSD.

    `loss` is called with the arguments of `_chunked_divergence_loss` and returns what it returns. This is the one
    private hook of the loss: `_compute_loss` calls the module-level function directly, and everything before that
    call (multimodal inputs, tool masks, device placement, FSDP/DeepSpeed routing of the teacher, the logit scaling
    of each model) is kept as the parent's instead of being copied.
    """
    return _replaced(DIVERGENCE_LOSS, loss)


def teacher_loader_replaced(load):
    """While active, `DistillationTrainer.__init__` loads models given as a path with `load(model_id, **kwargs)`."""
    return _replaced(MODEL_LOADER, load)
