"""The GPU check of issue 16, in one run on a lent GPU machine (random-weight models: no download).

    python scripts/bench_gpu.py --tokenizer TOKENIZER_DIR --out OUT [--sizes 0.5b,8b] [--search-size 0.5b]

1. `decalign bench-engine` (the engine against transformers' `generate`, side by side) on Llama
   models of published sizes (decalign.testing.SHAPES) with the tokenizer given (its vocabulary sets
   the output layer's size), in bfloat16 on the GPU, as `--device auto` picks.
2. The search economics at `--search-size`: `train-value` distils the `sentiment` reward into a prefix
   value for that random policy, then `decalign bench --frontier` runs greedy, Best-of-8 and CARDS
   with that value on all prompts batched, and a latency run (one prompt at a time).
3. `decalign bench-cold` at `--search-size`: CoLD's decode step against greedy with the same adapter.
4. `tests`: the CUDA tests (tests/test_device.py); `attention`: scripts/step_speed.py's row sweep (every
   step a new cache width) with the engine's attention kernels and with PyTorch's own choice (cuDNN's
   first on Hopper); `subset`: scripts/step_speed.py at `--search-size`
   (a step over the fed rows alone against one over every row); `join`: scripts/join_speed.py at
   `--search-size` (what a request joining a running batch adds to a step, in a pass of its own or
   in the step's); `load`: scripts/load_test.py on servers of the `--search-size` policy, continuous,
   grouped and static batching side by side.
Rewards of a random-weight policy mean little; the times and decode tokens are what this measures.
Each step's table is printed and written under OUT (engine-SIZE.md, search.md, latency.md, cold.md).
`--sizes tiny --search-size tiny --quick` rehearses the whole script on a CPU in a few minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

TOPICS = ["bake bread at home", "learn to swim as an adult", "keep houseplants alive", "save money on groceries",
          "write a cover letter", "fix a leaking tap", "train for a first 10k run", "start learning the piano",
          "plan a trip to the mountains", "sleep better", "teach a child to ride a bike", "make a simple budget",
          "prepare for a job interview", "choose a used car", "cook rice without a rice cooker",
          "reduce screen time", "organise a small kitchen", "care for a new puppy", "grow tomatoes on a balcony",
          "speak more confidently in meetings"]
FORMS = ["How do I {}?", "Give me three tips to {}.", "What mistakes do beginners make when they try to {}?"]


def write_prompts(path: Path, count: int) -> Path:
    prompts = [form.format(topic) for form in FORMS for topic in TOPICS][:count]
    path.write_text("".join(json.dumps({"id": i, "prompt": p}) + "\n" for i, p in enumerate(prompts)))
    return path


def decalign(*args: str, log: Path, timeout: int) -> bool:
    """Run a decalign command (the checkout's code), its output to the log; False when it failed."""
    return logged([sys.executable, "-m", "decalign.cli", *args], "decalign " + " ".join(args), log, timeout)


def logged(command: list[str], title: str, log: Path, timeout: int, env: dict[str, str] | None = None) -> bool:
    """Run a command (with `env` added to the environment), its output appended to the log; False when
    it failed or ran out of time."""
    print("$ " + title, flush=True)
    start = time.perf_counter()
    with log.open("a") as handle:
        handle.write("$ " + title + "\n")
        handle.flush()
        try:
            code = subprocess.run(command, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout,
                                  env={**os.environ, **(env or {})}).returncode
        except subprocess.TimeoutExpired:
            code = "timeout"
    print(f"  -> exit {code} in {time.perf_counter() - start:.0f} s", flush=True)
    return code == 0


def shape(size: str) -> dict:
    import torch

    from decalign.testing import SHAPES

    on_gpu = torch.cuda.is_available()
    return {**{"tiny": dict(layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2), **SHAPES}[size],
            "context": 4096, "device": "cuda" if on_gpu else "cpu", "dtype": "bfloat16" if on_gpu else "float32"}


def engine_table(size: str, tokenizer, quick: bool) -> str:
    """bench-engine's table for a random model of `size`, built in place (no save and reload)."""
    import torch

    from decalign import Engine
    from decalign.bench_engine import run_bench
    from decalign.testing import random_model

    start = time.perf_counter()
    model, tokenizer = random_model(**shape(size), tokenizer=tokenizer)
    params = sum(p.numel() for p in model.parameters()) / 1e9
    print(f"built {size}: {params:.2f}B parameters in {time.perf_counter() - start:.0f} s", flush=True)
    engine = Engine(model, tokenizer, name=f"random {size} ({params:.2f}B, {model.dtype})")
    options = dict(batch_sizes=(1, 4), new_tokens=16, repeats=1) if quick else \
        dict(batch_sizes=(1, 8, 32), new_tokens=128, repeats=3)
    table = run_bench(engine, **options)
    del engine, model
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return table


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokenizer", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--sizes", default="0.5b,8b")
    parser.add_argument("--search-size", default="0.5b")
    parser.add_argument("--work", type=Path, default=Path("/tmp/decalign-gpu"))
    parser.add_argument("--steps", default="engine,search,latency,cold",
                        help="which of tests, engine, attention, subset, join, load, search, latency (one prompt at a time), "
                             "cold to run")
    parser.add_argument("--max-batch", default="64", help="the load test servers' cap on live rows")
    parser.add_argument("--quick", action="store_true", help="small counts, for a rehearsal on a CPU")
    args = parser.parse_args()
    import torch
    import transformers
    from transformers import AutoTokenizer

    args.out.mkdir(parents=True, exist_ok=True)
    args.work.mkdir(parents=True, exist_ok=True)
    log = args.out / "log.txt"
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU"
    print(f"torch {torch.__version__} · transformers {transformers.__version__} · {gpu} · "
          f"{os.cpu_count()} CPUs", flush=True)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    steps = set(args.steps.split(","))
    if "tests" in steps:
        tests = args.out / "tests.txt"
        logged([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_device.py"],
               "pytest tests/test_device.py", tests, timeout=300)
        print(tests.read_text()[-1500:], flush=True)
    for size in args.sizes.split(",") if "engine" in steps else []:
        try:
            table = engine_table(size, tokenizer, args.quick)
        except Exception as error:  # report and go on to the next measurement
            table = f"{size}: failed: {type(error).__name__}: {error}"
        (args.out / f"engine-{size}.md").write_text(table + "\n")
        print(table, flush=True)

    from decalign.testing import make_tiny_model

    policy = make_tiny_model(args.work / args.search_size, **shape(args.search_size), tokenizer=tokenizer)
    scripts = Path(__file__).parent
    if "subset" in steps:  # a step over the fed rows alone against one over every row
        table = args.out / "subset.txt"
        logged([sys.executable, str(scripts / "step_speed.py"), "--model", str(policy), "--prompts", "48",
                "--rows-per-prompt", "8"], "step_speed.py", table, timeout=120)
        print(table.read_text(), flush=True)
    if "attention" in steps:  # a step's cost over ever-new widths, without cuDNN attention and with it
        table = args.out / "attention.txt"
        for cudnn in ("0", "1"):
            logged([sys.executable, str(scripts / "step_speed.py"), "--model", str(policy), "--rows-sweep",
                    "1,16,64,256", "--fill", "8", "--steps", "16", "--repeats", "1" if args.quick else "3"],
                   f"step_speed.py --rows-sweep, DECALIGN_CUDNN_ATTENTION={cudnn}", table, timeout=120,
                   env={"DECALIGN_CUDNN_ATTENTION": cudnn})
        print(table.read_text(), flush=True)
    if "join" in steps:  # what a joining request adds to a step: a pass of its own, or within the step's
        table = args.out / "join.txt"
        for rows in ("16", "128"):
            logged([sys.executable, str(scripts / "join_speed.py"), "--model", str(policy), "--rows", rows,
                    "--repeats", "3" if args.quick else "15"], f"join_speed.py --rows {rows}", table, timeout=120)
        print(table.read_text(), flush=True)
    if "load" in steps:  # continuous against grouped and static batching, same load, one run
        report = args.out / "load.txt"
        load = ["--requests", "32", "--clients", "16", "--max-tokens", "8"] if args.quick else \
            ["--requests", "128", "--clients", "64", "--max-tokens", "32", "--time-limit", "150",
             "--max-batch", args.max_batch]
        logged([sys.executable, str(scripts / "load_test.py"), "--model", str(policy), *load], "load_test.py",
               report, timeout=540)  # three servers, --time-limit each
        print(report.read_text()[-6000:], flush=True)
    if "cold" in steps:  # CoLD's decode cost against greedy with the same (random) adapter
        table = args.out / "cold.md"
        cold_args = ["--batch-sizes", "1,8", "--new-tokens", "16" if args.quick else "64", "--repeats",
                     "1" if args.quick else "3", "--free-tokens", "16" if args.quick else "64"]
        if decalign("bench-cold", "--model", str(policy), *cold_args, log=table, timeout=200):
            print(table.read_text(), flush=True)
    if not steps & {"search", "latency"}:
        return
    count, tokens = (6, 16) if args.quick else (48, 96)
    prompts = write_prompts(args.work / "prompts.jsonl", count)
    value = args.work / "value"
    common = ["--model", str(policy), "--reward", "sentiment", "--max-new-tokens", str(tokens)]
    if not decalign("train-value", str(prompts), "-o", str(value), "--n", "4" if args.quick else "8",
                    *common, log=log, timeout=150):
        print(log.read_text()[-3000:])
        return
    shutil.copy(value / "value.json", args.out / "value.json")
    methods = f"greedy,bon:n=8,cards:value={value},cards:value={value}:segmentation=fixed:max_segment=16"
    runs = {"search": ["--frontier"], "latency": ["--batch-size", "1", "--limit", "2" if args.quick else "8"]}
    for name, extra in runs.items():
        if name not in steps:
            continue
        run = args.work / name
        if decalign("bench", "-m", methods if name == "search" else methods.replace("greedy,", ""), "--prompts",
                    str(prompts), "--out", str(run), *common, *extra, log=log, timeout=200):
            shutil.copy(run / "summary.md", args.out / f"{name}.md")
            print((run / "summary.md").read_text(), flush=True)
        else:
            print(log.read_text()[-3000:])


if __name__ == "__main__":
    main()
