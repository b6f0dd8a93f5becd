"""The build report: what was built, from what, where, how well, and what was decided.

`report.json` holds the whole report; the termination message holds a compact form that
always fits the kubelet's 4 KiB limit, which is how the operator reads a build's result.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

from edgemodel_runtime.build.compare import Comparison

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


HEADLINE = ("max_abs_error", "max_relative_error", "cosine", "top1_agreement", "nonfinite", "worst_sample", "samples")


def validation_verdict(comparison: Comparison, failures: Sequence[str]) -> dict[str, Any]:
    """What validation concluded: `failed` (with every reason), `uninformative` (no output's reference can
    discriminate, so the figures decide nothing) or `passed`; which outputs were uninformative and why, and the
    worst sample (0-based index into the reference samples)."""
    uninformative = {o.name: o.uninformative for o in comparison.outputs if o.uninformative is not None}
    verdict = "failed" if failures else "passed" if comparison.informative else "uninformative"
    return {
        "verdict": verdict,
        "failures": list(failures),
        "uninformative": uninformative,
        "worstSample": comparison.worst_sample,
    }


UNINFORMATIVE = "ReferenceUninformative"


def reference_warnings(validation: dict[str, Any], task_notes: Sequence[str] = ()) -> list[dict[str, str]]:
    """Warnings (`reason`, `message`) for a reference that cannot discriminate: outputs the validation could not
    judge (the verdict's `uninformative`), and labelled outputs whose task metric says little (`task_notes`)."""
    warnings = []
    reasons = validation.get("uninformative") or {}
    if reasons:
        which = "no output" if validation.get("verdict") == "uninformative" else "some outputs"
        details = "; ".join(f"{name}: {why}" for name, why in reasons.items())
        warnings.append({"reason": UNINFORMATIVE, "message": f"the reference cannot discriminate on {which} "
                         f"({details}); their figures decide nothing: validate on realistic inputs"})  # fmt: skip
    warnings += [{"reason": UNINFORMATIVE, "message": note} for note in task_notes]
    return warnings


def describe_validation(figures: dict[str, Any], validation: dict[str, Any]) -> str:
    """One clause for the build's summary line: the headline figures, or why there are none."""
    if validation.get("verdict") == "uninformative":
        reasons = "; ".join(f"{k}: {v}" for k, v in (validation.get("uninformative") or {}).items())
        return f"validation uninformative, the reference cannot discriminate ({reasons})"
    text = ", ".join(
        f"{label} {figures[key]:.3g}" if isinstance(figures.get(key), float) else f"{label} n/a"
        for key, label in (("max_abs_error", "max abs error"), ("max_relative_error", "max relative error"),
                           ("cosine", "cosine"))
    )  # fmt: skip
    if validation.get("worstSample") is not None:
        text += f", worst sample {validation['worstSample']}"
    if validation.get("uninformative"):
        text += f"; uninformative outputs not judged: {', '.join(validation['uninformative'])}"
    return text


def summary(built: dict[str, Any]) -> str:
    """The one-line message of a built report: engine, precision, class, latency and validation figures
    (those of the fp32 fallback when the build served fp32 instead of the requested precision)."""
    served = built["fp32"] if _fell_back(built) else built
    figures = served.get("comparison") or built.get("candidate", {}).get("comparison", {})
    latency = built.get("latency", {})
    chosen = f" (chosen by auto from {len(built['auto']['candidates'])} candidates)" if built.get("auto") else ""
    return (
        f"built {built['engine']} {built['precision']}{chosen} for {built['classKey']}: "
        f"p50 {latency.get('p50_ms', 0):.2f} ms, p99 {latency.get('p99_ms', 0):.2f} ms, "
        + describe_validation(figures, built.get("validation") or {})
        + (f"; {built['int8']['reason']}" if built.get("int8") else "")
    )


def _fell_back(report: dict[str, Any]) -> bool:
    """Whether an int8 build served its fp32 fallback (`auto` chooses among candidates and never falls back)."""
    return bool(report.get("fp32")) and report.get("precision") != report.get("requestedPrecision")


def compact_int8(section: dict[str, Any] | None) -> dict[str, Any] | None:
    """The accuracy-aware INT8 decision in a few bytes: action, speed ratio, calibration, the nodes kept in fp32
    (at most 8 names; the effects are in report.json)."""
    if not section:
        return None
    nodes = [entry["node"] for entry in section.get("fp32Nodes") or []]
    return {
        "action": section.get("action"),
        "speedup": section.get("speedup"),
        "calibration": section.get("calibration"),
        "fp32Nodes": nodes[:8],
        "fp32NodeCount": len(nodes),
    }


def _headline(report: dict[str, Any]) -> dict[str, Any] | None:
    served = report.get("fp32") if _fell_back(report) else None
    comparison = (served or {}).get("comparison") or (report.get("candidate") or {}).get("comparison")
    if not comparison:
        return None
    return {key: comparison.get(key) for key in HEADLINE if key in comparison}


def _compact_validation(validation: dict[str, Any] | None) -> dict[str, Any] | None:
    """The verdict and the uninformative outputs' names (reasons are in report.json), bounded in size."""
    if not validation:
        return None
    names = list(validation.get("uninformative") or {})
    return {"verdict": validation.get("verdict"), "uninformative": names[:8]}


def compact_auto(auto: dict[str, Any] | None) -> dict[str, Any]:
    """Under auto: the chosen candidate and every candidate's engine, precision, speedup, cosine and verdict."""
    if not auto:
        return {}
    rows = [
        {
            "engine": row.get("engine"),
            "precision": row.get("precision"),
            "speedup": None if row.get("speedup") is None else round(row["speedup"], 3),
            "cosine": None if row.get("cosine") is None else round(row["cosine"], 6),
            "passed": bool(row.get("passed")),
        }
        for row in (auto.get("candidates") or [])[:16]
    ]
    return {"chosen": auto.get("chosen"), "candidates": rows}


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
        "metrics": _headline(report),
        "validation": _compact_validation(report.get("validation")),
        "latency": {k: candidate.get("latency", {}).get(k) for k in ("p50_ms", "p99_ms")} if candidate else None,
        "decision": report.get("decision"),
        **compact_auto(report.get("auto")),
        "int8": compact_int8(report.get("int8")),
    }
    text = json.dumps(essentials, separators=(",", ":"))
    quiet = json.dumps(essentials | {"message": ""}, separators=(",", ":"))
    if len(quiet.encode()) > limit and (essentials["artifact"] or {}).get("parts"):
        # The part images only make a cut pull cheaper (engineimage): without them the engine is pulled whole.
        essentials["artifact"] = {k: v for k, v in essentials["artifact"].items() if k != "parts"}
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
