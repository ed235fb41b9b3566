"""Load test of `lamda-edge serve`: N concurrent clients x M requests each, on loopback.

Usage:
    python tools/bench_serve.py --model runs/demo-onnx --clients 16 --requests 32 [--max-tokens 16]
        [--time-limit 900] [--serve-arg=--queue=64 ...] [--json results.json]

It starts the server as a subprocess (so that its RSS can be read), waits for /health, then runs the clients: each a
thread sending streamed chat completions one after another (temperature 0, word problems in turn, usage included),
until it has sent M or the time limit is reached. A 429 is counted and the client waits its Retry-After. Printed
(and written with --json): requests/s, completion tokens/s (the server's usage counts), p50/p95/p99 time to first
token and latency, errors by status, and the server's RSS before the first request, at the 100th, and after the last.
The server is stopped with SIGTERM at the end (or under load, with --sigterm-at) and its exit code reported.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

PROMPTS = [
    "Sara has 5 bags with 8 apples in each bag. She eats 6 apples. How many apples does she have now?",
    "Tom has 3 boxes of 12 pencils. He gives away 7 pencils. How many pencils does he have left?",
    "A train travels 60 km per hour for 3 hours. How far does it travel?",
    "Mia buys 4 books at 9 dollars each and pays with 50 dollars. How much change does she get?",
]
REPO = Path(__file__).resolve().parents[1]


def percentile(values: list[float], q: float) -> float | None:
    """The q-th percentile (nearest rank) of `values`; None when there are none."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * len(ordered) + 0.5) - 1))]


def rss(pid: int) -> int:
    import psutil

    return psutil.Process(pid).memory_info().rss


def one_request(httpx2, url: str, body: dict) -> dict:
    """One streamed chat completion: status, time to first token, latency, completion tokens."""
    t0 = time.perf_counter()
    row = {"status": None, "ttft_s": None, "latency_s": None, "tokens": 0, "retry_after": None}
    try:
        with httpx2.stream("POST", f"{url}/v1/chat/completions", content=json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"}, timeout=600) as r:
            row["status"] = r.status_code
            if r.status_code != 200:
                r.read()
                row["retry_after"] = r.headers.get("Retry-After")
                return row
            for line in r.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if "error" in data:
                    row["status"] = f"stream-error:{data['error'].get('code')}"
                    return row
                if data.get("usage"):
                    row["tokens"] = data["usage"]["completion_tokens"]
                elif row["ttft_s"] is None and data["choices"] and data["choices"][0]["delta"].get("content"):
                    row["ttft_s"] = time.perf_counter() - t0
    except httpx2.HTTPError as exc:
        row["status"] = f"{type(exc).__name__}"
        return row
    row["latency_s"] = time.perf_counter() - t0
    return row


def run(args) -> dict:
    import httpx2

    port = args.port or _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = open(args.server_log, "w") if args.server_log else subprocess.DEVNULL
    server = subprocess.Popen([sys.executable, "-m", "lamda_edge.cli", "serve", "--model", str(args.model),
                               "--port", str(port), "--model-name", "bench", "--log-level", "warning",
                               *args.serve_arg], cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while not _up(httpx2, url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the server did not start (exit {server.poll()}); see --server-log")
            time.sleep(0.2)
        health = httpx2.get(f"{url}/health", timeout=10).json()
        rows, lock, memory = [], threading.Lock(), {"rss_before": rss(server.pid), "rss_at_100": None}
        stop_at = time.monotonic() + args.time_limit

        def client(k: int) -> None:
            for i in range(args.requests):
                if time.monotonic() > stop_at:
                    return
                body = {"model": "bench", "messages": [{"role": "user", "content": PROMPTS[(k + i) % len(PROMPTS)]}],
                        "max_tokens": args.max_tokens, "temperature": 0, "stream": True,
                        "stream_options": {"include_usage": True}}
                row = one_request(httpx2, url, body)
                with lock:
                    rows.append(row)
                    if len(rows) == 100:
                        memory["rss_at_100"] = rss(server.pid)
                    if len(rows) == args.sigterm_at:
                        memory["rss_after"] = rss(server.pid)
                        server.send_signal(signal.SIGTERM)
                if args.sigterm_at and row["status"] in (503, "ConnectError"):
                    return  # the server is draining or gone: this client stops
                if row["status"] == 429:
                    time.sleep(float(row["retry_after"] or 1))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(args.clients)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
        if not args.sigterm_at:
            memory["rss_after"] = rss(server.pid)
    finally:
        if not args.sigterm_at or len(rows) < args.sigterm_at:
            server.send_signal(signal.SIGTERM)
        try:
            exit_code = server.wait(timeout=120)
        except subprocess.TimeoutExpired:
            server.kill()
            exit_code = "killed"
    ok = [r for r in rows if r["status"] == 200]
    statuses = Counter(str(r["status"]) for r in rows)
    growth = (memory["rss_after"] / memory["rss_at_100"] - 1) if memory["rss_at_100"] else None
    return {
        "model": str(args.model), "graph": health["graph"], "clients": args.clients, "requests": len(rows),
        "max_tokens": args.max_tokens, "wall_s": wall, "requests_per_s": len(ok) / wall,
        "tokens_per_s": sum(r["tokens"] for r in ok) / wall, "completion_tokens": sum(r["tokens"] for r in ok),
        **{f"ttft_p{q}_s": percentile([r["ttft_s"] for r in ok if r["ttft_s"] is not None], q) for q in (50, 95, 99)},
        **{f"latency_p{q}_s": percentile([r["latency_s"] for r in ok], q) for q in (50, 95, 99)},
        "statuses": dict(statuses), "errors_other_than_429": sum(n for s, n in statuses.items() if s not in
                                                                 ("200", "429")),
        **memory, "rss_growth_from_100th": growth, "server_exit_code": exit_code,
        "load_average": os.getloadavg(),
    }


def report(result: dict) -> str:
    def ms(key):
        return "-" if result[key] is None else f"{result[key] * 1e3:.0f}"

    mib = {k: "-" if result[k] is None else f"{result[k] / 2**20:.1f}" for k in ("rss_before", "rss_at_100",
                                                                                   "rss_after")}
    growth = "-" if result["rss_growth_from_100th"] is None else f"{result['rss_growth_from_100th'] * 100:+.2f}%"
    return "\n".join([
        f"{result['clients']} clients, {result['requests']} requests ({result['graph']}, max_tokens "
        f"{result['max_tokens']}) in {result['wall_s']:.1f} s",
        f"  {result['requests_per_s']:.2f} requests/s, {result['tokens_per_s']:.1f} completion tokens/s",
        f"  time to first token p50/p95/p99: {ms('ttft_p50_s')} / {ms('ttft_p95_s')} / {ms('ttft_p99_s')} ms",
        f"  latency p50/p95/p99: {ms('latency_p50_s')} / {ms('latency_p95_s')} / {ms('latency_p99_s')} ms",
        f"  statuses: {result['statuses']}; errors other than 429: {result['errors_other_than_429']}",
        f"  server RSS before / at the 100th / after: {mib['rss_before']} / {mib['rss_at_100']} / "
        f"{mib['rss_after']} MiB ({growth} from the 100th); exit code after SIGTERM: {result['server_exit_code']}",
        f"  load average (1/5/15 min) at the end: {' '.join(f'{x:.2f}' for x in result['load_average'])}",
    ])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _up(httpx2, url: str) -> bool:
    try:
        return httpx2.get(f"{url}/health", timeout=2).status_code == 200
    except httpx2.HTTPError:
        return False


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, type=Path, help="an export folder (`lamda-edge export --output`)")
    p.add_argument("--clients", type=int, default=4, help="concurrent clients")
    p.add_argument("--requests", type=int, default=25, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of each request")
    p.add_argument("--time-limit", type=float, default=900, help="seconds after which clients send no more")
    p.add_argument("--port", type=int, default=0, help="server port (default: a free one)")
    p.add_argument("--serve-arg", action="append", default=[], help="an extra `lamda-edge serve` argument "
                   "(repeat; e.g. --serve-arg=--queue=64)")
    p.add_argument("--sigterm-at", type=int, default=0, help="send the server SIGTERM when this many requests "
                   "are done, under load (the drain test): the requests in flight should complete, later ones get "
                   "503 or a refused connection, and the server exit 0")
    p.add_argument("--server-log", help="write the server's output here")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args(argv)
    result = run(args)
    print(report(result))
    if args.json:
        from lamda_edge.atomic import write_atomic

        write_atomic(args.json, lambda tmp: Path(tmp).write_text(json.dumps(result, indent=2) + "\n"))
    clean = result["errors_other_than_429"] == 0 or args.sigterm_at and set(result["statuses"]) <= {
        "200", "429", "503", "ConnectError"}
    return 0 if clean and result["server_exit_code"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
