"""Load test of `omniserve serve` over loopback: a fixed request rate, streaming completions.

Requests arrive open-loop at `--request-rate` per second (evenly spaced, or Poisson with
`--poisson`), each a prompt of `--input-len` random token ids asking for exactly `--output-len`
tokens (EOS ignored), streamed with server-sent events. Per request the client records the time
to the first token (TTFT), the gaps between streamed chunks (ITL; the server sends one chunk per
engine step, which is one token per request in steady decode) and the end-to-end latency.
Reported: request and token throughput over the whole run, and mean/p50/p90/p99 of TTFT, ITL,
TPOT ((e2e - TTFT) / (tokens - 1)) and e2e, as JSON.

With `--model` the script starts the server itself (a subprocess, so client and server do not
share a GIL) and, unless `--no-peer`, runs the same prompts through the offline `Engine.generate`
afterwards as the peer: the ratio shows what the HTTP layer and arrival pattern cost. With `--url`
it drives a server that is already running.

    OMP_NUM_THREADS=1 python benches/serve_load.py --model CKPT --dtype float32 --device cpu \\
        --request-rate 20 --num-requests 200 --input-len 64 --output-len 32 --output-json load.json

`--request-rate inf` sends every request at once (the peer's setting: the ratio is then the cost
of HTTP, SSE and the asyncio hand-off). On a small shared CPU box, set OMP_NUM_THREADS=1 (the
server subprocess inherits it): torch's intra-op threads there cost far more than they give.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec

from omniserve.cli.engine_args import add_engine_args, engine_kwargs


class RequestResult(msgspec.Struct):
    ok: bool
    ttft: float = 0.0
    e2e: float = 0.0
    itl: list[float] = []
    output_tokens: int = 0
    prompt_tokens: int = 0
    error: str | None = None


def percentiles(values: list[float], scale: float = 1000.0) -> dict[str, float | None]:
    """mean/p50/p90/p99 in milliseconds (nearest-rank percentiles)."""
    if not values:
        return {"mean": None, "p50": None, "p90": None, "p99": None}
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered)) - 1))] * scale

    return {
        "mean": sum(ordered) / len(ordered) * scale,
        "p50": rank(0.5),
        "p90": rank(0.9),
        "p99": rank(0.99),
    }


class _Target(msgspec.Struct):
    host: str
    port: int
    headers: bytes
    """Extra request header lines (the API key), each ending in CRLF."""


async def one_request(target: _Target, body: bytes) -> RequestResult:
    """One streaming completion over a raw HTTP/1.1 connection. A plain asyncio stream reader
    instead of an HTTP client library keeps the client's cost per streamed token small: on a
    small machine the load generator shares the cores with the server it measures."""
    start = time.perf_counter()
    try:
        reader, writer = await asyncio.open_connection(target.host, target.port)
    except OSError as exc:
        return RequestResult(False, error=repr(exc))
    first = last = 0.0
    gaps: list[float] = []
    usage: dict[str, int] = {}
    try:
        writer.write(
            b"POST /v1/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n%s\r\n"
            % (target.host.encode(), len(body), target.headers)
            + body
        )
        status = int((await reader.readline()).split()[1])
        while (await reader.readline()) not in (b"\r\n", b""):
            pass  # headers: the body is chunked (SSE) on success, read to EOF otherwise
        if status != 200:
            return RequestResult(False, error=f"HTTP {status}: {(await reader.read())[:200]!r}")
        pending = b""
        while size := int((await reader.readline()).split(b";")[0], 16):
            pending += (await reader.readexactly(size + 2))[:-2]
            now = time.perf_counter()
            *events, pending = pending.split(b"\n\n")
            for event in events:
                if event == b"data: [DONE]":
                    continue
                chunk = msgspec.json.decode(event.removeprefix(b"data: "))
                if "error" in chunk:
                    return RequestResult(False, error=chunk["error"]["message"])
                if chunk.get("usage"):
                    usage = chunk["usage"]
                if not chunk["choices"] or chunk["choices"][0]["finish_reason"] is not None:
                    continue  # the finish and usage chunks carry no new token
                if first == 0.0:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
    except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as exc:
        return RequestResult(False, error=repr(exc))
    finally:
        writer.close()
    end = time.perf_counter()
    return RequestResult(
        True,
        ttft=first - start,
        e2e=end - start,
        itl=gaps,
        output_tokens=usage.get("completion_tokens", 0),
        prompt_tokens=usage.get("prompt_tokens", 0),
    )


async def run_load(
    args: argparse.Namespace, url: str, model: str, prompts: list[list[int]]
) -> dict[str, Any]:
    parts = urllib.parse.urlsplit(url)
    auth = b"Authorization: Bearer %s\r\n" % args.api_key.encode() if args.api_key else b""
    target = _Target(parts.hostname or "127.0.0.1", parts.port or 80, auth)
    rng = random.Random(args.prompt_seed)
    tasks = []
    start = time.perf_counter()
    arrival = 0.0
    for prompt in prompts:
        delay = start + arrival - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        body = {
            "model": model,
            "prompt": prompt,
            "max_tokens": args.output_len,
            "temperature": args.temperature,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        tasks.append(asyncio.create_task(one_request(target, msgspec.json.encode(body))))
        rate = args.request_rate
        arrival += rng.expovariate(rate) if args.poisson else 1.0 / rate
    results = await asyncio.gather(*tasks)
    duration = time.perf_counter() - start
    done = [r for r in results if r.ok]
    out_tokens = sum(r.output_tokens for r in done)
    in_tokens = sum(r.prompt_tokens for r in done)
    return {
        "completed": len(done),
        "failed": len(results) - len(done),
        "errors": sorted({r.error for r in results if r.error})[:5],
        "duration_s": duration,
        "request_throughput": len(done) / duration,
        "output_token_throughput": out_tokens / duration,
        "total_token_throughput": (in_tokens + out_tokens) / duration,
        "ttft_ms": percentiles([r.ttft for r in done]),
        "itl_ms": percentiles([g for r in done for g in r.itl]),
        "tpot_ms": percentiles(
            [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
        ),
        "e2e_ms": percentiles([r.e2e for r in done]),
    }


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _engine_flags(options: dict[str, Any]) -> list[str]:
    flags = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if isinstance(value, bool):
            flags.append(flag if value else "--no-" + name.replace("_", "-"))
        else:
            flags += [flag, str(value)]
    return flags


@contextmanager
def serve(
    args: argparse.Namespace, options: dict[str, Any], extra: Sequence[str] = ()
) -> Iterator[tuple[str, int]]:
    """`omniserve serve` (with `extra` server flags) in a subprocess; yields its base URL and
    process id once /health answers."""
    port = _free_port()
    command = [
        sys.executable, "-m", "omniserve.cli.main", "serve", "--model", args.model,
        "--served-model-name", "bench", "--port", str(port), "--log-level", "warning",
        "--max-queued-requests", "-1", *extra, *_engine_flags(options),
    ]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "OMNISERVE_API_KEY"}
    if args.api_key:
        env["OMNISERVE_API_KEY"] = args.api_key
    process = subprocess.Popen(command, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"the server exited with code {process.returncode}")
            try:
                with urllib.request.urlopen(url + "/health", timeout=1):
                    break  # 200: urlopen raises for error statuses
            except OSError:  # not listening yet (URLError is an OSError)
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the server did not become healthy within 300 s")
            time.sleep(0.2)
        yield url, process.pid
    finally:
        process.send_signal(signal.SIGINT)  # graceful: drain, stop the engine thread
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()


def served_model(url: str, api_key: str | None) -> str:
    """The first model a running server lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    with urllib.request.urlopen(urllib.request.Request(url + "/v1/models", headers=headers)) as r:
        return msgspec.json.decode(r.read())["data"][0]["id"]


def offline_peer(
    args: argparse.Namespace, options: dict[str, Any], prompts: list[list[int]]
) -> dict[str, Any]:
    """The same prompts through `Engine.generate` in this process, all submitted at once."""
    from omniserve.engine.engine import Engine
    from omniserve.sampling_params import SamplingParams

    engine = Engine.from_pretrained(args.model, **options)
    params = SamplingParams(
        max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature
    )
    start = time.perf_counter()
    outputs = engine.generate(prompts, params, use_tqdm=False)
    duration = time.perf_counter() - start
    tokens = sum(o.num_generated_tokens for o in outputs)
    return {
        "system": "Engine.generate (offline, all at once)",
        "duration_s": duration,
        "output_token_throughput": tokens / duration,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    parser.add_argument(
        "--url", help="drive a running server at this base URL (instead of --model)"
    )
    parser.add_argument(
        "--served-model",
        default=None,
        help="model name to send with --url (default: the server's first)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=None,
        help="prompt token id range with --url (default: read from --model)",
    )
    parser.add_argument("--api-key", default=None)
    parser.add_argument(
        "--request-rate", type=float, required=True, help="requests per second (inf: all at once)"
    )
    parser.add_argument(
        "--poisson", action="store_true", help="Poisson arrivals instead of evenly spaced"
    )
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--input-len", type=int, default=64)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument(
        "--prompt-seed", type=int, default=0, help="seed of the prompts and arrivals"
    )
    parser.add_argument(
        "--no-peer", action="store_true", help="skip the offline Engine.generate peer"
    )
    parser.add_argument("--output-json", type=Path, default=None)
    add_engine_args(parser)  # --model and the engine options for the server it starts
    args = parser.parse_args()
    if (args.url is None) == (args.model is None):
        parser.error("give exactly one of --model (start a server) and --url (use a running one)")

    options = engine_kwargs(args)
    if args.model is not None:
        vocab = json.loads((Path(args.model) / "config.json").read_text())["vocab_size"]
    elif args.vocab_size is not None:
        vocab = args.vocab_size
    else:
        parser.error("--url needs --vocab-size")
    rng = random.Random(args.prompt_seed)
    # Stay clear of the low ids where special tokens usually live.
    prompts = [
        [rng.randrange(16, vocab) for _ in range(args.input_len)] for _ in range(args.num_requests)
    ]

    if args.url is not None:
        model = args.served_model or served_model(args.url, args.api_key)
        result = asyncio.run(run_load(args, args.url, model, prompts))
    else:
        with serve(args, options) as (url, _):
            result = asyncio.run(run_load(args, url, "bench", prompts))
    report: dict[str, Any] = {
        "setting": {
            # JSON has no infinity: "inf" means all requests at once.
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "arrivals": "poisson" if args.poisson else "uniform",
            "num_requests": args.num_requests,
            "input_len": args.input_len,
            "output_len": args.output_len,
            "temperature": args.temperature,
            "model": args.model or args.url,
            "engine_options": options,
        },
        "server": result,
    }
    if args.model is not None and not args.no_peer:
        peer = offline_peer(args, options, prompts)
        peer["server_over_peer"] = (
            result["output_token_throughput"] / peer["output_token_throughput"]
        )
        report["peer"] = peer
    text = json.dumps(report, indent=2)
    print(text)
    if args.output_json is not None:
        args.output_json.write_text(text + "\n")
    return 0 if result["failed"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
