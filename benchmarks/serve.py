"""Serving throughput and latency: N concurrent streaming clients against `lamina serve smollm2`.

The server runs as its own process (``python -m lamina serve``); every client runs in this one asyncio
process beside it (httpx, streaming ``/v1/completions``, greedy, ``ignore_eos`` so every request makes
exactly ``--tokens`` tokens). For N = 1, 4, 16 clients, each sending ``--requests`` requests one after
another, it reports total generated tokens/s, time to first token (TTFT) and inter-token latency (ITL)
percentiles, and the ratio of N clients' tokens/s to 1 client's (the reference, measured in the same run).
Target: 16 clients >= 4x the tokens/s of 1 client. Ends with its ``headline:`` lines (see common.py).

The shared-system-prompt case (prefix caching, on by default in ``lamina serve``): one client sends
requests whose prompt is the same ~500-token system prompt followed by a short question, one at a time.
Uncached, each prompt starts with a different request number (so no cached block matches: the whole
prompt is prefilled); cached, the same system prompt comes first (its blocks were stored by the first
request). Target: TTFT on a cache hit under a fifth of the uncached TTFT (uncached / cached >= 5x).

Memory: the server's resident set (RSS, /proc) when idle with the model loaded (after one warm-up
request) and its peak while the client counts run (the kernel's high-water mark, reset at idle), against
the KV cache the largest count's clients need (layers x 2 x kv_heads x head_dim x (prompt + generated)
tokens x the bytes of the engine's KV dtype, summed over one request per client: ``KV_BYTES``). Target: the growth from idle to that peak at most
1.5x that KV (headline: 1.5 KV / growth >= 1x). RSS does not depend on timing, so it holds under load.
The server runs under ``lamina serve``'s glibc malloc policy (``lamina.malloc``, ``release``) unless this
process's environment sets malloc itself (``MALLOC_*``, ``GLIBC_TUNABLES``, ``LD_PRELOAD``, ``LAMINA_MALLOC=off``).

Both processes share the machine's cores, so the CPU seconds of each are reported (the client's share is
the part of the machine this process took from the server), with the load average.

    python benchmarks/serve.py [--clients 1,4,16] [--tokens 64] [--requests 2] [--threads 2]
    python benchmarks/serve.py --quick      # 16 tokens, 1 request per client, 3 system-prompt requests
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import httpx
from common import headline, machine

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "import numpy as np\n",
    "My favourite fruit is",
    "Water boils at",
    "The quick brown fox",
    "In 1969, astronauts",
    "To make a cup of tea,",
    "The largest planet in the solar system is",
    "SELECT name FROM users WHERE",
    "Dear Sir or Madam,",
    "The French word for cat is",
    "1, 2, 3, 4,",
    "A haiku about autumn:",
]


SYSTEM = (
    "You are Lamina, a careful and friendly assistant for a small software company. Answer questions about "
    "the company's products, its open-source libraries and its support policies. Be concise: one or two "
    "short paragraphs unless the user asks for more. When you are not sure, say so and suggest where the "
    "user may find the answer. Never invent version numbers, prices or dates. Write code in Python unless "
    "the user asks for another language, and explain what the code does in a sentence before it. "
) * 5  # about 500 tokens with SmolLM2's tokenizer (the run prints the count)
QUESTIONS = ["How do I install the library?", "What is your refund policy?", "Can you write a sort?"]


# bytes of one KV element per --weights: the engine keeps keys and values in the embedding's dtype after
# the conversion (bf16 activations for bf16, int8 and int4 weights; fp32 for fp32 and w8a8)
KV_BYTES = {"fp32": 4, "bf16": 2, "int8": 2, "int4": 2, "w8a8": 4}


@dataclass
class Run:
    """What one client count gave."""

    clients: int
    wall: float = 0.0
    tokens: int = 0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    client_cpu: float = 0.0
    server_cpu: float = 0.0
    peak_batch: float = 0.0
    kv_storage: float = 0.0  # the server's largest batch KV cache storage so far, MiB (/metrics)
    request_tokens: list[int] = field(default_factory=list)  # prompt + generated tokens of each request

    @property
    def rate(self) -> float:
        return self.tokens / self.wall


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) of values, in milliseconds."""
    if not values:
        return float("nan")
    s = sorted(values)
    return 1000 * s[min(len(s) - 1, round(q / 100 * (len(s) - 1)))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_mib(pid: int, key: str = "VmRSS") -> float:
    """A process's resident set now (``VmRSS``) or its peak since the last ``reset_peak`` (``VmHWM``),
    in MiB (Linux /proc)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise SystemExit(f"/proc/{pid}/status has no {key}")


def reset_peak(pid: int) -> None:
    """Reset the kernel's RSS high-water mark (``VmHWM``) of a process to its RSS now (Linux >= 4.0)."""
    with open(f"/proc/{pid}/clear_refs", "w") as f:
        f.write("5")


def kv_bytes_per_token(model: str = "smollm2", dtype_bytes: int = 4) -> int:
    """Bytes of K and V one token takes in every layer of ``model`` (its config, weights not read)."""
    from lamina.checkpoint.gguf import gguf_to_hf, read_gguf
    from lamina.checkpoint.hf import config_from_hf
    from lamina.checkpoint.registry import resolve

    hf, _ = gguf_to_hf(read_gguf(resolve(model).path))
    cfg = config_from_hf(hf)
    assert cfg.n_kv_heads is not None and cfg.head_dim is not None
    return cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * dtype_bytes


def load_avg() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


async def stream_one(client: httpx.AsyncClient, prompt: str, tokens: int, run: Run) -> None:
    """One streaming request; records TTFT, the gaps between tokens, and the tokens made."""
    body = {
        "model": "smollm2",
        "prompt": prompt,
        "max_tokens": tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    async for chunk in sse_chunks(client, body):
        now = time.perf_counter()
        if chunk.get("usage"):
            run.tokens += chunk["usage"]["completion_tokens"]
            run.request_tokens.append(chunk["usage"]["total_tokens"])
        if chunk["choices"] and chunk["choices"][0]["text"]:
            if last is None:
                run.ttft.append(now - start)
            else:
                run.itl.append(now - last)
            last = now


async def sse_chunks(client: httpx.AsyncClient, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
    """The parsed chunks of one streamed /v1/completions request, as they arrive."""
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def first_token(client: httpx.AsyncClient, prompt: str) -> tuple[float, int]:
    """TTFT in seconds of one streaming request (2 tokens) and its prompt tokens."""
    body = {"model": "smollm2", "prompt": prompt, "max_tokens": 2, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    start, ttft, used = time.perf_counter(), float("nan"), 0
    async for chunk in sse_chunks(client, body):
        if chunk.get("usage"):
            used = chunk["usage"]["prompt_tokens"]
        if chunk["choices"] and chunk["choices"][0]["text"] and ttft != ttft:
            ttft = time.perf_counter() - start
    return ttft, used


async def shared_prompt(url: str, repeats: int) -> tuple[list[float], list[float], int]:
    """TTFTs (s) of ``repeats`` uncached and cached requests with the shared system prompt, in turn
    (round-robin: uncached, cached, uncached, ...), and the prompt's token count."""
    uncached, cached, used = [], [], 0
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        await first_token(client, SYSTEM + "\n\nQuestion: hello\nAnswer:")  # stores the system prompt
        for k in range(repeats):
            q = QUESTIONS[k % len(QUESTIONS)]
            t, used = await first_token(
                client, f"Request {k + 1000}. " + SYSTEM + f"\n\nQuestion: {q}\nAnswer:"
            )
            uncached.append(t)
            t, _ = await first_token(client, SYSTEM + f"\n\nQuestion: {q}\nAnswer:")
            cached.append(t)
    return uncached, cached, used


async def drive(url: str, clients: int, requests: int, tokens: int, server_pid: int) -> Run:
    """``clients`` concurrent clients, each sending ``requests`` streaming requests in turn."""
    run = Run(clients)
    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:

        async def one_client(i: int) -> None:
            for k in range(requests):
                await stream_one(client, PROMPTS[(i + k * clients) % len(PROMPTS)], tokens, run)

        cpu0, scpu0 = time.process_time(), cpu_seconds(server_pid)
        t0 = time.perf_counter()
        await asyncio.gather(*(one_client(i) for i in range(clients)))
        run.wall = time.perf_counter() - t0
        run.client_cpu, run.server_cpu = time.process_time() - cpu0, cpu_seconds(server_pid) - scpu0
        metrics = (await client.get("/metrics")).text
    for line in metrics.splitlines():
        if line.startswith("lamina_running_sequences_max"):
            run.peak_batch = float(line.rsplit(" ", 1)[1])
        if line.startswith("lamina_kv_cache_bytes_max"):
            run.kv_storage = float(line.rsplit(" ", 1)[1]) / 2**20
    return run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", default="1,4,16", help="client counts to run (the first is the reference)")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per request")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    ap.add_argument("--threads", type=int, default=2, help="the server's torch threads")
    ap.add_argument("--max-batch-size", type=int, default=16)
    ap.add_argument(
        "--weights",
        default="fp32",
        choices=["fp32", "bf16", "int8", "int4", "w8a8"],
        help="the server's --weights (issue 23's targets: 16 clients >= 8x 1 client with fp32 and bf16, "
        ">= 5x with the integer formats, whose batch-1 speed is already high)",
    )
    ap.add_argument(
        "--omp-wait-policy",
        default="PASSIVE",
        choices=["PASSIVE", "ACTIVE", "default"],
        help="the server's OMP_WAIT_POLICY (PASSIVE: idle OpenMP threads sleep instead of spinning, which "
        "matters on a machine shared with other jobs; default: leave it unset)",
    )
    ap.add_argument(
        "--system-repeats", type=int, default=8, help="shared-system-prompt requests of each kind"
    )
    ap.add_argument(
        "--pad-shapes",
        default="true",
        choices=["true", "false"],
        help="the server's --pad-shapes (padded batch sizes and prompt lengths: a bounded set of matmul "
        "shapes; false: exact shapes), to compare speed and memory both ways",
    )
    ap.add_argument("--quick", action="store_true", help="16 tokens, 1 request per client")
    args = ap.parse_args()
    if args.quick:
        args.tokens, args.requests, args.system_repeats = 16, 1, 3
    counts = [int(c) for c in args.clients.split(",")]
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "lamina", "serve", "smollm2", "--port", str(port), "--log-level", "warning",
           "--threads", str(args.threads), "--max-batch-size", str(args.max_batch_size),
           "--weights", args.weights, "--pad-shapes", args.pad_shapes]  # fmt: skip
    env = dict(os.environ)
    if args.omp_wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.omp_wait_policy
    server = subprocess.Popen(cmd, env=env)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not start")
            time.sleep(0.5)
        print(f"machine: {machine(args.threads)}; server: `{' '.join(cmd[2:])}`, "
              f"OMP_WAIT_POLICY={env.get('OMP_WAIT_POLICY', 'unset')}")  # fmt: skip
        print(f"SmolLM2-135M {args.weights} weights, greedy, {args.tokens} tokens per request, {args.requests} requests per "
              "client, streaming /v1/completions\n")  # fmt: skip
        loaded_rss = rss_mib(server.pid)
        asyncio.run(drive(url, 1, 1, 8, server.pid))  # warm-up
        idle_rss = rss_mib(server.pid)
        reset_peak(server.pid)
        runs = []
        for n in counts:
            runs.append(asyncio.run(drive(url, n, args.requests, args.tokens, server.pid)))
            print(f"  {n} clients done (load {load_avg()}, RSS {rss_mib(server.pid):.0f} MiB)", flush=True)
        peak_rss = rss_mib(server.pid, "VmHWM")
        uncached, cached, system_tokens = asyncio.run(shared_prompt(url, args.system_repeats))
        print(f"  shared system prompt done (load {load_avg()})", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    ref = runs[0]
    print()
    print("| clients | tokens/s | vs 1 client | TTFT p50 / p90 ms | ITL p50 / p90 / p99 ms | peak batch "
          "| client CPU s (share) | server CPU s |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in runs:
        share = r.client_cpu / max(r.client_cpu + r.server_cpu, 1e-9)
        print(
            f"| {r.clients} | {r.rate:.1f} | **{r.rate / ref.rate:.2f}x** | {pct(r.ttft, 50):.0f} / "
            f"{pct(r.ttft, 90):.0f} | {pct(r.itl, 50):.0f} / {pct(r.itl, 90):.0f} / {pct(r.itl, 99):.0f} | "
            f"{r.peak_batch:.0f} | {r.client_cpu:.1f} ({100 * share:.0f}%) | {r.server_cpu:.1f} |"
        )
    last = runs[-1]
    scale_target = 8 if args.weights in ("fp32", "bf16") else 5
    verdict = "met" if last.rate >= scale_target * ref.rate else "NOT met"
    print(f"\ntarget {last.clients} clients >= {scale_target}x 1 client: {last.rate / ref.rate:.2f}x, {verdict}; "
          f"wall {statistics.fsum(r.wall for r in runs):.0f} s, load average at end {load_avg()}")  # fmt: skip
    u50, c50 = pct(uncached, 50), pct(cached, 50)
    print(f"\nshared system prompt ({system_tokens} prompt tokens, {args.system_repeats} requests each, "
          f"round-robin, 1 client): TTFT p50 uncached {u50:.0f} ms, cached {c50:.0f} ms "
          f"(min {1000 * min(uncached):.0f} / {1000 * min(cached):.0f}); target cached < uncached / 5: "
          f"{'met' if 5 * c50 < u50 else 'NOT met'}")  # fmt: skip
    print(f"TTFT p50 at {last.clients} clients: {pct(last.ttft, 50):.0f} ms")
    kv_token = kv_bytes_per_token(dtype_bytes=KV_BYTES[args.weights])  # the cache's dtype
    kv = kv_token * sum(sorted(last.request_tokens)[-last.clients :]) / 2**20
    growth = peak_rss - idle_rss
    if last.kv_storage and not 0.8 <= last.kv_storage / kv <= 2:  # the storage holds their tokens, ~1x
        print(f"warning: the batch's KV storage ({last.kv_storage:.1f} MiB) is far from the KV computed "
              f"({kv:.1f} MiB): is KV_BYTES[{args.weights!r}] the engine's KV dtype?")  # fmt: skip
    print(f"\nserver RSS: {loaded_rss:.0f} MiB loaded, {idle_rss:.0f} MiB idle after a warm-up request, peak "
          f"{peak_rss:.0f} MiB over the runs; growth {growth:.1f} MiB; KV cache {last.clients} clients need "
          f"{kv:.1f} MiB ({kv_token} bytes a token x {sum(sorted(last.request_tokens)[-last.clients :])} "
          f"tokens; the batch's KV storage peaked at {last.kv_storage:.1f} MiB); growth / KV = {growth / kv:.2f} (target <= 1.5: "
          f"{'met' if growth <= 1.5 * kv else 'NOT met'})")  # fmt: skip
    headline(f"serve {last.clients} clients tokens/s {args.weights}", last.rate / ref.rate, f"{ref.clients} client",
             scale_target)  # fmt: skip
    headline("serve TTFT of a 500-token system prompt, cached", u50 / c50, "uncached", 5)
    headline(f"serve RSS budget (1.5x the KV cache of {last.clients} clients)", 1.5 * kv / max(growth, 1e-9),
             "the RSS growth from idle", 1)  # fmt: skip


if __name__ == "__main__":
    main()
