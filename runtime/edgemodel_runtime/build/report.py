"""The build report: what was built, from what, where, how well, and what was decided.

`report.json` holds the whole report; the termination message holds a compact form that
always fits the kubelet's 4 KiB limit, which is how the operator reads a build's result.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

REPORT_VERSION = 1
TERMINATION_LIMIT = 4096


def cache_key(
    *, model_sha256: str, engine: str, precision: str, class_key: str, builder_version: str, options: dict[str, Any]
) -> str:
    """sha256 over everything that changes the engine: same key, same engine, no rebuild."""
    material = {
        "model": model_sha256,
        "engine": engine,
        "precision": precision,
        "class": class_key,
        "builder": builder_version,
        "options": options,
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def compact(report: dict[str, Any], limit: int = TERMINATION_LIMIT) -> str:
    """The fields the operator needs, as JSON of at most `limit` bytes."""
    candidate = report.get("candidate") or {}
    essentials: dict[str, Any] = {
        "v": report["version"],
        "status": report["status"],
        "exitCode": report["exitCode"],
        "reason": report.get("reason"),
        "message": report.get("message", ""),
        "cacheKey": report.get("cacheKey"),
        "engine": report.get("engine"),
        "precision": report.get("precision"),
        "classKey": report.get("classKey"),
        "artifact": report.get("artifact"),
        "buildSeconds": report.get("buildSeconds"),
        "metrics": candidate.get("comparison"),
        "latency": {k: candidate.get("latency", {}).get(k) for k in ("p50_ms", "p99_ms")} if candidate else None,
        "decision": report.get("decision"),
    }
    text = json.dumps(essentials, separators=(",", ":"))
    while len(text.encode()) > limit:
        message = essentials["message"]
        if not message:
            essentials = {k: essentials[k] for k in ("v", "status", "exitCode", "reason", "cacheKey")}
            text = json.dumps(essentials, separators=(",", ":"))
            break
        essentials["message"] = message[: max(0, len(message) - (len(text.encode()) - limit) - 16)] + "…"
        if essentials["message"] == "…":
            essentials["message"] = ""
        text = json.dumps(essentials, separators=(",", ":"))
    return text
