"""Scheduling fairness on a real server process (issue 17): one request cannot hold every slot,
and a long prompt does not stall the streams already decoding.

Before: `n=16, max_tokens=1500` on `-np 8` took all 8 slots and nothing else ran until its
choices finished (strict FCFS admission); a 2,030-token prompt became one 2,030-token step and an
unrelated stream waited for all of it (44 s measured on a busy 2-core machine).
"""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from serve_process import serve_process


@pytest.fixture(scope="module")
def server(smollm2_path):
    with serve_process(smollm2_path, "-c", "4096", "-np", "8", "--kv-cache-gib", "0.5",
                       "--max-batched-tokens", "2048") as sp:
        yield sp


class Stream(threading.Thread):
    """A streaming /v1/completions request that records when each chunk arrives."""

    def __init__(self, base: str, body: dict) -> None:
        super().__init__(daemon=True)
        self.base, self.body = base, {**body, "stream": True, "temperature": 0, "ignore_eos": True}
        self.times: list[float] = []
        self.finish: list[str] = []
        self.stop = threading.Event()
        self.sent = time.monotonic()

    def run(self) -> None:
        with httpx.stream("POST", self.base + "/v1/completions", json=self.body, timeout=300) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    self.times.append(time.monotonic())
                    self.finish += [c["finish_reason"] for c in json.loads(line[6:])["choices"] if c["finish_reason"]]
                if self.stop.is_set():
                    return

    def wait_chunks(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.times) < n and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(self.times) >= n, "stream produced nothing"

    def max_gap(self, since: float) -> float:
        return max((b - a for a, b in zip(self.times, self.times[1:]) if b >= since), default=0.0)


def test_one_request_cannot_take_every_slot(server) -> None:
    big = Stream(server.base_url, {"prompt": "Once upon a time", "n": 16, "max_tokens": 1500})
    big.start()
    big.wait_chunks(8)  # all 8 slots are its choices now
    small = Stream(server.base_url, {"prompt": "The capital of France is", "max_tokens": 16})
    small.start()
    small.join(60)
    try:
        assert small.finish == ["length"], "the small request did not finish while the big one ran"
        ttft = small.times[0] - small.sent
        assert ttft < 5.0, f"first token after {ttft:.1f} s"  # one fairness preemption, a step or two
        assert not big.finish or len(big.finish) < 16, "the big request finished first"
    finally:
        big.stop.set()
        big.join(60)


def test_long_prompt_does_not_stall_decoders(server) -> None:
    s = Stream(server.base_url, {"prompt": "Once upon a time", "max_tokens": 400})
    s.start()
    s.wait_chunks(5)
    t0 = time.monotonic()
    long_prompt = {"prompt": "Chapter one." + " word" * 2030, "max_tokens": 1, "temperature": 0}
    r = httpx.post(server.base_url + "/v1/completions", json=long_prompt, timeout=300)
    t1 = time.monotonic()
    s.stop.set()
    s.join(60)
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] > 2000
    # prompt chunks share a step with the decoder at most --long-prefill-tokens (256 on CPU) at a
    # time: the gap is about one 256-token chunk, not the whole 2,030-token prefill
    gap = s.max_gap(t0)
    assert gap < 0.35 * (t1 - t0) + 0.5, f"max inter-token gap {gap:.2f} s during a {t1 - t0:.1f} s prefill"
    assert gap < 3.0, f"max inter-token gap {gap:.2f} s"
