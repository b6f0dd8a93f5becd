"""HTTP around the protocol: body compression both ways, and the endpoints of extensions not served.

Pure functions. tritonclient compresses request bodies with `request_compression_algorithm`
(Content-Encoding gzip or deflate, deflate meaning the zlib format) and asks for compressed
responses with `response_compression_algorithm` (Accept-Encoding); both are honoured. Endpoints of
protocol extensions this server does not offer get a message naming the extension instead of a
bare "no such endpoint".
"""

from __future__ import annotations

import gzip
import re
import zlib

from edgemodel_runtime.serve.codec import ProtocolError

ENCODINGS = ("gzip", "deflate")

_UNSUPPORTED_ENDPOINTS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), message)
    for pattern, message in (
        (
            r"^/v2/(system|cuda)sharedmemory(/|$)",
            "the shared memory extensions (system and CUDA) are not supported by this server; send tensor data "
            "in the request body (JSON or binary)",
        ),
        (
            r"^/v2/repository(/|$)",
            "the model repository extension is not supported: this server serves the one model it was started "
            "with, which cannot be loaded or unloaded while it runs",
        ),
        (
            r"^/v2/models/[^/]+(/versions/[^/]+)?/config$",
            "model configuration (Triton's config endpoint) is not supported; the model's metadata is at "
            "/v2/models/{name}",
        ),
        (
            r"^/v2/models(/[^/]+(/versions/[^/]+)?)?/stats$",
            "the statistics extension is not supported; this server's statistics are Prometheus metrics at /metrics",
        ),
        (r"^/v2(/models/[^/]+)?/trace/setting$", "the trace extension is not supported by this server"),
        (r"^/v2/logging$", "the logging extension is not supported by this server"),
        (
            r"^/v2/models/[^/]+(/versions/[^/]+)?/generate(_stream)?$",
            "the generate extension is not supported; use /v2/models/{name}/infer",
        ),
    )
)


def unsupported_endpoint(path: str) -> str | None:
    """Why `path` is not served, when it belongs to a protocol extension this server lacks."""
    for pattern, message in _UNSUPPORTED_ENDPOINTS:
        if pattern.match(path):
            return message
    return None


def decompress(body: bytes, encoding: str | None, limit: int) -> bytes:
    """The request body without its Content-Encoding; at most `limit` bytes once decompressed.

    Raises ProtocolError: 415 for an encoding other than gzip, deflate or identity, 400 for data
    that does not decompress, 413 beyond `limit`.
    """
    coding = (encoding or "identity").strip().lower()
    if coding == "identity":
        return body
    if coding not in ENCODINGS:
        raise ProtocolError(
            f"Content-Encoding {encoding!r} is not supported; send gzip, deflate or an uncompressed body", status=415
        )
    wbits = 16 + zlib.MAX_WBITS if coding == "gzip" else zlib.MAX_WBITS
    decompressor = zlib.decompressobj(wbits)
    try:
        data = decompressor.decompress(body, limit + 1)
    except zlib.error as error:
        raise ProtocolError(f"the request body is not valid {coding} data: {error}") from error
    if len(data) > limit:
        raise ProtocolError(f"the request body decompresses to more than the limit of {limit} bytes", status=413)
    if not decompressor.eof or decompressor.unused_data:
        raise ProtocolError(f"the request body is not one complete {coding} stream")
    return data


def response_encoding(accept: str | None) -> str | None:
    """The encoding to compress a response with: the first of gzip or deflate that Accept-Encoding allows."""
    if not accept:
        return None
    for item in accept.split(","):
        coding, _, options = item.strip().partition(";")
        coding = coding.strip().lower()
        quality = options.strip().lower()
        if quality.startswith("q=") and quality[2:].strip() in {"0", "0.0", "0.00", "0.000"}:
            continue
        if coding in ENCODINGS:
            return coding
        if coding == "*":
            return "gzip"
    return None


def compress(body: bytes, coding: str) -> bytes:
    """`body` in the Content-Encoding `coding` (gzip, or deflate as the zlib format)."""
    return gzip.compress(body, compresslevel=6) if coding == "gzip" else zlib.compress(body, 6)
