"""Hostile requests against a real server process (issue 17): each one is a 4xx within its time
budget, while a concurrent stream keeps receiving tokens and /health answers within 100 ms.

Before the limits, these froze the event loop: a 2,500-rule GBNF chain 15 s (20,000 rules: over 7
minutes, SIGTERM ignored), a draft-04 enum of 4,000 mixed values 8.7 s, a 32 MB /tokenize 34-49 s
and 6 GB, an 8 MB chat message 9.6 s, a template macro recursing exponentially 12.7 s at depth 20.
The server runs in its own process so that what is measured is the server, not this test's GIL.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import httpx

from hostile_inputs import gbnf_chain, nested_schema
from serve_process import serve_process

# a template whose macro doubles its work per level: 2^40 calls unless the render budget stops it;
# plain ChatML otherwise, so the capability probes still see roles and content
BOOM = ("{% macro boom(n) %}{% if n > 0 %}{{ boom(n - 1) }}{{ boom(n - 1) }}{% endif %}{% endmacro %}"
        "{% for m in messages %}{% if m.content == 'boom' %}{{ boom(40) }}{% endif %}"
        "{{ '<|im_start|>' + m.role + '\\n' + m.content + '<|im_end|>\\n' }}{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
MSGS = [{"role": "user", "content": "hi"}]
# /health polled from a process of its own: the latency measured is the server's, not this
# process's GIL while it sends 32 MB
POLLER = """
import sys, time, httpx
with httpx.Client(base_url=sys.argv[1], timeout=10) as c:
    while True:
        t0 = time.monotonic()
        ok = c.get("/health").status_code == 200
        print(f"{t0} {time.monotonic() - t0} {ok}", flush=True)
        time.sleep(0.05)
"""
TEMPLATE_BUDGET = 1.0


def _cases() -> list[tuple[str, str, bytes, int, str | None, float]]:
    """(name, path, body, status, the param its error must name, seconds it may take)."""
    enum = [[i, str(i), {"k": i}, [i], i + 0.5][i % 5] for i in range(4000)]
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "enum": enum}
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    history = [{"role": "user", "content": "x"},
               {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": "f"}]},
               {"role": "tool", "tool_call_id": "1", "content": "r"}]
    rf = lambda schema: {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}  # noqa: E731
    chat = [
        ("gbnf 20,000 rules", {"messages": MSGS, "grammar": gbnf_chain(20_000)}, "grammar", 2.0),
        ("gbnf 2,500 rules", {"messages": MSGS, "grammar": gbnf_chain(2_500)}, "grammar", 2.0),
        ("draft-04 enum of 4,000", {"messages": MSGS, "response_format": rf(draft4)}, "response_format", 2.0),
        ("schema nested 200 deep", {"messages": MSGS, "response_format": rf(nested_schema(200))}, "response_format", 2.0),
        ("json_schema string 50k deep", {"messages": MSGS, "json_schema": "[" * 50_000 + "]" * 50_000},
         "json_schema", 2.0),
        ("self-recursive $ref", {"messages": MSGS, "max_tokens": 4, "response_format": rf(
            {"$defs": {"a": {"$ref": "#/$defs/a"}}, "$ref": "#/$defs/a"})}, "response_format", 2.0),
        ("tool_choice function is a string",
         {"messages": MSGS, "tools": [tool], "tool_choice": {"type": "function", "function": "f"}}, "tool_choice", 2.0),
        ("tool_calls function is a string", {"messages": history}, "messages[1].tool_calls[0].function", 2.0),
        ("8 MB chat message", {"messages": [{"role": "user", "content": "x" * 8_000_000}]}, "messages", 4.0),
        ("exponential template macro", {"messages": [{"role": "user", "content": "boom"}]}, "messages",
         TEMPLATE_BUDGET + 1.5),
    ]
    out = [(name, "/v1/chat/completions", json.dumps(body).encode(), 400, param, budget)
           for name, body, param, budget in chat]
    # the default body limit is what the text limit can use (8192 x 81 characters x 12 bytes + 1 MiB)
    out.append(("2 MB /tokenize", "/tokenize", json.dumps({"content": "word " * 400_000}).encode(), 400, "content",
                3.0))
    out.append(("32 MB /tokenize", "/tokenize", json.dumps({"content": "word " * 6_400_000}).encode(), 413, None,
                3.0))
    return out


def test_hostile_requests_are_fast_4xx_while_serving(smollm2_path, tmp_path) -> None:
    template = tmp_path / "boom.jinja"
    template.write_text(BOOM)
    cases = _cases()  # built before the clock starts: the poller must not wait for this process's GIL
    with serve_process(smollm2_path, "-c", "8192", "-np", "4", "--kv-cache-gib", "0.4", "--chat-template",
                       str(template), "--template-timeout", str(TEMPLATE_BUDGET)) as sp:
        base, stop = sp.base_url, threading.Event()
        token_times: list[float] = []
        poller = subprocess.Popen([sys.executable, "-c", POLLER, base], stdout=subprocess.PIPE, text=True)

        def stream() -> None:
            body = {"prompt": "Once upon a time", "max_tokens": 1500, "ignore_eos": True, "temperature": 0,
                    "stream": True}
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        token_times.append(time.monotonic())
                    if stop.is_set():
                        return

        streamer = threading.Thread(target=stream)
        streamer.start()
        while len(token_times) < 3:
            time.sleep(0.05)
        results = []
        with httpx.Client(base_url=base, timeout=120, headers={"content-type": "application/json"}) as c:
            hostile_start = time.monotonic()
            for name, path, body, _, _, budget in cases:
                t0 = time.monotonic()
                r = c.post(path, content=body)
                results.append((name, r.status_code, r.json().get("error", {}).get("param"), time.monotonic() - t0,
                                budget))
            hostile_end = time.monotonic()
            time.sleep(0.5)
        stop.set()
        streamer.join(60)
        poller.terminate()
        polls = [ln.split() for ln in poller.communicate()[0].splitlines()]

    for (name, status, got_param, took, budget), case in zip(results, cases):
        assert (status, got_param) == case[3:5], (name, status, got_param)
        assert took < budget, f"{name}: {took:.2f} s (budget {budget} s)"
    health = [float(dt) for t0, dt, ok in polls if hostile_start <= float(t0) <= hostile_end]
    assert len(health) > 10 and all(ok == "True" for _, _, ok in polls)
    assert max(health) < 0.1, f"/health took up to {max(health) * 1000:.0f} ms"
    during = [t for t in token_times if hostile_start <= t <= hostile_end + 0.5]
    assert len(during) > 5, "the concurrent stream stalled"
    gaps = [b - a for a, b in zip(token_times, token_times[1:]) if hostile_start <= b <= hostile_end + 0.5]
    # the slowest hostile job is the template render at its budget; the stream shares the GIL with it
    assert max(gaps) < TEMPLATE_BUDGET + 2.0, f"stream gap {max(gaps):.2f} s"
