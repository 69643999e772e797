"""Step time and peak memory of `TeachabilityGKDTrainer` against its parent `trl.DistillationTrainer`, on CPU.

    python benchmarks/step_time.py          # vocab 32768, batch 8 x 256 completion tokens, 1 + 3 steps, 3 runs: ~7 min
    python benchmarks/step_time.py --quick  # smoke run: vocab 4096, 64 tokens, 1 + 1 step, 1 run: < 1 min

(times on an idle 2-core machine; see the per-run "other processes" share and the final warning otherwise)

Every configuration trains the same setup from the same seeds, each run in its own subprocess (so that its peak memory
is its own): a 2-layer Qwen2-style random student and teacher (hidden 64, different seeds, untied heads), a byte-level
BPE tokenizer trained in-process on synthetic text (no download) whose length equals the vocabulary, and a batch of
`--batch` conversational prompts. Generation cannot stop early (`min_new_tokens = max_new_tokens`), so every step
scores exactly `--batch x --completion` tokens; the script checks `completions/mean_length`.

Configurations: `TeachabilityGKDTrainer` with `supervision` = `full`, `release`, `token_teachability`
(`segmentation="nltk"`), and `trl.DistillationTrainer` with its default loss (`beta=1.0`, reverse KL). The runs go
in the order full, release, parent, token_teachability, then reversed, then forward again (`--repeats` rounds, 3 by
default); the medians over runs per configuration are reported.

Measured per run, over the timed steps (the first `--warmup` steps are excluded):

- `step`: the `step_time` metric the parent logs (generation + forward + backward of one optimizer step).
- `gen`: generation (`_generate_and_score_completions`); `step - gen` is the training part of the step.
- `loss`: the loss function alone, forward (`_supervised_loss` / the parent's `_chunked_divergence_loss`) plus the
  backward of its vocabulary-projection autograd function (`_ChunkedSignals` / `ChunkedDivergenceFunction`).
- `train()`: wall time of the whole `trainer.train()` call (warmup steps, optimizer steps and logging included).
- memory: peak RSS increase during `train()` over the RSS just before it (sampled every 5 ms in a thread), the median
  over timed steps of the peak RSS increase within one step, and the process's `ru_maxrss`.

Ratios against their targets are printed with PASS/MISS; nothing is asserted.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import json
import os
import random
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("full", "release", "parent", "token_teachability")
LABELS = {
    "full": "TeachabilityGKD full",
    "release": "TeachabilityGKD release",
    "token_teachability": "TeachabilityGKD token_teachability",
    "parent": "trl.DistillationTrainer (beta=1)",
}
STUDENT_SEED, TEACHER_SEED, TRAIN_SEED = 0, 1, 42



# ----------------------------------------------------------------------------------------------------------------
# Offline tokenizer
# ----------------------------------------------------------------------------------------------------------------


def _synthetic_corpus(n_lines: int = 60_000, seed: int = 0) -> list[str]:
    """Deterministic English-like prose (a large invented lexicon, Zipf-distributed) mixed with arithmetic text."""
    rng = random.Random(seed)
    clusters = ["bl", "br", "ch", "cl", "cr", "dr", "fl", "fr", "gr", "pl", "pr", "sh", "sl", "sp", "st", "th", "tr"]
    onsets = ["", *"bcdfghjklmnprstvwyz", *clusters]
    nuclei = ["a", "e", "i", "o", "u", "ai", "ea", "ee", "oa", "oo", "ou", "ie", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "m", "nd", "ng", "st", "rk", "ck", "sh", "th", "x"]
    lexicon = sorted(
        {"".join(rng.choice(onsets) + rng.choice(nuclei) + rng.choice(codas) for _ in range(rng.randint(1, 4)))
         for _ in range(60_000)}
    )  # fmt: skip
    rng.shuffle(lexicon)
    common = ["the", "of", "and", "to", "a", "in", "is", "that", "it", "for", "we", "so", "then", "this", "with"]
    cum_weights = list(itertools.accumulate(1.0 / (rank + 10) for rank in range(len(lexicon))))
    math_templates = [
        "Let x = {a}. Then {b}x + {c} = {d}, so the answer is {d}.",
        "We compute {a} + {b} = {s}, and {s} * {c} = {p}. Is that right? Yes.",
        "If Tom has {a} apples and gives away {b}, he has {r} left.",
        "$\\frac{{{a}}}{{{b}}} + \\frac{{{c}}}{{{d}}}$ is computed step by step.\nFirst, find a common denominator.",
        "Dr. Smith paid ${a}.{b} for {c} items at {d} p.m. sharp!",
    ]
    lines = []
    for _ in range(n_lines):
        if rng.random() < 0.2:
            a, b, c, d = (rng.randint(1, 999) for _ in range(4))
            lines.append(rng.choice(math_templates).format(a=a, b=b, c=c, d=d, s=a + b, p=(a + b) * c, r=a - b))
            continue
        sentences = []
        for _ in range(rng.randint(1, 4)):
            n = rng.randint(4, 16)
            words = rng.choices(lexicon, cum_weights=cum_weights, k=n)
            words = [rng.choice(common) if rng.random() < 0.3 else w for w in words]
            words[0] = words[0].capitalize()
            sentences.append(" ".join(words) + rng.choice([".", ".", ".", "?", "!", ":", ";"]))
        lines.append(" ".join(sentences))
    return lines


def build_tokenizer_json(vocab_size: int, path: str) -> str:
    """Train a byte-level BPE of exactly `vocab_size` tokens (filler tokens appended if BPE stops short)."""
    from trl_ltc.testing import train_bpe

    train_bpe(_synthetic_corpus(), vocab_size, exact=True).save(path)
    return path


def load_tokenizer(path: str):
    from tokenizers import Tokenizer

    from trl_ltc.testing import wrap_tokenizer

    return wrap_tokenizer(Tokenizer.from_file(path))


# ----------------------------------------------------------------------------------------------------------------
# Worker: one configuration, one process
# ----------------------------------------------------------------------------------------------------------------


class RssSampler(threading.Thread):
    """Samples this process's RSS every `interval` seconds; keeps the overall peak and a resettable window peak."""

    def __init__(self, interval: float = 0.005):
        super().__init__(daemon=True)
        try:
            import psutil

            self._read = psutil.Process().memory_info
            self.rss = lambda: self._read().rss
        except ImportError:  # fall back to /proc (Linux)
            page = os.sysconf("SC_PAGE_SIZE")

            def rss():
                with open("/proc/self/statm") as f:
                    return int(f.read().split()[1]) * page

            self.rss = rss
        self.interval = interval
        self.peak = self.window_peak = self.rss()
        self._halt = threading.Event()

    def reset_window(self) -> int:
        now = self.rss()
        self.window_peak = now
        self.peak = max(self.peak, now)
        return now

    def reset_peak(self) -> int:
        now = self.rss()
        self.peak = self.window_peak = now
        return now

    def run(self):
        while not self._halt.is_set():
            value = self.rss()
            self.peak = max(self.peak, value)
            self.window_peak = max(self.window_peak, value)
            self._halt.wait(self.interval)

    def stop(self):
        self._halt.set()
        self.join()
        # One last sample so a peak right at the end is not missed.
        self.window_peak = max(self.window_peak, self.rss())
        self.peak = max(self.peak, self.window_peak)


def _make_model(vocab_size: int, seed: int):
    from trl_ltc.testing import tiny_causal_lm

    return tiny_causal_lm(vocab_size, seed).train()


def _prompts(n: int, seed: int = 0) -> list[list[dict]]:
    rng = random.Random(seed)
    topics = ["apples", "a train", "the sum of two numbers", "a triangle", "interest on a loan", "a recipe"]
    prompts = []
    for i in range(n):
        a, b, c = rng.randint(1, 99), rng.randint(2, 9), rng.randint(1, 50)
        content = f"Question {i}: explain {rng.choice(topics)} step by step. Let x = {a}; what is {b}x + {c}?"
        prompts.append([{"role": "user", "content": content}])
    return prompts


def _timed(fn, bucket: list, step_of):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        start = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            bucket.append((step_of(), time.perf_counter() - start))

    return wrapper


def run_worker(args) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import trl.trainer.distillation_trainer as distillation
    from datasets import Dataset
    from transformers.utils import logging as hf_logging
    from trl import DistillationConfig, DistillationTrainer
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    import trl_ltc.signals as ltc_signals
    import trl_ltc.trainer as ltc_trainer
    from trl_ltc import TeachabilityGKDConfig, TeachabilityGKDTrainer

    hf_logging.set_verbosity_error()
    if args.threads:
        torch.set_num_threads(args.threads)
    sampler = RssSampler()
    sampler.start()

    tokenizer = load_tokenizer(args.tokenizer)
    assert len(tokenizer) == args.vocab, (len(tokenizer), args.vocab)
    student = _make_model(args.vocab, STUDENT_SEED)
    teacher = _make_model(args.vocab, TEACHER_SEED)
    total_steps = args.warmup + args.steps
    dataset = Dataset.from_list([{"prompt": p} for p in _prompts(args.batch * total_steps)])

    common = {
        "output_dir": args.output_dir,
        "per_device_train_batch_size": args.batch,
        "gradient_accumulation_steps": 1,
        "max_completion_length": args.completion,
        "max_steps": total_steps,
        "learning_rate": 1e-5,
        "bf16": False,
        "use_cpu": True,
        "gradient_checkpointing": False,
        "report_to": "none",
        "save_strategy": "no",
        "logging_steps": 1,
        "seed": TRAIN_SEED,
        "disable_tqdm": True,
        # Every completion is exactly `completion` tokens long: EOS cannot end generation early.
        "generation_kwargs": {"min_new_tokens": args.completion},
    }
    if args.worker == "parent":
        config = DistillationConfig(**common)
        trainer_cls = DistillationTrainer
    else:
        config = TeachabilityGKDConfig(
            **common, supervision=args.worker, segmentation="nltk", signal_chunk_size=args.signal_chunk_size
        )
        trainer_cls = TeachabilityGKDTrainer
    trainer = trainer_cls(
        model=student, teacher_model=teacher, args=config, train_dataset=dataset, processing_class=tokenizer
    )

    # Instrumentation (instance/module-level wrappers; each records (global_step, seconds) per call).
    step_of = lambda: trainer.state.global_step
    timings: dict[str, list] = {k: [] for k in ("gen", "forward", "backward", "loss_fwd", "loss_bwd", "signals",
                                                "segmentation", "supervision", "stats", "cpu")}  # fmt: skip
    trainer._generate_and_score_completions = _timed(trainer._generate_and_score_completions, timings["gen"], step_of)
    trainer.compute_loss = _timed(trainer.compute_loss, timings["forward"], step_of)
    trainer.accelerator.backward = _timed(trainer.accelerator.backward, timings["backward"], step_of)
    if args.worker == "parent":
        distillation._chunked_divergence_loss = _timed(
            distillation._chunked_divergence_loss, timings["loss_fwd"], step_of
        )
        function = ChunkedDivergenceFunction
    else:
        trainer._supervised_loss = _timed(trainer._supervised_loss, timings["loss_fwd"], step_of)
        for name, key in (("signals_from_hidden", "signals"), ("segment_completions", "segmentation"),
                          ("supervision_weights", "supervision"), ("supervision_stats", "stats")):  # fmt: skip
            setattr(ltc_trainer, name, _timed(getattr(ltc_trainer, name), timings[key], step_of))
        function = ltc_signals._ChunkedSignals
    function.backward = staticmethod(_timed(function.backward, timings["loss_bwd"], step_of))

    step_memory = []  # (global_step, rss at step start, window peak)
    original_training_step = trainer.training_step

    def training_step(*a, **kw):
        before = sampler.reset_window()
        cpu = time.process_time()
        try:
            return original_training_step(*a, **kw)
        finally:
            timings["cpu"].append((step_of(), time.process_time() - cpu))
            step_memory.append((step_of(), before, max(sampler.window_peak, sampler.rss())))

    trainer.training_step = training_step

    rss_before = sampler.reset_peak()
    start = time.perf_counter()
    trainer.train()
    train_wall = time.perf_counter() - start
    sampler.stop()

    history = [h for h in trainer.state.log_history if "step_time" in h]
    timed = [h for h in history if h["step"] > args.warmup]

    def per_step(key):
        by_step: dict[int, float] = {}
        for step, seconds in timings[key]:
            if step >= args.warmup:
                by_step[step] = by_step.get(step, 0.0) + seconds
        return statistics.mean(by_step.values()) if by_step else None

    timed_memory = [(peak - before) for step, before, peak in step_memory if step >= args.warmup]
    return {
        "config": args.worker,
        "threads": torch.get_num_threads(),
        "step_times": [h["step_time"] for h in timed],
        "step_time": statistics.mean(h["step_time"] for h in timed),
        "mean_length": [h.get("completions/mean_length") for h in history],
        "min_length": [h.get("completions/min_length") for h in history],
        "loss": [h.get("loss") for h in history],
        "train_wall": train_wall,
        **{key: per_step(key) for key in timings},
        "rss_before_train": rss_before,
        "train_peak_delta": sampler.peak - rss_before,
        "step_peak_delta": statistics.median(timed_memory) if timed_memory else None,
        "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,  # KiB on Linux
    }


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def _mib(x):
    return "-" if x is None else f"{x / 2**20:8.1f}"


def _sec(x):
    return "-" if x is None else f"{x:7.3f}"


def _busy_cpu_seconds() -> float | None:
    """Machine-wide busy CPU seconds so far (all cores, from /proc/stat), or None where unavailable."""
    try:
        with open("/proc/stat") as f:
            fields = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal (guest is inside user)
    return busy / os.sysconf("SC_CLK_TCK")


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _load() -> str:
    return "/".join(f"{x:.2f}" for x in os.getloadavg())


def _median(results, key):
    values = [r[key] for r in results if r.get(key) is not None]
    return statistics.median(values) if values else None


_CHILD: list = []  # the worker process in flight, if any


def _on_sigterm(*_):
    for child in _CHILD:
        with contextlib.suppress(Exception):
            child.terminate()
            child.wait(timeout=30)
    sys.exit(128 + signal.SIGTERM)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 3; 1 with --quick)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before them (default 1)")
    parser.add_argument("--vocab", type=int, default=None, help="vocabulary size (default 32768; 4096 with --quick)")
    parser.add_argument("--batch", type=int, default=8, help="prompts per step (default 8)")
    parser.add_argument(
        "--completion", type=int, default=None, help="completion tokens (default 256; 64 with --quick)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="runs per configuration (default 3; 1 with --quick)")
    parser.add_argument("--configs", default=",".join(CONFIGS), help=f"comma-separated subset of {','.join(CONFIGS)}")
    parser.add_argument(
        "--signal-chunk-size",
        type=int,
        default=None,
        help="TeachabilityGKDConfig.signal_chunk_size (default: its own)",
    )
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's own)")
    parser.add_argument("--quick", action="store_true", help="smoke run: vocab 4096, 64 tokens, 1 step, 1 repeat")
    parser.add_argument("--json", default=None, help="also write all raw results to this file")
    parser.add_argument("--worker", choices=CONFIGS, help=argparse.SUPPRESS)
    parser.add_argument("--tokenizer", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    # A terminated run still removes its temporary directories (the driver passes the signal on to its worker).
    signal.signal(signal.SIGTERM, _on_sigterm)
    quick = args.quick
    args.steps = args.steps if args.steps is not None else (1 if quick else 3)
    args.vocab = args.vocab if args.vocab is not None else (4096 if quick else 32768)
    args.completion = args.completion if args.completion is not None else (64 if quick else 256)
    args.repeats = args.repeats if args.repeats is not None else (1 if quick else 3)

    if args.worker:
        with tempfile.TemporaryDirectory(prefix=f"trl_ltc_bench_{args.worker}_") as args.output_dir:
            result = run_worker(args)
        with open(args.result, "w") as f:
            json.dump(result, f)
        return 0

    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    unknown = set(configs) - set(CONFIGS)
    if unknown:
        parser.error(f"unknown configs {sorted(unknown)}; choose from {CONFIGS}")
    with tempfile.TemporaryDirectory(prefix="trl_ltc_bench_") as work:
        return _drive(args, configs, work)


def _drive(args, configs, work) -> int:
    # The tokenizer is deterministic; a copy is cached in the temp dir and each run reads its own copy in `work`.
    cache = os.path.join(tempfile.gettempdir(), f"trl_ltc_bench_tokenizer_v1_{args.vocab}.json")
    tok_path = os.path.join(work, "tokenizer.json")
    start = time.perf_counter()
    try:
        shutil.copyfile(cache, tok_path)
    except OSError:
        build_tokenizer_json(args.vocab, tok_path)
        with contextlib.suppress(OSError):
            shutil.copyfile(tok_path, cache + f".{os.getpid()}")
            os.replace(cache + f".{os.getpid()}", cache)
    print(
        f"setup: vocab {args.vocab}, batch {args.batch} x {args.completion} completion tokens, "
        f"{args.warmup} warmup + {args.steps} timed steps, {args.repeats} run(s) per config, "
        f"signal_chunk_size {args.signal_chunk_size or 'default'}, "
        f"{os.cpu_count()} CPU(s), load average {_load()}; tokenizer ready in {time.perf_counter() - start:.1f}s",
        flush=True,
    )

    order = []
    for r in range(args.repeats):
        order += configs if r % 2 == 0 else configs[::-1]
    results: dict[str, list] = {c: [] for c in configs}
    for i, config in enumerate(order):
        out = os.path.join(work, f"{i}_{config}.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", config, "--tokenizer", tok_path, "--result", out]
        for name in ("vocab", "batch", "completion", "steps", "warmup"):
            cmd += [f"--{name}", str(getattr(args, name))]
        for name in ("signal_chunk_size", "threads"):
            if getattr(args, name) is not None:
                cmd += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
        t0, busy0, children0 = time.perf_counter(), _busy_cpu_seconds(), _children_cpu_seconds()
        with subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
            _CHILD[:] = [proc]
            _, stderr = proc.communicate()
            _CHILD.clear()
        wall = time.perf_counter() - t0
        others = None
        if busy0 is not None:
            # CPU time the rest of the machine used meanwhile, as a share of all its cores: other processes on a
            # machine this small inflate wall times (and CPU times, through spinning threads) several-fold.
            others = max(_busy_cpu_seconds() - busy0 - (_children_cpu_seconds() - children0), 0.0)
            others /= wall * (os.cpu_count() or 1)
        if proc.returncode != 0:
            print(f"[{i + 1}/{len(order)}] {config}: FAILED (exit {proc.returncode})\n{stderr[-4000:]}")
            continue
        with open(out) as f:
            result = json.load(f)
        result["others_busy"] = others
        results[config].append(result)
        lengths = {x for x in result["mean_length"] + result["min_length"] if x is not None}
        note = "" if lengths == {float(args.completion)} else f"  WARNING: completion lengths {sorted(lengths)}"
        print(
            f"[{i + 1}/{len(order)}] {config:<18} step {result['step_time']:.3f}s "
            f"({', '.join(f'{s:.3f}' for s in result['step_times'])}), CPU {result['cpu']:.2f}s, "
            f"train() {result['train_wall']:.2f}s, "
            f"peak dRSS {result['train_peak_delta'] / 2**20:.1f} MiB, process {wall:.1f}s"
            + ("" if others is None else f", other processes {others:.0%} of the CPUs")
            + note,
            flush=True,
        )

    keys = ("step_time", "cpu", "gen", "forward", "backward", "loss_fwd", "loss_bwd", "train_wall", "train_peak_delta",
            "step_peak_delta", "ru_maxrss", "signals", "segmentation", "supervision", "stats")  # fmt: skip
    med = {c: {k: _median(rs, k) for k in keys} for c, rs in results.items() if rs}
    for m in med.values():
        if m["step_time"] is not None and m["gen"] is not None:
            m["train_part"] = m["step_time"] - m["gen"]
        if m["loss_fwd"] is not None and m["loss_bwd"] is not None:
            m["loss"] = m["loss_fwd"] + m["loss_bwd"]

    threads = {r["threads"] for rs in results.values() for r in rs}
    print(f"\nMedians over runs (seconds per timed step; memory in MiB; torch threads {sorted(threads)}):")
    header = (f"{'config':<35} {'step':>7} {'CPU s':>7} {'gen':>7} {'step-gen':>8} {'fwd':>7} {'bwd':>7} {'loss':>7} "
              f"{'(fwd':>7} {'bwd)':>7} {'train()':>7} {'dRSS':>8} {'step dRSS':>9} {'maxrss':>8}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for c in configs:
        if c not in med:
            print(f"{LABELS[c]:<35} (no successful run)")
            continue
        m = med[c]
        print(
            f"{LABELS[c]:<35} {_sec(m['step_time'])} {_sec(m['cpu'])} {_sec(m['gen'])} {_sec(m.get('train_part')):>8} "
            f"{_sec(m['forward'])} {_sec(m['backward'])} {_sec(m.get('loss'))} {_sec(m['loss_fwd'])} "
            f"{_sec(m['loss_bwd'])} {_sec(m['train_wall'])} {_mib(m['train_peak_delta'])} "
            f"{_mib(m['step_peak_delta']):>9} {_mib(m['ru_maxrss'])}"
        )
    print(
        "  step = logged step_time; CPU s = process CPU time of the step (all threads); gen = generation;\n"
        "  fwd = compute_loss (both backbones + loss forward); bwd = accelerator.backward;\n"
        "  loss = loss forward (_supervised_loss / _chunked_divergence_loss) + backward of its projection Function;\n"
        "  dRSS = peak RSS increase during train() over just before it; step dRSS = median peak increase within a "
        "timed step."
    )
    inner = [c for c in configs if c != "parent" and c in med]
    if inner:
        print("\nInside _supervised_loss (forward, seconds per step):")
        for c in inner:
            m = med[c]
            print(
                f"  {c:<18} signals {_sec(m['signals'])}  segmentation {_sec(m['segmentation'])}  "
                f"supervision_weights {_sec(m['supervision'])}  supervision_stats {_sec(m['stats'])}"
            )

    def ratio(num, den, key):
        if num not in med or den not in med or not med[den].get(key) or med[num].get(key) is None:
            return None
        return med[num][key] / med[den][key]

    print("\nRatios (medians):")
    checks = [
        ("step time  release / full", "release", "full", "step_time", 1.02),
        ("step time  full / parent DistillationTrainer", "full", "parent", "step_time", 1.00),
        ("step time  token_teachability / full", "token_teachability", "full", "step_time", 1.05),
        ("peak mem   release / full (train() dRSS)", "release", "full", "train_peak_delta", 1.05),
    ]
    for label, num, den, key, target in checks:
        value = ratio(num, den, key)
        if value is None:
            print(f"  {label:<48} n/a")
            continue
        print(f"  {label:<48} {value:6.3f}  (target <= {target:.2f})  {'PASS' if value <= target else 'MISS'}")
    print("  for information:")
    for label, num, den, key in [
        ("(step - gen)  full / parent", "full", "parent", "train_part"),
        ("step CPU time release / full", "release", "full", "cpu"),
        ("step CPU time full / parent", "full", "parent", "cpu"),
        ("step CPU time token_teachability / full", "token_teachability", "full", "cpu"),
        ("loss only     full / parent", "full", "parent", "loss"),
        ("loss only     release / full", "release", "full", "loss"),
        ("loss only     token_teachability / full", "token_teachability", "full", "loss"),
        ("train() wall  full / parent", "full", "parent", "train_wall"),
        ("peak mem      full / parent (train() dRSS)", "full", "parent", "train_peak_delta"),
        ("peak mem      release / full (ru_maxrss)", "release", "full", "ru_maxrss"),
        ("peak mem      release / full (step dRSS)", "release", "full", "step_peak_delta"),
    ]:
        value = ratio(num, den, key)
        print(f"  {label:<48} {'n/a' if value is None else f'{value:6.3f}'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "medians": med}, f, indent=1)
    busy = [r["others_busy"] for rs in results.values() for r in rs if r.get("others_busy") is not None]
    if busy and max(busy) > 0.1:
        print(
            f"\nWARNING: other processes used up to {max(busy):.0%} of the CPUs during a run; the wall and CPU times "
            "of such runs are inflated (several-fold with spinning threads) and the ratios are unreliable. Re-run "
            "on an idle machine, or with `--threads 1` when one other process keeps one core busy."
        )
    print(f"\ntotal {time.perf_counter() - start:.1f}s; load average now {_load()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
