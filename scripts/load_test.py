"""Load test for `decalign serve` on servers it starts on loopback, bounded in requests and time.

For each batching mode (continuous, grouped and static by default, side by side in one run) it starts a
server on a free 127.0.0.1 port, measures an idle server's time to first token, then runs
--clients concurrent clients that send --requests requests in all: a mix of methods (greedy,
sampling, Best-of-N, CARDS, blockwise search, SMC), some four times longer, some streamed, some whose client hangs up
mid-answer, some with bad bodies; every kind cycles through the same prompts, and each client keeps
one HTTP client, as an SDK does. It reports throughput, p50/p95 latency per method, a greedy time to
first token (loaded over idle prompt by prompt, and the server's own share), status codes, the server's memory before (after one request of every kind), at peak and
after each of --rounds rounds of the same load (on a GPU also its allocator's device memory, from
/metrics), whether any response or log line held a
traceback, and what the server's /metrics saw (its steps, their mean cost, the mean wait in the
queue before joining). The latency, status and server figures are the first round's. With
--adapters K, the servers also serve K random LoRA adapters by name (`--adapter NAME=PATH`) and
the requests' `model` cycles through the served model and them (every answer is checked to name
the model asked for).

    python scripts/load_test.py --requests 128 --clients 64 --max-tokens 32
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

MIX = [
    {"method": "greedy"},
    {"method": "sample", "temperature": 0.8},
    {"method": "bon", "n": 4},
    {"method": "cards", "tau_u": 2.0, "proposals": 2},
    {"method": "blockwise", "budget": 4, "block": 8},
    {"method": "smc", "budget": 4, "block": 8},
]
LONG = {"method": "greedy"}  # every 8th request: 4x the tokens, the kind that holds a static batch back
BAD_BODIES = [{"max_tokens": -1}, {"alignment": {"method": "nope"}}, {"messages": []}, {"n": 0},
              {"alignment": {"method": "smc", "ess_threshold": 2}}]
PROMPTS = ["How do I make friends in a new city?", "Write a haiku about rain.", "Explain what a budget is.",
           "How can I be more patient?", "What is a good way to learn to cook?", "Say something kind."]


def prompt_of(i: int) -> int:
    """Request i's prompt: every kind of request (i modulo the mix) cycles through all the prompts."""
    return (i // len(MIX)) % len(PROMPTS)


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


def quantile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, int(q * len(values)))]


class Server:
    """A `decalign serve` subprocess on a free loopback port, its log in a temporary file."""

    def __init__(self, args: argparse.Namespace, mode: str) -> None:
        port = free_port()
        order, _, join = mode.partition("+")
        batching, _, admission = order.partition("/")
        command = [sys.executable, "-m", "decalign.cli", "serve", "--port", str(port),
                   "--reward", "sentiment", "--queue-size", str(args.queue_size), "--max-batch",
                   str(args.max_batch), "--batching", batching,
                   "--admission", admission or ("shortest" if batching == "continuous" else "arrival"),
                   "--join", join or "in-step"]
        for option, value in (("--model", args.model), ("--max-join-tokens", args.max_join_tokens),
                              ("--max-rows", args.max_rows)):  # left out: the server's own default
            if value is not None:
                command += [option, str(value)]
        for name, folder in args.adapter_folders.items():
            command += ["--adapter", f"{name}={folder}"]
        self.log = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen(command, stderr=self.log, stdout=self.log)
        self.url = f"http://127.0.0.1:{port}"
        for _ in range(600):
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                if self.process.poll() is not None:  # it exited: its last line says why
                    break
                time.sleep(0.5)
        self.process.kill()
        self.log.seek(0)
        said = [line for line in self.log.read().splitlines() if line.strip()]
        sys.exit("load_test: the server did not start" + (f": {said[-1]}" if said else ""))

    def memory(self) -> float:
        return rss_mib(self.process.pid)

    def stop(self) -> str:
        self.process.terminate()
        self.process.wait(timeout=30)
        self.log.seek(0)
        return self.log.read()


def first_token_seconds(client: httpx.Client, url: str, body: dict, timeout: float,
                        hang_up: bool = False) -> tuple[int, float, bool]:
    """Stream `body`; return (status, seconds to the first content, whether an error body came)."""
    started, first, error = time.perf_counter(), None, False
    with client.stream("POST", url + "/v1/chat/completions", json={**body, "stream": True}, timeout=timeout) as reply:
        if reply.status_code != 200:
            reply.read()
            return reply.status_code, float("nan"), "Traceback" in reply.text
        for line in reply.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            error = error or "error" in chunk
            choices = chunk.get("choices") or [{}]
            if first is None and (choices[0].get("delta") or {}).get("content"):
                first = time.perf_counter() - started
                if hang_up:
                    break
    return reply.status_code, float("nan") if first is None else first, error


def run(args: argparse.Namespace, batching: str) -> dict:
    server = Server(args, batching)
    url = server.url
    models = [card["id"] for card in httpx.get(url + "/v1/models", timeout=30).json()["data"]]

    def body(i: int, alignment: dict) -> dict:
        fields = {"messages": [{"role": "user", "content": PROMPTS[prompt_of(i)]}], "max_tokens": args.max_tokens,
                  "seed": i, "alignment": alignment, "model": models[prompt_of(i) % len(models)]}
        if alignment["method"] == "greedy":
            fields["temperature"] = 0
        if alignment is LONG:
            fields["max_tokens"] = 4 * args.max_tokens
        return fields

    # every code path the load will use, once, before the start is measured: what first use loads
    # (a method's code, a reward) stays loaded by design, and is not what "memory returns" asks about
    client = httpx.Client()  # one per client, as an SDK keeps (a new httpx client costs ~25 ms of CPU)
    for alignment in MIX + [LONG]:
        client.post(url + "/v1/chat/completions", json=body(0, alignment), timeout=120)
        first_token_seconds(client, url, body(1, alignment), 120)
    # an idle server's first greedy token for every prompt: the loaded ones are compared prompt by prompt
    # (a model's first text may come tokens later for one prompt than another: a random model's may)
    counted = [histograms(url)]
    idle_first = {prompt_of(i): first_token_seconds(client, url, body(i, MIX[0]), 120)[1]
                  for i in range(0, len(MIX) * len(PROMPTS), len(MIX))}
    client.close()
    counted.append(histograms(url))
    time.sleep(3)  # as after each round: the server hands memory back once idle for a second
    memory_before, device_before = server.memory(), device_memory(url)
    rounds, memory_after_rounds, device_after_rounds = [], [], []
    for _ in range(args.rounds):
        rounds.append(load_round(args, url, body, server, memory_before, models))
        counted.append(histograms(url))
        time.sleep(3)  # the server hands memory back once it has been idle for a second
        memory_after_rounds.append(server.memory())
        device_after_rounds.append(device_memory(url))
    alive = httpx.get(url + "/health", timeout=10).status_code == 200
    log = server.stop()
    latencies, greedy_first, statuses, tracebacks, wall, _, wrong_model = rounds[0]
    peak = max(r[5] for r in rounds)
    everything = [x for values in latencies.values() for x in values]
    answered = sum(len(v) for v in latencies.values())
    return {
        "batching": batching, "requests": args.requests, "clients": args.clients, "max_tokens": args.max_tokens,
        "statuses": statuses, "lost": args.requests - sum(statuses.values()), "wall_s": round(wall, 1),
        "throughput_rps": round(answered / wall, 3),
        "p50_s": round(quantile(everything, 0.5), 2), "p95_s": round(quantile(everything, 0.95), 2),
        "per_method_p50_p95_s": {m: [round(quantile(v, 0.5), 2), round(quantile(v, 0.95), 2)]
                                 for m, v in latencies.items() if v},
        "greedy_first_token_s": {"idle": round(statistics.median(idle_first.values()), 3),
                                 "under_load_p50": round(quantile([t for _, t in greedy_first], 0.5), 3),
                                 **first_token_ratios(greedy_first, idle_first, args.clients)},
        "server": server_side(*counted[1:3]),
        "server_idle_greedy_first_token_s_mean": server_side(*counted[:2])["greedy_first_token_s_mean"],
        "memory_mib": {"before": round(memory_before), "peak": round(peak),
                       "after": [round(m) for m in memory_after_rounds]},
        **({"device_memory_mib": {"before": round(device_before["reserved"]),
                                  "peak": round(device_after_rounds[-1]["peak_reserved"]),
                                  "after": [round(d["reserved"]) for d in device_after_rounds]}}
           if device_before else {}),
        "tracebacks": tracebacks + sum(r[3] for r in rounds[1:]) + log.count("Traceback"), "server_alive": alive,
        **({"models": models, "answers_naming_another_model": sum(r[6] for r in rounds)} if len(models) > 1 else {}),
    }


def first_token_ratios(greedy_first: list[tuple[int, float]], idle_first: dict[int, float],
                       clients: int) -> dict[str, float]:
    """Loaded over idle first-token times, prompt by prompt: p50 and p95 of all, and p50 of those sent
    after the opening wave (the first request of every client, which all arrive at once)."""
    ratios = [(i, t / idle_first[prompt_of(i)]) for i, t in greedy_first]
    return {"ratio_to_idle_p50": round(quantile([r for _, r in ratios], 0.5), 2),
            "ratio_to_idle_p95": round(quantile([r for _, r in ratios], 0.95), 2),
            "ratio_to_idle_p50_after_opening": round(quantile([r for i, r in ratios if i >= clients], 0.5), 2)}


def scrape(url: str) -> dict[str, float]:
    """The server's decalign_ series (`/metrics`): name with labels -> value."""
    text = httpx.get(url + "/metrics", timeout=30).text
    return {name: float(value) for name, value in (line.split() for line in text.splitlines()
                                                     if line.startswith("decalign_"))}


def histograms(url: str) -> dict[str, float]:
    """The server's histogram sums and counts, to difference across a round."""
    return {name: value for name, value in scrape(url).items() if name.partition("{")[0].endswith(("_sum", "_count"))}


def device_memory(url: str) -> dict[str, float]:
    """The GPU memory of the server's torch allocator in MiB, by kind (allocated, reserved,
    peak_reserved); empty for a server on CPU."""
    prefix = 'decalign_device_memory_bytes{kind="'
    return {name[len(prefix):].partition('"')[0]: value / 2**20
            for name, value in scrape(url).items() if name.startswith(prefix)}


def server_side(before: dict[str, float], after: dict[str, float]) -> dict:
    """What the server saw of the first round: its steps and their mean, the mean wait in the queue
    before joining, and for greedy requests that wait and the time to their first text (the rest
    of a client's first token is HTTP)."""
    def delta(name: str, method: str | None = None) -> float:  # summed over methods unless one is named
        keys = {k for k in (*before, *after) if k == name or k.startswith(name + "{")}
        if method is not None:
            keys = {k for k in keys if f'method="{method}"' in k}
        return sum(after.get(k, 0.0) - before.get(k, 0.0) for k in keys)

    def mean(name: str, method: str | None = None) -> float | None:
        count = delta(name + "_count", method)
        return round(delta(name + "_sum", method) / count, 3) if count else None

    steps = delta("decalign_step_seconds_count")
    return {"steps": int(steps), "step_ms_mean": round(1000 * delta("decalign_step_seconds_sum") / steps, 1) if steps else None,
            "queue_s_mean": mean("decalign_request_queue_seconds"),
            "greedy_queue_s_mean": mean("decalign_request_queue_seconds", "greedy"),
            "greedy_first_token_s_mean": mean("decalign_time_to_first_token_seconds", "greedy")}


def load_round(args: argparse.Namespace, url: str, body, server: Server, memory_before: float,
               models: list[str]) -> tuple:
    """One round of the load: (latencies by kind, greedy first-token times, statuses, tracebacks in
    responses, wall seconds, peak memory, answers naming another model than asked); the figures
    above describe the first round."""
    counter = itertools.count()
    lock = threading.Lock()
    latencies: dict[str, list[float]] = {m["method"]: [] for m in MIX} | {"long greedy": []}
    greedy_first: list[tuple[int, float]] = []  # (request, seconds)
    statuses: dict[str, int] = {}
    tracebacks, wrong_model = [0], [0]
    peak = [memory_before]
    deadline = time.monotonic() + args.time_limit

    def client() -> None:
        with httpx.Client() as session:  # its connections kept between requests, as an SDK's
            requests(session)

    def requests(session: httpx.Client) -> None:
        while time.monotonic() < deadline:
            i = next(counter)
            if i >= args.requests:
                return
            alignment = LONG if i % 8 == 5 else MIX[i % len(MIX)]
            started = time.perf_counter()
            kind = "long greedy" if alignment is LONG else alignment["method"]
            try:
                if i % 16 == 7:  # a bad body: a 4xx with OpenAI's error JSON
                    kind = "bad body"
                    reply = session.post(url + "/v1/chat/completions", timeout=args.time_limit,
                                       json={**body(i, MIX[0]), **BAD_BODIES[i % len(BAD_BODIES)]})
                    status = str(reply.status_code)
                    tracebacks[0] += "Traceback" in reply.text or "error" not in reply.json()
                elif i % 10 == 3:  # a client that hangs up after its first text
                    kind = "hung up"
                    code, _, error = first_token_seconds(session, url, body(i, alignment), args.time_limit, hang_up=True)
                    status = f"{code} (hung up)"
                elif i % 3 == 0:  # streamed
                    code, first, error = first_token_seconds(session, url, body(i, alignment), args.time_limit)
                    status, tracebacks[0] = str(code), tracebacks[0] + error
                    if alignment["method"] == "greedy" and code == 200:
                        with lock:
                            greedy_first.append((i, first))
                else:
                    sent = body(i, alignment)
                    reply = session.post(url + "/v1/chat/completions", json=sent, timeout=args.time_limit)
                    status = str(reply.status_code)
                    tracebacks[0] += "Traceback" in reply.text
                    if reply.status_code == 200 and len(models) > 1:
                        wrong_model[0] += reply.json()["model"] != sent["model"]
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            with lock:
                statuses[status] = statuses.get(status, 0) + 1
                if status == "200" and kind in latencies:
                    latencies[kind].append(time.perf_counter() - started)
                peak[0] = max(peak[0], server.memory())

    started = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(args.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, greedy_first, statuses, tracebacks[0], time.perf_counter() - started, peak[0], wrong_model[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model for the started servers")
    parser.add_argument("--batching", default="continuous,grouped,static",
                        help="modes to run, side by side: continuous, grouped (the scheduler before continuous "
                             "batching: waves of one decoding) or static (waves of any mix), optionally /shortest "
                             "or /arrival (admission order; default shortest for continuous, arrival for the "
                             "others, as they were), then optionally +own-pass or +in-step (how a request joins "
                             "the running batch; default in-step)")
    parser.add_argument("--requests", type=int, default=128)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--time-limit", type=float, default=900.0, help="seconds; clients stop after it")
    parser.add_argument("--queue-size", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=64)
    parser.add_argument("--max-join-tokens", type=int, default=None,
                        help="the servers' prompt tokens joining at one step (default: serve's)")
    parser.add_argument("--max-rows", type=int, default=None, help="the servers' cap on live rows (default: serve's)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of the same load on one server: memory after each tells a leak from warm-up")
    parser.add_argument("--adapters", type=int, default=0,
                        help="random LoRA adapters the servers serve by name beside the model (requests cycle "
                             "through them); made once under --adapter-dir")
    parser.add_argument("--adapter-dir", default="adapter-speed", help="folder for the random adapters")
    args = parser.parse_args()
    if args.rounds < 1:
        sys.exit("load_test: --rounds must be at least 1")
    args.adapter_folders = {}
    if args.adapters > 0:
        from adapter_speed import make_adapter  # scripts/ is on the path when this file runs

        from decalign.models import resolve_model_path

        model = resolve_model_path(args.model)
        args.adapter_folders = {f"a{i}": make_adapter(model, Path(args.adapter_dir) / f"a{i}", seed=i)
                                for i in range(args.adapters)}
    reports = []
    for mode in args.batching.split(","):
        reports.append(run(args, mode.strip()))
        print(f"{mode.strip()}: " + json.dumps(reports[-1]), file=sys.stderr, flush=True)  # kept if a later mode is cut
    print(json.dumps(reports, indent=2))


if __name__ == "__main__":
    main()
