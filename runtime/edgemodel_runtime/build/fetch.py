"""Fetch a model or data file by URI, verifying its SHA-256 before anything parses it.

Accepted: https:// URIs, oci:// references (pulled with ORAS), and, from the command line
only, local paths. Refused: file://, plain http://, `..` segments (also percent-encoded),
credentials in the URI, and redirects that leave https.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import ssl
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from edgemodel_runtime.build.errors import BadInputError, InfrastructureError
from edgemodel_runtime.progress import Progress

CHUNK = 1 << 20
_DIGEST = re.compile(r"^[a-f0-9]{64}$")
_DOT_DOT = re.compile(r"(^|/)(\.|%2e){2}(/|\?|#|$)", re.IGNORECASE)
MAX_REDIRECTS = 5


@dataclass(frozen=True)
class Source:
    """Where a file comes from, after validation."""

    kind: str  # "https", "oci" or "path"
    location: str


def parse_source(uri: str, *, allow_local: bool) -> Source:
    """Validate a URI or path and say how to fetch it; raise BadInputError naming the problem."""
    if any(c.isspace() for c in uri) or "\\" in uri:
        raise BadInputError(f"{uri!r}: whitespace and backslashes are not allowed", reason="InvalidURI")
    if _DOT_DOT.search(uri):
        raise BadInputError(f"{uri!r}: '..' path segments are not allowed", reason="InvalidURI")
    scheme, _, rest = uri.partition("://")
    if not rest:
        if not allow_local:
            raise BadInputError(f"{uri!r}: expected an https:// or oci:// URI", reason="InvalidURI")
        return Source("path", uri)
    scheme = scheme.lower()
    if "@" in rest.split("/", 1)[0]:
        raise BadInputError(f"{uri!r}: credentials in URIs are not allowed", reason="InvalidURI")
    if scheme == "https":
        return Source("https", uri)
    if scheme == "oci":
        return Source("oci", rest)
    if scheme == "file":
        raise BadInputError(
            f"{uri!r}: file:// URIs are refused; pass a local path on the command line", reason="InvalidURI"
        )
    raise BadInputError(f"{uri!r}: unsupported scheme {scheme!r}; use https:// or oci://", reason="InvalidURI")


def check_digest(sha256: str) -> str:
    """The digest, normalised to lowercase hex without a `sha256:` prefix."""
    value = sha256.lower().removeprefix("sha256:")
    if not _DIGEST.match(value):
        raise BadInputError(f"{sha256!r} is not a SHA-256 digest (64 hex characters)", reason="InvalidDigest")
    return value


class _HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    max_redirections = MAX_REDIRECTS

    def redirect_request(  # noqa: PLR0917 - the signature urllib calls
        self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str, headers: Any, newurl: str
    ) -> urllib.request.Request | None:
        if urllib.parse.urlsplit(newurl).scheme.lower() != "https":
            raise BadInputError(
                f"{req.full_url} redirected to {newurl!r}, which is not https; refusing to follow",
                reason="InsecureRedirect",
            )
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _https_opener(cafile: str | None) -> urllib.request.OpenerDirector:
    context = ssl.create_default_context(cafile=cafile)
    return urllib.request.build_opener(_HttpsOnlyRedirects(), urllib.request.HTTPSHandler(context=context))


def _stream(response: IO[bytes], target: IO[bytes], label: str, total: int | None) -> str:
    """Copy in bounded chunks, hashing on the way; a short read against a known length is an error."""
    digest = hashlib.sha256()
    progress = Progress(label, total)
    while chunk := response.read(CHUNK):
        digest.update(chunk)
        target.write(chunk)
        progress.update(len(chunk))
    progress.finish()
    if total is not None and progress.done != total:
        raise InfrastructureError(
            f"{label}: connection closed after {progress.done} of {total} bytes", reason="DownloadFailed"
        )
    return digest.hexdigest()


def verify_digest(actual: str, expected: str, what: str) -> None:
    """Raise BadInputError (DigestMismatch) unless the two hex digests are equal."""
    if actual != expected:
        raise BadInputError(
            f"{what}: SHA-256 mismatch: expected {expected}, got {actual}; the file was not used",
            reason="DigestMismatch",
            details={"expected": expected, "actual": actual},
        )


def _fetch_https(url: str, target: IO[bytes], timeout: float) -> str:
    opener = _https_opener(os.environ.get("EDGEMODEL_CA_BUNDLE"))
    try:
        with opener.open(url, timeout=timeout) as response:
            length = response.headers.get("Content-Length")
            return _stream(response, target, f"download {url}", int(length) if length else None)
    except urllib.error.HTTPError as error:
        kind = BadInputError if error.code in {400, 401, 403, 404, 410} else InfrastructureError
        raise kind(f"{url}: HTTP {error.code} {error.reason}", reason="DownloadFailed") from error
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as error:
        reason = getattr(error, "reason", error)
        raise InfrastructureError(f"{url}: download failed: {reason}", reason="DownloadFailed") from error


def _fetch_oci(reference: str, target: IO[bytes]) -> str:
    from edgemodel_runtime.build.oci import pull_artifact

    pulled = pull_artifact(reference)
    try:
        if len(pulled.files) != 1:
            raise BadInputError(
                f"oci://{reference} holds {len(pulled.files)} files; expected exactly one", reason="InvalidArtifact"
            )
        with pulled.files[0].open("rb") as source:
            return _stream(source, target, f"copy oci://{reference}", pulled.files[0].stat().st_size)
    finally:
        shutil.rmtree(pulled.directory, ignore_errors=True)


def _fetch_path(path: str, target: IO[bytes]) -> str:
    try:
        with open(path, "rb") as source:
            return _stream(source, target, f"read {path}", os.fstat(source.fileno()).st_size)
    except FileNotFoundError as error:
        raise BadInputError(f"{path}: no such file", reason="ModelNotFound") from error
    except IsADirectoryError as error:
        raise BadInputError(f"{path}: is a directory, expected a file", reason="ModelNotFound") from error


def fetch(uri: str, sha256: str, destination: Path, *, allow_local: bool = True, timeout: float = 60) -> Path:
    """Fetch `uri` to `destination`, streaming with bounded memory, and verify its digest.

    The file appears at `destination` only once its digest matched; on any failure nothing is left.
    """
    expected = check_digest(sha256)
    source = parse_source(uri, allow_local=allow_local)
    destination.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(dir=destination.parent, prefix=".fetch-", delete=False)  # noqa: SIM115
    try:
        with handle:
            if source.kind == "https":
                actual = _fetch_https(source.location, handle, timeout)
            elif source.kind == "oci":
                actual = _fetch_oci(source.location, handle)
            else:
                actual = _fetch_path(source.location, handle)
        verify_digest(actual, expected, uri)
        os.replace(handle.name, destination)
    except BaseException:
        Path(handle.name).unlink(missing_ok=True)
        raise
    return destination
