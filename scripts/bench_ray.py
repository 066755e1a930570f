"""Throughput of `decalign generate --input` in one process and on Ray with 1 and 2 replicas, side by side.

    python scripts/bench_ray.py PROMPTS.jsonl [--limit 64] [--repeats 1] [-- extra generate options]

Each run is a fresh `decalign generate` process on a fresh output file, so the times include what a
user waits for: loading the model (and starting Ray and its actors). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("prompts")
    parser.add_argument("--limit", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("extra", nargs="*", help="options for decalign generate")
    args = parser.parse_args()
    extra = args.extra or ["--method", "bon", "--n", "4", "--reward", "harmless", "--max-new-tokens", "48",
                           "--seed", "0", "--batch-size", "8"]
    with tempfile.TemporaryDirectory() as work:
        source = Path(work) / "in.jsonl"
        lines = [line for line in Path(args.prompts).read_text().splitlines() if line.strip()][:args.limit]
        source.write_text("".join(json.dumps({"id": i, **json.loads(line)}) + "\n" for i, line in enumerate(lines)))
        setups = {"one process": [], "ray, 1 replica": ["--ray", "--replicas", "1"],
                  "ray, 2 replicas": ["--ray", "--replicas", "2"]}
        times: dict[str, list[float]] = {name: [] for name in setups}
        for repeat in range(args.repeats):
            for name, flags in setups.items():
                out = Path(work) / f"out-{repeat}-{len(times[name])}-{name.replace(' ', '_').replace(',', '')}.jsonl"
                start = time.perf_counter()
                subprocess.run([sys.executable, "-m", "decalign.cli", "generate", "--input", str(source), "--output", str(out), *extra, *flags],
                               check=True, stderr=subprocess.DEVNULL)
                times[name].append(time.perf_counter() - start)
                assert sum(1 for _ in out.open()) == len(lines), name
        base = statistics.median(times["one process"])
        print(f"{len(lines)} prompts, `decalign generate {' '.join(extra)}`, median of {args.repeats}\n")
        print("| path | seconds | prompts/s | vs one process |\n|---|---|---|---|")
        for name, values in times.items():
            seconds = statistics.median(values)
            print(f"| {name} | {seconds:.1f} | {len(lines) / seconds:.2f} | {base / seconds:.2f}x |")


if __name__ == "__main__":
    sys.exit(main())
