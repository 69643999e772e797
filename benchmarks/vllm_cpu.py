"""vLLM's CPU build against Hugging Face generation on the embedded SmolLM2 student: tokens per second.

Run in the vLLM environment (docs/vllm.md), with the pair built (`trl-ltc quickstart` once, or
`python -c "from trl_ltc.embedded import prepare_smollm2_pair; prepare_smollm2_pair()"`):

    python benchmarks/vllm_cpu.py --rounds 3 --batch_sizes 4 16 --max_new_tokens 96
    python benchmarks/vllm_cpu.py --train --rounds 2      # training steps: HF generation, vLLM, vLLM + online release

The same chat prompts (the quickstart's training prompts) go to both, sampled at temperature 1 for exactly
`max_new_tokens` tokens each (`min_new_tokens` / `ignore_eos`); rounds alternate HF and vLLM so that a load change
on a shared machine hits both. vLLM runs the fp32 folder in `--vllm_dtype` (float32: what the trainer's float32
student is; bfloat16: what TRL's colocated engine picks by default) with its engine in its own process, pinned to
`VLLM_CPU_OMP_THREADS_BIND` (default here: every core); HF uses `torch.get_num_threads()` threads. Prints one JSON
line per measurement and a summary of the vLLM / HF ratios (median and range).

`--train`: training steps of the quickstart recipe (`configs/quickstart.yaml`: release, LoRA r=16, 4 prompts x
<= 96 tokens) with Hugging Face generation, with a colocated vLLM engine (float32) and with vLLM + online release
(`rollout_truncation: online`); each round trains each setup for `--steps` steps in turn (order rotating), and the
step time is the median of those steps (every step syncs the weights into vLLM).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--max_new_tokens", type=int, default=96)
    parser.add_argument("--vllm_dtype", default="float32")
    parser.add_argument("--train", action="store_true")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()
    if args.train:
        return train_steps(args)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{os.cpu_count() - 1}")

    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    from trl_ltc.embedded import prepare_smollm2_pair, quickstart_dataset_path
    from trl_ltc.generation import tokenize_prompts

    _, student_dir = prepare_smollm2_pair()
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    model = AutoModelForCausalLM.from_pretrained(student_dir, dtype=torch.float32).eval()
    prompts = load_dataset("json", data_files=quickstart_dataset_path("train"), split="train")["prompt"]
    llm = LLM(student_dir, dtype=args.vllm_dtype, max_model_len=512, enforce_eager=True, seed=0)
    n = args.max_new_tokens

    def hf(ids_list):
        batch = tokenizer.pad({"input_ids": ids_list}, return_tensors="pt", padding_side="left")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=n, min_new_tokens=n, do_sample=True, top_k=0, top_p=1.0,
                                 pad_token_id=tokenizer.pad_token_id)  # fmt: skip
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(ids_list)

    def vllm(ids_list):
        params = SamplingParams(temperature=1.0, max_tokens=n, ignore_eos=True)
        outputs = llm.generate([{"prompt_token_ids": ids} for ids in ids_list], params, use_tqdm=False)
        return sum(len(o.outputs[0].token_ids) for o in outputs)

    results = {}
    for batch_size in args.batch_sizes:
        ids_list = tokenize_prompts(tokenizer, prompts[:batch_size])
        hf(ids_list[:1]), vllm(ids_list[:1])  # warm-up
        for r in range(args.rounds):
            for name, run in ((("hf", hf), ("vllm", vllm)) if r % 2 == 0 else (("vllm", vllm), ("hf", hf))):
                start = time.perf_counter()
                tokens = run(ids_list)
                seconds = time.perf_counter() - start
                results.setdefault((batch_size, name), []).append(tokens / seconds)
                print(json.dumps({"batch": batch_size, "engine": name, "round": r, "tokens": tokens,
                                  "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}), flush=True)  # fmt: skip
    for batch_size in args.batch_sizes:
        ratios = [v / h for v, h in zip(results[(batch_size, "vllm")], results[(batch_size, "hf")])]
        print(json.dumps({
            "batch": batch_size, "hf_tokens_per_s": round(statistics.median(results[(batch_size, "hf")]), 1),
            "vllm_tokens_per_s": round(statistics.median(results[(batch_size, "vllm")]), 1),
            "vllm_over_hf_median": round(statistics.median(ratios), 2),
            "range": [round(min(ratios), 2), round(max(ratios), 2)], "vllm_dtype": args.vllm_dtype,
            "torch_threads": torch.get_num_threads(),
        }), flush=True)  # fmt: skip


def train_steps(args):
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import yaml
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback

    from trl_ltc import TeachabilityGKDConfig, TeachabilityGKDTrainer
    from trl_ltc.embedded import prepare_smollm2_pair, quickstart_dataset_path
    from trl_ltc.vllm_compat import colocated_engine_dtype

    teacher_dir, student_dir = prepare_smollm2_pair()
    with open(os.path.join(os.path.dirname(__file__), "..", "configs", "quickstart.yaml"), encoding="utf-8") as file:
        recipe = yaml.safe_load(file)
    peft = LoraConfig(r=recipe["lora_r"], lora_alpha=recipe["lora_alpha"], lora_dropout=0.0,
                      target_modules="all-linear", task_type="CAUSAL_LM")  # fmt: skip
    fields = {k: recipe[k] for k in ("supervision", "release_top_k", "segmentation", "loss_type", "beta",
                                     "max_completion_length", "temperature", "per_device_train_batch_size",
                                     "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "seed")}  # fmt: skip
    prompts = load_dataset("json", data_files=quickstart_dataset_path("train"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    setups = {
        "hf": {},
        "vllm": {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 512},
        "vllm_online": {"use_vllm": True, "vllm_mode": "colocate", "vllm_max_model_length": 512,
                        "rollout_truncation": "online"},
    }  # fmt: skip

    class Timer(TrainerCallback):
        def __init__(self):
            self.steps = []

        def on_step_begin(self, *a, **k):
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.steps.append(time.perf_counter() - self.start)

    trainers, timers = {}, {}
    for name, extra in setups.items():
        if name == "vllm_online":
            extra = {**extra, "loss_type": "advantage"}  # online release reuses the teacher's scores: sampled-token loss
        config = TeachabilityGKDConfig(output_dir=f"/tmp/vllm_cpu_bench/{name}", max_steps=args.steps, use_cpu=True,
                                       bf16=False, report_to="none", logging_steps=1, save_strategy="no",
                                       release_diagnostics_steps=0, **{**fields, **extra})  # fmt: skip
        timers[name] = Timer()
        with colocated_engine_dtype(args.vllm_dtype):
            trainers[name] = TeachabilityGKDTrainer(model=student_dir, teacher_model=teacher_dir, args=config,
                                                    train_dataset=prompts, processing_class=tokenizer,
                                                    peft_config=peft, callbacks=[timers[name]])  # fmt: skip
    names = list(setups)
    results = {name: [] for name in names}
    for r in range(args.rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            trainer, timer = trainers[name], timers[name]
            timer.steps = []
            trainer.train()
            logs = [h for h in trainer.state.log_history if "loss" in h][-args.steps :]
            step = statistics.median(timer.steps)
            tokens = statistics.mean(h["rollout/generated_tokens"] for h in logs)
            results[name].append(step)
            print(json.dumps({"setup": name, "round": r, "step_seconds": round(step, 2),
                              "generated_tokens_per_step": tokens, "loss": [round(h["loss"], 4) for h in logs]}),
                  flush=True)  # fmt: skip
    for name in names[1:]:
        ratios = [v / h for v, h in zip(results[name], results["hf"])]
        print(json.dumps({"setup": name, "step_over_hf_median": round(statistics.median(ratios), 2),
                          "range": [round(min(ratios), 2), round(max(ratios), 2)],
                          "median_step_seconds": round(statistics.median(results[name]), 2),
                          "hf_median_step_seconds": round(statistics.median(results["hf"]), 2)}), flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
