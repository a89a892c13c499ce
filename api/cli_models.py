"""`llamatron models`: what a server would serve, or (`--base-url`) what a running one serves and
holds resident.

Without --base-url it builds the router's catalogue from the same flags `serve` takes (--models-dir,
--models-preset, -m) and the pulled registry models, reading each model's header (nothing loads),
then lists the registry models not pulled yet. With --base-url it asks the server's /v1/models.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--models-dir", dest="models_dir", default=None, metavar="DIR", help="as `serve --models-dir`")
    p.add_argument("--models-preset", dest="models_preset", default=None, metavar="FILE",
                   help="as `serve --models-preset`")
    p.add_argument("-m", "--model", default=None, help="as `serve -m` in router mode")
    p.add_argument("--base-url", dest="base_url", default=None, metavar="URL",
                   help="ask a running server (e.g. http://127.0.0.1:8080) instead")
    p.add_argument("--api-key", dest="api_key", default=None, help="the server's API key (with --base-url)")
    p.add_argument("--json", action="store_true", help="print the list as JSON")


def _mb(n: Any) -> str:
    return f"{n / 1e6:.1f}MB" if isinstance(n, (int, float)) and n else "-"


def _local(args: argparse.Namespace) -> list[dict[str, Any]]:
    from engine.loading.registry import load_registry, model_path

    from .router.catalog import build_catalog
    from .settings import load_settings

    settings = load_settings({"models_dir": args.models_dir, "models_preset": args.models_preset,
                              "model": args.model})
    rows = []
    for s in build_catalog(settings):
        info = s.info
        rows.append({"id": s.id, "status": "failed" if s.error else "available", "error": s.error,
                     "source": s.source, "size": info.size if info else None, "format": info.format if info else "",
                     "n_ctx_train": info.n_ctx_train if info else None, "ftype": info.ftype if info else "",
                     "aliases": s.aliases, "path": str(s.path)})
    listed = {r["id"] for r in rows}
    default, entries = load_registry()
    for name, e in entries.items():
        if name not in listed:
            rows.append({"id": name, "status": "not pulled", "error": "", "source": "registry", "size": e.size,
                         "format": "gguf", "n_ctx_train": None, "ftype": "", "aliases": [],
                         "path": str(model_path(e))})
    for r in rows:
        r["default"] = r["id"] == default
    return rows


def _remote(args: argparse.Namespace) -> list[dict[str, Any]]:
    import httpx

    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    r = httpx.get(args.base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    r.raise_for_status()
    rows = []
    for m in r.json().get("data", []):
        status = m.get("status") or {"value": "loaded"}  # a single-model server serves its one model
        meta = m.get("meta") or {}
        rows.append({"id": m["id"], "status": status.get("value"), "error": status.get("error", ""),
                     "size": m.get("size") or meta.get("size"), "n_ctx": meta.get("n_ctx"),
                     "in_flight": m.get("in_flight"), "memory": m.get("memory_rss_bytes"),
                     "aliases": m.get("aliases", []), "path": m.get("path", "")})
    return rows


def models_main(args: argparse.Namespace) -> int:
    from .settings import SettingsError

    try:
        rows = _remote(args) if args.base_url else _local(args)
    except SettingsError as e:
        print(f"llamatron models: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # noqa: BLE001 - an unreachable server or a bad answer: say which
        print(f"llamatron models: cannot list the models of {args.base_url}: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if args.base_url:
        print(f"{'model':32} {'status':10} {'size':>10} {'context':>8} {'in flight':>9} {'memory':>10}")
        for r in rows:
            print(f"{r['id']:32} {r['status']:10} {_mb(r['size']):>10} {r['n_ctx'] or '-':>8} "
                  f"{r['in_flight'] if r['in_flight'] is not None else '-':>9} {_mb(r['memory']):>10}"
                  + (f"  {r['error']}" if r["error"] else ""))
        return 0
    print(f"{'model':32} {'status':11} {'size':>10} {'type':8} {'source':9} path")
    for r in rows:
        mark = " (default)" if r["default"] else ""
        print(f"{r['id']:32} {r['status']:11} {_mb(r['size']):>10} {r['ftype'] or '-':8} {r['source']:9} "
              f"{r['path']}{mark}" + (f"\n{'':32} {r['error']}" if r["error"] else ""))
    return 0
