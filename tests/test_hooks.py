"""The private TRL names the trainer relies on (`trl_ltc.hooks`, `pyproject.toml`): fail loudly when TRL changes them.

`trl>=1.16,<1.17` is pinned because of these. When this file fails after a TRL upgrade, the trainer's overrides must
be checked against the new parent code before the pin is moved.
"""

import inspect

import pytest
import trl
import trl.trainer.distillation_trainer as distillation
from trl import DistillationTrainer
from trl.trainer.utils import RepeatSampler

from trl_ltc import TeachabilityGKDTrainer, hooks
from trl_ltc.resume import EpochRepeatSampler

DIVERGENCE_PARAMETERS = [
    "student_hidden_states",
    "teacher_hidden_states",
    "student_lm_head_weight",
    "teacher_lm_head_weight",
    "completion_mask",
    "beta",
    "num_items_in_batch",
    "student_lm_head_bias",
    "teacher_lm_head_bias",
    "student_logit_scale",
    "teacher_logit_scale",
    "student_final_logit_softcapping",
    "teacher_final_logit_softcapping",
    "temperature",
]
# Private methods of the parent that `TeachabilityGKDTrainer` overrides or calls, with their parameters.
PARENT_METHODS = {
    "_compute_loss": ["self", "unwrapped_student", "inputs", "num_items_in_batch"],
    "_generate_single_turn": ["self", "prompt_ids", "images", "multimodal_fields", "has_tool_images"],
    "_generate_and_score_completions": ["self", "inputs"],
    "_tokenize_prompts": ["self", "prompts"],
    "_get_train_sampler": ["self", "dataset"],
    "_save_rng_state": ["self", "output_dir"],
    "_load_rng_state": ["self", "checkpoint"],
    "_get_last_hidden_state": [
        "self", "unwrapped_model", "input_ids", "attention_mask", "logits_to_keep", "pixel_values", "image_grid_thw",
        "pixel_attention_mask", "spatial_shapes", "image_sizes", "token_type_ids", "mm_token_type_ids",
        "image_position_ids",
    ],  # fmt: skip
}


def _parameters(function):
    return list(inspect.signature(function).parameters)


def test_trl_is_the_pinned_minor_series():
    assert trl.__version__.startswith("1.16."), trl.__version__


def test_the_divergence_loss_hook_has_the_expected_signature():
    assert _parameters(getattr(distillation, hooks.DIVERGENCE_LOSS)) == DIVERGENCE_PARAMETERS
    # `_compute_loss` still calls it by its module-level name, so replacing the name takes the call over.
    assert f"{hooks.DIVERGENCE_LOSS}(" in inspect.getsource(DistillationTrainer._compute_loss)
    # ... and `_supervised_loss` accepts every argument it is called with.
    ours = _parameters(TeachabilityGKDTrainer._supervised_loss)
    assert ours == ["self", "inputs", *DIVERGENCE_PARAMETERS, "fractions_only", "teacher_scores"]


def test_the_teacher_forward_of_the_loss_goes_through_get_last_hidden_state():
    # `_get_last_hidden_state` is overridden to skip the teacher's forward when an online rollout's scores are used.
    source = inspect.getsource(DistillationTrainer._compute_loss)
    assert "self._get_last_hidden_state,\n                unwrapped_teacher," in source


def test_the_model_loader_hook_is_where_the_teacher_is_loaded():
    assert _parameters(getattr(distillation, hooks.MODEL_LOADER))[0] == "model_id"
    assert f"{hooks.MODEL_LOADER}(teacher_model" in inspect.getsource(DistillationTrainer.__init__)


@pytest.mark.parametrize("name", sorted(PARENT_METHODS))
def test_the_parent_methods_we_override_are_unchanged(name):
    assert _parameters(getattr(DistillationTrainer, name)) == PARENT_METHODS[name]


def test_hooks_are_undone_after_the_call_also_on_error():
    original = getattr(distillation, hooks.DIVERGENCE_LOSS)
    with pytest.raises(RuntimeError), hooks.divergence_loss_replaced(lambda *a, **k: None):
        assert getattr(distillation, hooks.DIVERGENCE_LOSS) is not original
        raise RuntimeError
    assert getattr(distillation, hooks.DIVERGENCE_LOSS) is original
    loader = getattr(distillation, hooks.MODEL_LOADER)
    with hooks.teacher_loader_replaced(print):
        assert getattr(distillation, hooks.MODEL_LOADER) is print
    assert getattr(distillation, hooks.MODEL_LOADER) is loader


@pytest.mark.parametrize("shuffle", [True, False])
def test_the_epoch_sampler_is_built_like_the_parents(shuffle):
    def parent():
        data = list(range(10))
        return RepeatSampler(data, mini_repeat_count=1, batch_size=4, repeat_count=2, shuffle=shuffle, seed=3)

    reference = parent()
    epochs = [list(reference) for _ in range(3)]  # the parent's order in epochs 0, 1, 2
    ours = EpochRepeatSampler.like(parent())
    for epoch in (0, 2, 1):
        ours.set_epoch(epoch)
        assert list(ours) == epochs[epoch], epoch


def test_the_vllm_weight_sync_names_of_vllm_compat():
    """`trl_ltc.vllm_compat` swaps TRL's colocated `sync_weights` for vLLM's `reload_weights` fed by
    `_iter_named_params`, and creates the engine through the module-level `LLM` (TRL passes it no dtype)."""
    import trl.generation.vllm_generation as vllm_generation

    from trl_ltc import vllm_compat

    cls = vllm_generation.VLLMGeneration
    assert _parameters(getattr(cls, vllm_compat.SYNC_WEIGHTS)) == ["self"]
    assert _parameters(getattr(cls, vllm_compat.WEIGHTS_ITERATOR)) == ["self"]
    sync = inspect.getsource(getattr(cls, vllm_compat.SYNC_WEIGHTS))
    # The colocated sync it replaces: in-place `load_weights` of each parameter, then the prefix cache reset.
    assert "model_runner.model.load_weights([(name, param)])" in sync and "self.llm.reset_prefix_cache()" in sync
    init = inspect.getsource(cls._init_vllm)
    assert "self.llm = LLM(" in init and "import LLM" in inspect.getsource(vllm_generation)
    call = init.split("self.llm = LLM(")[1].split("\n            )\n")[0]
    assert "model=model.name_or_path" in call and "dtype=" not in call  # still no dtype: see colocated_engine_dtype
