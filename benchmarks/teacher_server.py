"""A served teacher against the local one, on the same student rollouts of the quickstart pair.

    python benchmarks/teacher_server.py [--prompts 16] [--tokens 96] [--url http://host:port]

Samples completions of the quickstart student (SmolLM2-135M-Instruct + 0.1 x std noise) for held-out problems, scores
them with the local teacher (fp32, de-quantized from the GGUF) and with llama.cpp's server serving the GGUF itself
(started here unless `--url` is given), and prints: the served `log pT(y)` against the local one (max and mean abs
difference, on the completions as sampled and on their re-tokenized text), the share of completion tokens the server
could score (`unscored_frac`), the release decisions of the two (same kept length per trajectory), the
`inexact_margin_frac` at n = 5, 20, 100, and the scoring time of one batch, served / local. Not a test.

    python benchmarks/teacher_server.py --step_rounds 3

Step time instead: the quickstart recipe (release, loss_type advantage, LoRA r=16, 4 prompts x 96 tokens) trained
for 2 steps with the local teacher, then with the served one, `--step_rounds` times in alternation; prints the median
`step_time` of each and the served / local ratio per round (median and range).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from trl_ltc import embedded
from trl_ltc.quickstart import heldout_prompts
from trl_ltc.segmentation import segment_completions
from trl_ltc.served_teacher import served_batch_fields
from trl_ltc.signals import OutputHead, TeacherTopLogprobs, last_hidden_state, signals_from_hidden
from trl_ltc.supervision import kept_fractions, supervision_weights
from trl_ltc.teacher_server import TeacherServer


def rollouts(student, tokenizer, prompts, tokens, seed=0):
    torch.manual_seed(seed)
    ids = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts]
    completions = []
    for prompt in ids:
        out = student.generate(torch.tensor([prompt]), max_new_tokens=tokens, do_sample=True, top_k=0, top_p=1.0,
                               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        completions.append(out[0, len(prompt) :].tolist())
    return ids, completions


def batch_of(prompts, completions, pad):
    width, p_width = max(map(len, completions)), max(map(len, prompts))
    batch = {
        "prompt_ids": torch.tensor([[pad] * (p_width - len(p)) + p for p in prompts]),
        "prompt_mask": torch.tensor([[0] * (p_width - len(p)) + [1] * len(p) for p in prompts]),
        "completion_ids": torch.tensor([c + [pad] * (width - len(c)) for c in completions]),
        "completion_mask": torch.tensor([[1] * len(c) + [0] * (width - len(c)) for c in completions]),
    }
    return batch


def signals(student, teacher, batch, top_k, served=None):
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    mask = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    width = batch["completion_ids"].shape[1]
    with torch.no_grad():
        hs = last_hidden_state(student, input_ids, mask)[:, -width - 1 : -1]
        ht = None if served else last_hidden_state(teacher, input_ids, mask)[:, -width - 1 : -1]
        loss_mask = batch["completion_mask"] * (served["served_mask"] if served else 1)
        scores = None
        if served:
            scores = TeacherTopLogprobs(served["served_logprobs"], served["served_top_ids"], served["served_top_logprobs"])
        head_t = None if served else OutputHead.of(teacher)
        return signals_from_hidden(hs, ht, batch["completion_ids"], loss_mask, OutputHead.of(student), head_t, top_k,
                                   teacher_scores=scores), loss_mask  # fmt: skip


def kept(batch, sig, loss_mask, tokenizer):
    segments = segment_completions(batch["completion_ids"], batch["completion_mask"], tokenizer, "nltk", 64)
    rule = supervision_weights("release", loss_mask, segment_ids=segments, margins=sig.margins)
    return kept_fractions(rule.weights, loss_mask, segments)[0]


def step_times(url: str, rounds: int) -> None:
    import yaml

    from trl_ltc.distill import build_trainer, recipe_args
    from trl_ltc.quickstart import recipe_path

    teacher_dir, student_dir = embedded.prepare_smollm2_pair()
    recipe = yaml.safe_load(open(recipe_path()))
    recipe |= {"model_name_or_path": student_dir, "dataset_name": embedded.quickstart_dataset_path("train"),
               "loss_type": "advantage", "max_steps": 2, "release_diagnostics_steps": 0, "output_dir": "/tmp/step"}
    recipe.pop("beta", None)
    ratios, times = [], {"local": [], "served": []}
    for r in range(rounds):
        round_times = {}
        for name in ("local", "served"):
            teacher = {"teacher_server_url": url} if name == "served" else {"teacher_model_name_or_path": teacher_dir}
            trainer = build_trainer(*recipe_args(recipe | teacher, []))
            trainer.train()
            steps = [h["step_time"] for h in trainer.state.log_history if "step_time" in h]
            round_times[name] = statistics.median(steps)
            times[name] += steps
        ratios.append(round_times["served"] / round_times["local"])
        print(f"round {r + 1}: local {round_times['local']:.1f} s/step, served {round_times['served']:.1f} s/step, "
              f"served/local {ratios[-1]:.2f}")  # fmt: skip
    print(f"step time: local median {statistics.median(times['local']):.1f} s, served median "
          f"{statistics.median(times['served']):.1f} s; served/local {statistics.median(ratios):.2f} "
          f"(range {min(ratios):.2f}-{max(ratios):.2f} over {rounds} rounds)")  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=96)
    parser.add_argument("--top_k", type=int, default=10)
    parser.add_argument("--url", default=None)
    parser.add_argument("--step_rounds", type=int, default=0, help="measure step time instead (rounds)")
    args = parser.parse_args()
    if args.step_rounds:
        with contextlib.ExitStack() as stack:
            url = args.url
            if url is None:
                from trl_ltc.llama_server import local_llama_server

                url = stack.enter_context(local_llama_server(embedded.teacher_gguf()))
            step_times(url, args.step_rounds)
        return
    teacher_dir, student_dir = embedded.prepare_smollm2_pair()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher = AutoModelForCausalLM.from_pretrained(teacher_dir, dtype=torch.float32).eval()
    student = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    prompts, completions = rollouts(student, tokenizer, heldout_prompts(args.prompts), args.tokens)
    # The same texts re-tokenized by the tokenizer: what a text-prompt server sees, token for token.
    canonical = []
    for p, c in zip(prompts, completions):
        text = tokenizer.decode(p + c, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        canonical.append(tokenizer(text, add_special_tokens=False)["input_ids"][len(p) :])
    with contextlib.ExitStack() as stack:
        url = args.url
        if url is None:
            from trl_ltc.llama_server import local_llama_server

            url = stack.enter_context(local_llama_server(embedded.teacher_gguf()))
        # One scoring at the largest n: a server's top-n is the first n of its top-100.
        server = TeacherServer(url, tokenizer, top_logprobs=100, concurrency=1)
        for name, comps in (("as sampled", completions), ("re-tokenized", canonical)):
            batch = batch_of(prompts, comps, tokenizer.pad_token_id)
            start = time.perf_counter()
            local, mask = signals(student, teacher, batch, args.top_k)
            local_seconds = time.perf_counter() - start
            local_kept = kept(batch, local, mask, tokenizer)
            start = time.perf_counter()
            full = served_batch_fields(server, batch, len(tokenizer))
            served_seconds = time.perf_counter() - start
            print(f"--- {len(comps)} completions {name} ({int(batch['completion_mask'].sum())} tokens), K={args.top_k}; "
                  f"scoring time served/local {served_seconds / local_seconds:.1f}x "
                  f"({served_seconds:.1f} s / {local_seconds:.1f} s)")  # fmt: skip
            for n in (5, 20, 100):
                fields = full | {key: full[key][..., :n] for key in ("served_top_ids", "served_top_logprobs")}
                sig, smask = signals(student, None, batch, args.top_k, fields)
                on = smask.bool()
                diff = (sig.teacher_logprobs - local.teacher_logprobs)[on].abs()
                unscored = 1 - on.sum().item() / batch["completion_mask"].sum().item()
                inexact = sig.inexact_margins[on].float().mean().item()
                agree = (kept(batch, sig, smask, tokenizer) - local_kept).abs() < 1e-6
                exact = on & ~sig.inexact_margins
                mdiff = (sig.margins - local.margins)[exact].abs()
                print(f"n={n:3d}: |log pT served - local| max {diff.max():.3f} mean {diff.mean():.4f} "
                      f"(median {diff.median():.4f}); unscored_frac {unscored:.3f}; inexact_margin_frac {inexact:.3f}; "
                      f"exact margins |diff| median {mdiff.median():.3f} mean {mdiff.mean():.3f}; release kept length "
                      f"equal in {int(agree.sum())}/{len(agree)} (accepted local {int((local_kept < 1).sum())})")  # fmt: skip


if __name__ == "__main__":
    main()
