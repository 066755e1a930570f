"""Load test for `decalign serve`, loopback only, bounded in requests and time.

Starts a server on a free 127.0.0.1 port (or uses --url, which must be loopback), then runs
--clients concurrent clients that send --requests requests in all, a mix of greedy, Best-of-N and
CARDS, and reports throughput, p50/p95 latency, status codes and the server's memory before,
at peak and after.

    python scripts/load_test.py --requests 96 --clients 32 --max-tokens 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import httpx

MIX = [
    {"method": "greedy"},
    {"method": "bon", "n": 4},
    {"method": "cards", "tau_u": 2.0, "proposals": 2},
]
PROMPTS = ["How do I make friends in a new city?", "Write a haiku about rain.", "Explain what a budget is.",
           "How can I be more patient?", "What is a good way to learn to cook?", "Say something kind."]


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running server (loopback only); default: start one")
    parser.add_argument("--model", default=None, help="model for the started server")
    parser.add_argument("--requests", type=int, default=96)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds; clients stop after it")
    parser.add_argument("--queue-size", type=int, default=64)
    args = parser.parse_args()

    server = None
    if args.url:
        if urlparse(args.url).hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit("load_test: --url must be a loopback address")
        url = args.url.rstrip("/")
    else:
        port = free_port()
        command = [os.path.join(os.path.dirname(sys.executable), "decalign"), "serve", "--port", str(port),
                   "--reward", "sentiment", "--queue-size", str(args.queue_size), "--max-batch", "16"]
        if args.model:
            command += ["--model", args.model]
        server = subprocess.Popen(command, stderr=subprocess.DEVNULL)
        url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.5)
        else:
            server.kill()
            sys.exit("load_test: the server did not start")

    def ask(body: dict) -> httpx.Response:
        return httpx.post(url + "/v1/chat/completions", json=body, timeout=args.time_limit)

    ask({"messages": [{"role": "user", "content": "warm up"}], "max_tokens": 4})  # first-call costs out of the way
    memory_before = rss_mib(server.pid) if server else float("nan")
    counter = itertools.count()
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {m["method"]: [] for m in MIX}
    statuses: dict[str, int] = {}
    peak = [memory_before]
    deadline = time.monotonic() + args.time_limit

    def client() -> None:
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= args.requests:
                return
            alignment = MIX[i % len(MIX)]
            body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                    "max_tokens": args.max_tokens, "seed": i, "alignment": alignment}
            started = time.perf_counter()
            try:
                status = str(ask(body).status_code)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200":
                    latencies[alignment["method"]].append(time.perf_counter() - started)
                if server:
                    peak[0] = max(peak[0], rss_mib(server.pid))

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    time.sleep(2)
    memory_after = rss_mib(server.pid) if server else float("nan")
    alive = httpx.get(url + "/health", timeout=10).status_code == 200
    everything = sorted(x for values in latencies.values() for x in values)

    def quantile(values: list[float], q: float) -> float:
        return statistics.quantiles(values, n=100)[int(q * 100) - 1] if len(values) > 1 else float("nan")

    report = {
        "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "answered": sum(statuses.values()), "statuses": statuses, "wall_s": round(wall, 1),
        "throughput_rps": round(statuses.get("200", 0) / wall, 3),
        "p50_s": round(quantile(everything, 0.5), 2), "p95_s": round(quantile(everything, 0.95), 2),
        "per_method_p50_s": {m: round(statistics.median(v), 2) for m, v in latencies.items() if v},
        "memory_mib": {"before": round(memory_before), "peak": round(peak[0]), "after": round(memory_after)},
        "server_alive": alive,
    }
    print(json.dumps(report, indent=2))
    if server:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
