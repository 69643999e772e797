"""Two CPU processes (torch.distributed, gloo) train like one process with the same global batch.

`one_step` is launched with `python -m torch.distributed.run --nproc_per_node 2` through a small script written
into tmp_path (2 processes x 2 prompts) and run in-process as the reference (1 process x 4 prompts). Generation is
replaced by fixed completions derived from the prompt token ids, and the optimizer is plain SGD with a constant
learning rate and no clipping, so the update is proportional to the gradient of the global loss: the first step's
loss, the updated weights and the logged supervision metrics must agree. With `random_release` the release fractions
are permuted across the global batch: both processes gather the same four fractions, draw the same permutation as the
single process, and apply it to their own rows. With online release (`rollout_truncation="online"`) the completions
are generated greedily by the online loop, some are stopped early, and the loss uses the teacher scores computed while
generating. The test is skipped (not failed) only when the processes cannot start or meet.

`test_two_process_distill_launch_finishes` runs the real `trl-ltc distill --accelerate_config ... --num_processes 2`
on CPU and checks that every process exits.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from helpers import make_model, make_tokenizer

import trl_ltc.trainer
from trl_ltc import TeachabilityGKDConfig, TeachabilityGKDTrainer

TESTS = Path(__file__).resolve().parent
TIMEOUT_S = 150
PROMPTS = [f"Tom has {i} apples. How many are left?" for i in (1, 2, 5, 7)]  # 18 tokens each: no padding
METRICS = ["release/kept_token_frac", "release/accepted_frac", "release/release_position", "release/num_segments"]
METRICS += ["advantage/mean", "advantage/std"]

LAUNCHED = """
import sys

from accelerate import PartialState

state = PartialState(cpu=True)  # joins the torch.distributed.run group (gloo on CPU)
state.wait_for_everyone()
open(f"{sys.argv[1]}/ready{state.process_index}", "w").close()  # from here on, a failure is a real failure

from test_multiprocess import one_step

one_step(sys.argv[1], per_device_batch=2, supervision=sys.argv[2], online=sys.argv[3] == "online")
"""


def one_step(out_dir: str, per_device_batch: int, supervision: str = "release", online: bool = False) -> dict:
    """One optimizer step on tiny random models; returns (and saves to `out_dir/rank<i>.pt`) what this process saw.

    With `online`, the completions come from the online release loop with greedy decoding (`rollout_truncation=
    "online"`, the same completions for a row whatever the other rows of its process) instead of fixed ones.
    """
    tokenizer = make_tokenizer()
    vocab = len(tokenizer)
    online_args = dict(
        rollout_truncation="online", online_min_segments=2, online_patience=1, online_check_tokens=3,
        generation_kwargs={"do_sample": False},
    )  # fmt: skip
    args = TeachabilityGKDConfig(
        output_dir=out_dir,
        max_steps=1,
        per_device_train_batch_size=per_device_batch,
        gradient_accumulation_steps=1,
        max_completion_length=16,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        shuffle_dataset=False,
        supervision=supervision,
        release_seed=5,
        segmentation="fixed",
        segment_window=2,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        max_grad_norm=0.0,
        **(online_args if online else {}),
    )
    trainer = TeachabilityGKDTrainer(
        model=make_model(vocab, seed=1),
        teacher_model=make_model(vocab, seed=2),
        args=args,
        train_dataset=Dataset.from_dict({"prompt": PROMPTS}),
        processing_class=tokenizer,
    )

    def generate(prompt_ids, images, multimodal_fields, has_tool_images=False):  # as in tests/test_trainer.py
        return [[(7 * sum(ids) + 13 * i) % (vocab - 3) + 3 for i in range(3 + sum(ids) % 9)] for ids in prompt_ids]

    if not online:
        trainer._generate_single_turn = generate
    batches, permutations, compute_loss = [], [], trainer.compute_loss
    permute = trl_ltc.trainer.permute_release_fractions

    def recording_permute(fractions, eligible, generator):  # sees the gathered fractions of the global batch
        permutations.append((fractions.clone(), eligible.clone(), permute(fractions, eligible, generator)))
        return permutations[-1][-1]

    trl_ltc.trainer.permute_release_fractions = recording_permute

    def recording_compute_loss(model, inputs, *args, **kwargs):
        loss = compute_loss(model, inputs, *args, **kwargs)
        mask = inputs["completion_mask"].bool()
        kept = (trainer.last_supervision.weights > 0) & mask
        batches.append(
            {
                "prompt_ids": inputs["prompt_ids"],
                "fractions": inputs.get("random_release_fraction"),
                "padded": not inputs["prompt_mask"].all(),
                "kept": int(kept.sum()),
                "tokens": int(mask.sum()),
                "cached_teacher_scores": "online_teacher_logprobs" in inputs,
            }
        )
        return loss

    trainer.compute_loss = recording_compute_loss
    try:
        trainer.train()
    finally:
        trl_ltc.trainer.permute_release_fractions = permute
    result = {
        "batches": batches,
        "permutations": permutations,
        "log": [entry for entry in trainer.state.log_history if "loss" in entry],
        "params": {name: p.detach().clone() for name, p in trainer.model.named_parameters()},
        "world_size": trainer.accelerator.num_processes,
    }
    torch.save(result, f"{out_dir}/rank{trainer.accelerator.process_index}.pt")
    return result


def _launch_two_processes(tmp_path, supervision, online=False):
    script, out_dir = tmp_path / "launched.py", tmp_path / "two"
    script.write_text(LAUNCHED)
    out_dir.mkdir()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command += [str(script), str(out_dir), supervision, "online" if online else "offline"]

    def started():
        return all((out_dir / f"ready{rank}").exists() for rank in range(2))

    try:
        result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired as error:
        if not started():
            pytest.skip(f"two processes could not start and meet within {TIMEOUT_S} s: {error}")
        raise AssertionError(f"the two-process run did not finish within {TIMEOUT_S} s") from error
    if result.returncode != 0:
        log = (result.stdout + result.stderr)[-3000:]
        if not started():
            pytest.skip(f"torch.distributed could not start two CPU processes here:\n{log}")
        raise AssertionError(f"the two-process run failed after the processes met:\n{log}")
    return [torch.load(out_dir / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


@pytest.mark.parametrize("supervision, online", [("release", False), ("random_release", False), ("release", True)])
def test_two_processes_match_one_process(tmp_path, supervision, online):
    ranks = _launch_two_processes(tmp_path, supervision, online)
    (tmp_path / "one").mkdir()
    reference = one_step(str(tmp_path / "one"), per_device_batch=4, supervision=supervision, online=online)

    # Preconditions: each process saw two of the four prompts, together the four of the single process, none padded
    # (padding would shift positions), and the kept fraction differs between the two processes' batches, so a
    # rank-local metric would be visibly wrong.
    assert [r["world_size"] for r in ranks] == [2, 2] and reference["world_size"] == 1
    (single,) = reference["batches"]
    per_rank = [r["batches"][0] for r in ranks]
    assert [b["prompt_ids"].shape[0] for b in (single, *per_rank)] == [4, 2, 2]
    assert not any(b["padded"] for b in (single, *per_rank))
    both = torch.cat([b["prompt_ids"] for b in per_rank])
    assert sorted(both.tolist()) == sorted(single["prompt_ids"].tolist())
    if online:  # some trajectories were stopped, and the loss used the teacher scores of the rollouts
        assert reference["log"][0]["rollout/truncated_frac"] > 0
        assert all(b["cached_teacher_scores"] for b in (single, *per_rank))
    else:
        assert per_rank[0]["kept"] / per_rank[0]["tokens"] != per_rank[1]["kept"] / per_rank[1]["tokens"]

    # Metrics are gathered: every process logs the values of the global batch, computed here from both batches.
    log, reference_log = ranks[0]["log"][0], reference["log"][0]
    assert all(ranks[1]["log"][0][name] == log[name] for name in ("loss", *METRICS))
    kept, tokens = sum(b["kept"] for b in per_rank), sum(b["tokens"] for b in per_rank)
    assert (kept, tokens) == (single["kept"], single["tokens"])
    assert log["release/kept_token_frac"] == pytest.approx(kept / tokens, abs=1e-6)
    compared = (*METRICS, "rollout/generated_tokens", "rollout/truncated_frac") if online else METRICS
    for name in ("loss", *compared):
        assert log[name] == pytest.approx(reference_log[name], rel=1e-4, abs=1e-6), name

    # The same update: both processes hold the weights of the single-process step, which did move.
    initial = dict(make_model(len(make_tokenizer()), seed=1).named_parameters())
    moved = False
    for name, value in reference["params"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["params"][name], value, atol=1e-6, rtol=1e-5, msg=name)
        moved |= not torch.allclose(value, initial[name], atol=1e-5)
    assert moved

    if supervision == "random_release":
        # One global permutation: both processes gathered the single process's four fractions (in process order) and
        # drew its permutation, seeded by `release_seed` alone, which moves fractions between the two processes.
        ((fractions, eligible, permuted),) = reference["permutations"]
        for rank in ranks:
            ((rank_fractions, rank_eligible, rank_permuted),) = rank["permutations"]
            torch.testing.assert_close(rank_fractions, fractions)
            assert torch.equal(rank_eligible, eligible) and torch.equal(rank_permuted, permuted)
        assert eligible.all()
        order = torch.randperm(4, generator=torch.Generator().manual_seed(5))
        assert torch.equal(permuted, fractions[order])
        assert sorted(permuted[:2].tolist()) != sorted(fractions[:2].tolist())  # across the processes
        # Each process applied the permuted fractions of its own rows: those of the same rows in the single process
        # (matched by prompt, unpadded here, as the processes pad their completions to different widths).
        by_row = {tuple(p.tolist()): f for p, f in zip(single["prompt_ids"], single["fractions"].tolist())}
        for batch in per_rank:
            for prompt, fraction in zip(batch["prompt_ids"], batch["fractions"].tolist()):
                assert by_row[tuple(prompt.tolist())] == fraction


# --- `trl-ltc distill --accelerate_config ... --num_processes 2`, end to end --------------------------------------

DISTILL_TIMEOUT_S = 150  # about 30 s on two busy CPU cores; a hang at the end of the run ran into this
COULD_NOT_MEET = ("DistNetworkError", "RendezvousError", "EADDRINUSE", "address already in use")


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_distill_launch_finishes(tmp_path):
    """The real command under `accelerate launch` (the shipped `multi_gpu` config, on CPU) with two processes: both
    train, the main process saves, and every process exits. The process that saves nothing could hang at the end:
    freeing the trainer freed the process group from the DDP reducer, with the GIL held, and the group's destructor
    joined a gloo worker thread that waited for the GIL to free the tensors of `train`'s last all_gather. The race
    depends on timing: without the fix a run hangs in about a third of the tries here, so one run does not always
    catch it (`test_commands.py` checks the order of the releases)."""
    import json
    import signal

    import yaml

    from trl_ltc.commands.distill import resolve_accelerate_config

    tokenizer = make_tokenizer()
    for name, seed in (("student", 1), ("teacher", 2)):
        make_model(len(tokenizer), seed=seed).save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    questions = tmp_path / "questions.jsonl"
    questions.write_text("".join(json.dumps({"question": prompt}) + "\n" for prompt in PROMPTS))
    config = yaml.safe_load(Path(resolve_accelerate_config("multi_gpu")).read_text())
    config["main_process_port"] = _free_port()  # the shipped config's default port may be taken
    accelerate_config = tmp_path / "multi_gpu.yaml"
    accelerate_config.write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    command = [sys.executable, "-m", "trl_ltc.cli", "distill", "--accelerate_config", str(accelerate_config)]
    command += ["--num_processes", "2", "--model_name_or_path", str(tmp_path / "student")]
    command += ["--teacher_model_name_or_path", str(tmp_path / "teacher"), "--dataset_name", str(questions)]
    command += ["--dataset_prompt_column", "question", "--output_dir", str(out), "--max_steps", "1"]
    command += ["--per_device_train_batch_size", "2", "--max_completion_length", "8", "--use_cpu", "--bf16", "false"]
    command += ["--report_to", "none", "--gradient_checkpointing", "false", "--save_strategy", "no"]
    command += ["--segmentation", "fixed", "--segment_window", "3", "--learning_rate", "0.05"]
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    # A session of its own: on a timeout the launcher and both processes are killed, not left behind.
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        log, _ = process.communicate(timeout=DISTILL_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        log, _ = process.communicate()
        saved = (out / "trainer_state.json").exists()
        raise AssertionError(
            f"the two-process distill did not finish within {DISTILL_TIMEOUT_S} s "
            f"({'after' if saved else 'before'} the main process saved):\n{log[-3000:]}"
        ) from None
    if process.returncode != 0 and any(sign in log for sign in COULD_NOT_MEET):
        pytest.skip(f"torch.distributed could not start two CPU processes here:\n{log[-3000:]}")
    assert process.returncode == 0, log[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 1
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    # Both processes trained: the global batch is 2 processes x 2 prompts, one epoch of the 4 prompts.
    assert state["log_history"][0]["epoch"] == 1
