"""Numbers for llamatron_tools/loadtest.py: per-request records -> per-point summaries, tables, comparisons.

Pure functions over plain data (no I/O, no network) so they are unit-tested directly. A "point" is
one setting of the sweep (a concurrency or a request rate); its summary is a JSON-ready dict.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

PCTS = (50, 90, 99)


@dataclass
class RequestRecord:
    """What one request measured. Times are seconds from time.perf_counter()."""

    ok: bool
    start: float
    end: float
    ttft: float | None = None  # first chunk carrying text
    chunk_times: list[float] = field(default_factory=list)  # arrival of every text-carrying chunk
    chunks: int = 0  # text-carrying chunks (llama-server and llamatron send one per token)
    prompt_tokens: int | None = None  # from the server's usage, when it sent one
    completion_tokens: int | None = None
    finish_reason: str | None = None
    error: str | None = None
    cancelled: bool = False  # still running at the point's time limit

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("chunk_times")
        d["e2e"] = self.end - self.start
        return d


def percentile(values: list[float], p: float) -> float:
    """Linear-interpolated percentile (numpy's default method); NaN for no values."""
    if not values:
        return math.nan
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def distribution(values: list[float], scale: float = 1.0) -> dict[str, float | int]:
    out: dict[str, float | int] = {"n": len(values)}
    out["mean"] = sum(values) / len(values) * scale if values else math.nan
    for p in PCTS:
        out[f"p{p}"] = percentile(values, p) * scale
    return out


def output_tokens(r: RequestRecord) -> int:
    """The server's count when it reported usage, else the chunks we saw."""
    return r.completion_tokens if r.completion_tokens is not None else r.chunks


def summarize(records: list[RequestRecord], label: str, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok and not r.cancelled]
    cancelled = [r for r in records if r.cancelled]
    # Duration: first request sent to last request done (cancelled ones included: they held the server).
    duration = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    itl: list[float] = []
    tpot: list[float] = []
    for r in ok:
        itl.extend(b - a for a, b in zip(r.chunk_times, r.chunk_times[1:], strict=False))
        n = output_tokens(r)
        if r.ttft is not None and n > 1:
            tpot.append((r.end - r.start - r.ttft) / (n - 1))
    usage_out = sum(r.completion_tokens or 0 for r in ok)
    usage_in = sum(r.prompt_tokens or 0 for r in ok)
    out_tokens = sum(output_tokens(r) for r in ok)
    errors: dict[str, int] = {}
    for r in failed:
        key = (r.error or "unknown")[:200]
        errors[key] = errors.get(key, 0) + 1
    per_s = (lambda x: x / duration) if duration > 0 else (lambda x: math.nan)
    return {
        "label": label,
        **(extra or {}),
        "requests": len(records),
        "ok": len(ok),
        "failed": len(failed),
        "cancelled": len(cancelled),
        "errors": errors,
        "duration_s": duration,
        "usage_reported": sum(r.completion_tokens is not None for r in ok),
        "tokens": {
            "prompt": usage_in,
            "completion_usage": usage_out,
            "completion_chunks": sum(r.chunks for r in ok),
            "completion": out_tokens,
        },
        "throughput": {
            "requests_per_s": per_s(len(ok)),
            "output_tokens_per_s": per_s(out_tokens),
            "total_tokens_per_s": per_s(out_tokens + usage_in),
        },
        "ttft_ms": distribution([r.ttft for r in ok if r.ttft is not None], 1e3),
        "itl_ms": distribution(itl, 1e3),
        "tpot_ms": distribution(tpot, 1e3),
        "e2e_ms": distribution([r.end - r.start for r in ok], 1e3),
    }


def _fmt(x: Any, digits: int = 1) -> str:
    if isinstance(x, float):
        return "-" if math.isnan(x) else f"{x:.{digits}f}"
    return str(x)


def render_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [[_fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    def line(vals: list[str]) -> str:
        return "  ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(vals, widths, strict=False)))

    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in cells])


def tables(points: list[dict[str, Any]]) -> str:
    """Two tables: counts and throughput, then latency percentiles (milliseconds)."""
    t1 = render_table(
        ["point", "ok", "failed", "cancel", "dur s", "req/s", "in tok", "out tok", "chunks", "out tok/s",
         "total tok/s"],
        [[p["label"], p["ok"], p["failed"], p["cancelled"], p["duration_s"], p["throughput"]["requests_per_s"],
          p["tokens"]["prompt"], p["tokens"]["completion"], p["tokens"]["completion_chunks"],
          p["throughput"]["output_tokens_per_s"], p["throughput"]["total_tokens_per_s"]] for p in points],
    )
    heads = ["point"]
    for m in ("TTFT", "ITL", "TPOT", "E2E"):
        heads += [f"{m} p{q}" for q in PCTS]
    rows = []
    for p in points:
        row: list[Any] = [p["label"]]
        for key in ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms"):
            row += [p[key][f"p{q}"] for q in PCTS]
        rows.append(row)
    return t1 + "\n\nlatency (ms)\n" + render_table(heads, rows)


# (name, path into a point, higher is better)
COMPARED = [
    ("ok", ("ok",), True),
    ("failed", ("failed",), False),
    ("output tok/s", ("throughput", "output_tokens_per_s"), True),
    ("total tok/s", ("throughput", "total_tokens_per_s"), True),
    ("req/s", ("throughput", "requests_per_s"), True),
    ("TTFT p50 ms", ("ttft_ms", "p50"), False),
    ("TTFT p99 ms", ("ttft_ms", "p99"), False),
    ("ITL p50 ms", ("itl_ms", "p50"), False),
    ("TPOT p50 ms", ("tpot_ms", "p50"), False),
    ("E2E p50 ms", ("e2e_ms", "p50"), False),
    ("E2E p99 ms", ("e2e_ms", "p99"), False),
]


def _get(point: dict[str, Any], path: tuple[str, ...]) -> float:
    v: Any = point
    for k in path:
        v = v.get(k, math.nan) if isinstance(v, dict) else math.nan
    return float(v) if isinstance(v, (int, float)) else math.nan


def compare(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Points matched by label; ratio is B/A (so >1 means B is higher, better or worse per the metric)."""
    name_a = a.get("meta", {}).get("name") or "A"
    name_b = b.get("meta", {}).get("name") or "B"
    pb = {p["label"]: p for p in b.get("points", [])}
    rows: list[list[Any]] = []
    for p in a.get("points", []):
        q = pb.get(p["label"])
        if q is None:
            continue
        for title, path, higher_better in COMPARED:
            x, y = _get(p, path), _get(q, path)
            ratio = y / x if x and not math.isnan(x) and not math.isnan(y) else math.nan
            better = "" if math.isnan(ratio) or ratio == 1 else ("B" if (ratio > 1) == higher_better else "A")
            rows.append([p["label"], title, x, y, f"{_fmt(ratio, 2)}x" if not math.isnan(ratio) else "-", better])
    if not rows:
        return "no point labels in common"
    head = f"A = {name_a}\nB = {name_b}\n"
    return head + render_table(["point", "metric", "A", "B", "B/A", "better"], rows)
