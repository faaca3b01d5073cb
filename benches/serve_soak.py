"""Soak test of `omniserve serve`: minutes of mixed, partly hostile traffic, then the books.

Workers (`--concurrency`) send requests back to back until `--minutes` have passed, each of a kind
drawn at random: streamed completions (a quarter of them dropped by the client after a few
chunks), whole completions, chat, and requests the server must refuse (a body past
`--max-request-bytes`, invalid JSON, an unknown field, a stop id outside the vocabulary,
`max_tokens` past the context, a text longer than the context could hold). Every request must end
as its kind says: a complete answer (every stream with its `[DONE]`) or the expected error
status; anything else (a 5xx, a cut connection, a stream without `[DONE]`, a timeout) is *lost*.
Every `--sample-seconds` the server's resident memory and the KV pages in use are sampled; at the
end, once the server is idle, no page may be in use.

    OMP_NUM_THREADS=1 python benches/serve_soak.py --minutes 10 --output-json soak.json

The server runs the bundled model on the CPU unless `--model` and engine options say otherwise
(`benches/serve_load.py` starts it the same way).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from omniserve.cli.engine_args import add_engine_args, engine_kwargs
from serve_load import serve

KINDS = {  # kind: weight
    "stream": 40,
    "stream-dropped": 14,
    "whole": 16,
    "chat": 10,
    "oversized": 4,
    "malformed-json": 4,
    "unknown-field": 4,
    "stop-id-out-of-vocabulary": 3,
    "max-tokens-past-context": 3,
    "overlong-text": 2,
}
EXPECTED_STATUS = {
    "oversized": 413,
    "malformed-json": 400,
    "unknown-field": 400,
    "stop-id-out-of-vocabulary": 400,
    "max-tokens-past-context": 400,
    "overlong-text": 400,
}


DENSE_PAGES = 'omniserve_kv_pages_used{pool="dense"}'
RUNNING = "omniserve_requests_running"


def _metric(text: str, series: str) -> float:
    """The value of one series (name and labels, as exposed) in a /metrics page."""
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.rsplit(" ", 1)[1])
    raise KeyError(series)


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


class Soak:
    def __init__(self, url: str, vocab: int, max_model_len: int, max_request_bytes: int) -> None:
        self.url, self.vocab, self.max_model_len = url, vocab, max_model_len
        self.max_request_bytes = max_request_bytes
        self.outcomes: Counter[tuple[str, str]] = Counter()
        self.lost: list[dict[str, Any]] = []

    def _prompt(self, rng: random.Random) -> list[int]:
        return [rng.randrange(16, self.vocab) for _ in range(rng.randint(1, 96))]

    def _body(self, kind: str, rng: random.Random) -> bytes:
        base: dict[str, Any] = {
            "model": "bench",
            "prompt": self._prompt(rng),
            "max_tokens": rng.randint(1, 48),
            "temperature": rng.choice([0.0, 0.8]),
            "ignore_eos": rng.random() < 0.5,
        }
        if kind in ("stream", "stream-dropped"):
            base["stream"] = True
        elif kind == "chat":
            del base["prompt"], base["ignore_eos"]
            base["messages"] = [
                {"role": "user", "content": "Write a function " * rng.randint(1, 20)}
            ]
        elif kind == "oversized":
            base["prompt"] = "x" * (self.max_request_bytes + 1)
        elif kind == "malformed-json":
            return b'{"model": "bench", "prompt": [1, 2'
        elif kind == "unknown-field":
            base["max_token"] = 3
        elif kind == "stop-id-out-of-vocabulary":
            base["stop_token_ids"] = [self.vocab + rng.randrange(0, 2**40)]
        elif kind == "max-tokens-past-context":
            base["max_tokens"] = rng.choice([self.max_model_len, 10**9, 2**64])
        elif kind == "overlong-text":
            base["prompt"] = "x" * (self.max_request_bytes // 2)  # within the body limit
        return json.dumps(base).encode()

    async def one(self, http: httpx.AsyncClient, kind: str, rng: random.Random) -> None:
        path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
        body = self._body(kind, rng)
        outcome = "ok"
        try:
            if kind in ("stream", "stream-dropped"):
                async with http.stream("POST", path, content=body) as r:
                    if r.status_code != 200:
                        outcome = f"status {r.status_code}"
                    else:
                        chunks, done, drop_after = 0, False, rng.randint(1, 4)
                        async for line in r.aiter_lines():
                            if line == "data: [DONE]":
                                done = True
                            elif line.startswith("data: "):
                                if '"error"' in line[:20]:
                                    outcome = "error event"
                                chunks += 1
                                if kind == "stream-dropped" and chunks >= drop_after:
                                    break  # the client goes away
                        if kind == "stream-dropped" and not done:
                            outcome = "dropped"
                        elif not done and outcome == "ok":
                            outcome = "no [DONE]"
            else:
                r = await http.post(path, content=body)
                want = EXPECTED_STATUS.get(kind, 200)
                if r.status_code != want:
                    outcome = f"status {r.status_code}"
                elif want != 200 and "error" not in r.json():
                    outcome = "error not in OpenAI's shape"
        except (httpx.HTTPError, json.JSONDecodeError) as exc:
            outcome = f"{type(exc).__name__}"
        self.outcomes[kind, outcome] += 1
        # A dropped stream may also have finished before its client left ("ok").
        if not (outcome == "ok" or (kind == "stream-dropped" and outcome == "dropped")):
            self.lost.append({"kind": kind, "outcome": outcome})

    async def worker(self, seed: int, deadline: float) -> None:
        rng = random.Random(seed)
        names, weights = list(KINDS), list(KINDS.values())
        async with httpx.AsyncClient(base_url=self.url, timeout=120) as http:
            while time.monotonic() < deadline:
                await self.one(http, rng.choices(names, weights)[0], rng)


async def soak(args: argparse.Namespace, url: str, pid: int, vocab: int, max_len: int) -> dict:
    s = Soak(url, vocab, max_len, args.max_request_bytes)
    start = time.monotonic()
    deadline = start + args.minutes * 60
    samples: list[dict[str, float]] = []

    async def sampler() -> None:
        async with httpx.AsyncClient(base_url=url, timeout=30) as http:
            while time.monotonic() < deadline:
                text = (await http.get("/metrics")).text
                samples.append(
                    {
                        "t_s": round(time.monotonic() - start, 1),
                        "rss_mib": round(_rss_mib(pid), 1),
                        "dense_pages_used": _metric(text, DENSE_PAGES),
                        "running": _metric(text, RUNNING),
                    }
                )
                print(samples[-1], flush=True)
                await asyncio.sleep(args.sample_seconds)

    workers = [s.worker(args.traffic_seed + i, deadline) for i in range(args.concurrency)]
    await asyncio.gather(sampler(), *workers)
    async with httpx.AsyncClient(base_url=url, timeout=30) as http:
        for _ in range(600):  # idle: the dropped streams' aborts have landed
            text = (await http.get("/metrics")).text
            if _metric(text, RUNNING) == 0:
                break
            await asyncio.sleep(0.1)
        health = (await http.get("/health")).status_code
    steady = [x["rss_mib"] for x in samples[len(samples) // 4 :]] or [0.0]
    return {
        "minutes": args.minutes,
        "concurrency": args.concurrency,
        "requests": sum(s.outcomes.values()),
        "outcomes": {f"{k} -> {o}": n for (k, o), n in sorted(s.outcomes.items())},
        "lost": len(s.lost),
        "lost_examples": s.lost[:20],
        "dense_pages_used_at_end": _metric(text, DENSE_PAGES),
        "health_at_end": health,
        "rss_mib_first_quarter_end": steady[0],
        "rss_mib_last": steady[-1],
        "rss_mib_max_after_first_quarter": max(steady),
        "samples": samples,
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], allow_abbrev=False)
    p.add_argument("--minutes", type=float, default=10.0, help="how long traffic runs")
    p.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    p.add_argument("--sample-seconds", type=float, default=30.0, help="memory sampling period")
    p.add_argument("--max-request-bytes", type=int, default=1 << 20, help="the server's limit")
    p.add_argument("--traffic-seed", type=int, default=0, help="seed of the request mix")
    p.add_argument("--output-json", type=Path, default=None)
    add_engine_args(p)
    args = p.parse_args()
    from omniserve.engine.engine import bundled_model_path

    args.model = args.model or str(bundled_model_path())
    args.api_key = None
    options = {"device": "cpu", "dtype": "float32", **engine_kwargs(args)}
    config = json.loads((Path(args.model) / "config.json").read_text())
    max_len = options.get("max_model_len") or config["max_position_embeddings"]
    extra = ["--max-request-bytes", str(args.max_request_bytes)]
    with serve(args, options, extra) as (url, pid):
        report = asyncio.run(soak(args, url, pid, config["vocab_size"], max_len))
    summary = {k: v for k, v in report.items() if k != "samples"}
    print(json.dumps(summary, indent=2))
    if args.output_json is not None:
        args.output_json.write_text(json.dumps(report, indent=2))
    ok = report["lost"] == 0 and report["dense_pages_used_at_end"] == 0
    return 0 if ok and report["health_at_end"] == 200 else 1


if __name__ == "__main__":
    sys.exit(main())
