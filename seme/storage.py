"""Object storage (S3): verified, cached, resumable fetch and manifest-last publish.

A published checkpoint is an S3 prefix holding the files and a reference list of their sha256:
``seme_manifest.json`` (``"files": [{"path", "sha256", "bytes"}]``, written by ``seme merge``) or
``SHA256SUMS`` (``sha256sum`` format, for checkpoints published by others). ``fetch`` verifies every
file against it before the directory is used, and downloads *only* the files it lists: any other
object under the prefix (say an added ``model.safetensors.index.json`` and an unlisted shard) is
ignored, with one warning naming them. When neither list exists the sha256 of every object is
computed on the first fetch and recorded (trust on first use: ``$SEME_CACHE_DIR/s3/trusted/``); that
record is then the reference list of every later fetch of the URI, so an object added or changed
afterwards is ignored or refused like one missing from a published list. Fetched directories are
cached under ``$SEME_CACHE_DIR/s3`` (default ``~/.cache/seme/s3``), keyed by URI and the digest of the
reference list, so a second fetch downloads nothing. A cached directory is re-verified before each
reuse: every file's (size, mtime, ctime, inode) is recorded when it is verified, and a file whose
stat identity changed since is hashed again in full (any write changes its ctime); a mismatch makes
the cache entry be fetched again (or, for a ``dest`` directory, is refused naming the file).

Downloads run in parallel (one worker per file), each retried with backoff and resumed with ranged
GETs from where it stopped; a transfer cut off after all retries keeps its partial files (hidden
``.partial`` sibling) so the next fetch resumes. A checksum mismatch or a missing object removes the
partial download. Object keys with ``..``, ``.`` or absolute parts are refused.

``publish`` uploads regular files only and refuses a symlink that resolves outside the directory
(naming the link), so a link to ``~/.aws/credentials`` never leaves the machine.

The endpoint comes from ``endpoint_url`` or ``AWS_ENDPOINT_URL_S3``; credentials from the usual boto3
chain. Credentials are never printed or logged: messages name only bucket, key and endpoint (with any
``user:password@`` in the endpoint URL masked), and botocore's debug logging (which shows the access
key id) is held at INFO unless ``SEME_LOG_BOTO=1``.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seme.errors import OutputError, StorageError, redact_url
from seme.fsutil import sha256_file

log = logging.getLogger(__name__)

MANIFEST = "seme_manifest.json"
SHA256SUMS = "SHA256SUMS"
RECORD = ".seme_fetch.json"  # written into every fetched directory; never published
MULTIPART_THRESHOLD = 8 << 20  # S3 parts must be >= 5 MiB (except the last)
MULTIPART_CHUNK = 8 << 20
_READ_CHUNK = 1 << 20
_HEX64 = re.compile(r"[0-9a-fA-F]{64}")


@dataclass(frozen=True)
class _Object:
    rel: str  # path relative to the prefix, validated
    key: str
    size: int
    etag: str


class _Interrupted(Exception):
    """A transfer failed after all retries (network): the partial files are kept for a resume."""


# ------------------------------------------------------------------------------------------------
# URIs, keys, clients
# ------------------------------------------------------------------------------------------------


def is_s3_uri(path_or_uri: str | os.PathLike) -> bool:
    return str(path_or_uri).startswith("s3://")


def parse_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix/`` -> ``("bucket", "some/prefix")``."""
    if not is_s3_uri(uri):
        raise StorageError(f"not an s3:// URI: {uri}")
    bucket, _, prefix = uri[len("s3://") :].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in URI {uri}")
    return bucket, prefix.strip("/")


def safe_relpath(rel: str, where: str) -> str:
    """Validate a path relative to a prefix (object key or manifest entry); refuse escapes."""
    if not rel or rel.startswith("/") or "\\" in rel or "\x00" in rel:
        raise StorageError(f"refusing unsafe object key {where!r}: absolute or malformed path")
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"refusing unsafe object key {where!r}: contains '..', '.' or an empty part")
    return rel


def _endpoint(endpoint_url: str | None) -> str | None:
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or None


def _shown(endpoint_url: str | None) -> str:
    """The endpoint as messages show it: any ``user:password@`` masked."""
    ep = _endpoint(endpoint_url)
    return redact_url(ep) if ep else "default AWS"


def _quiet_boto() -> None:
    """Keep botocore's DEBUG records (request headers name the access key id) out of the logs."""
    if os.environ.get("SEME_LOG_BOTO") == "1":
        return
    for name in ("botocore", "boto3", "s3transfer", "urllib3"):
        lg = logging.getLogger(name)
        if lg.getEffectiveLevel() < logging.INFO:
            lg.setLevel(logging.INFO)


def _client(endpoint_url: str | None, pool: int = 16) -> Any:
    import boto3
    from botocore.config import Config

    _quiet_boto()
    cfg = Config(
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=60,
        max_pool_connections=pool,
    )
    try:
        return boto3.session.Session().client("s3", endpoint_url=_endpoint(endpoint_url), config=cfg)
    except Exception as e:  # noqa: BLE001 - bad endpoint URL, region...: name the endpoint, never creds
        raise StorageError(
            redact_url(f"cannot create an S3 client for endpoint {_shown(endpoint_url)}: {e}")
        ) from None


def _describe(e: BaseException, what: str, endpoint_url: str | None) -> StorageError:
    """Turn a boto/botocore exception into a one-line StorageError naming the object."""
    from botocore.exceptions import ClientError, EndpointConnectionError, NoCredentialsError

    if isinstance(e, ClientError):
        err = e.response.get("Error", {})
        code = err.get("Code", "?")
        if code in ("NoSuchKey", "404", "NotFound"):
            return StorageError(f"{what}: no such object")
        if code == "NoSuchBucket":
            return StorageError(f"{what}: no such bucket")
        if code in ("AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{what}: access denied ({code}); check the S3 credentials")
        return StorageError(f"{what}: S3 error {code}")
    if isinstance(e, EndpointConnectionError):
        return StorageError(f"{what}: cannot reach S3 endpoint {_shown(endpoint_url)}")
    if isinstance(e, NoCredentialsError):
        return StorageError(f"{what}: no S3 credentials found (AWS_ACCESS_KEY_ID / profile)")
    detail = redact_url(" ".join(str(e).split()))[:200]  # URLs and keys; a password in a URL is masked
    return StorageError(f"{what}: {type(e).__name__}: {detail}")


def _boto_errors() -> tuple[type[BaseException], ...]:
    """The exception types a boto3 S3 call raises (client, transport, s3transfer)."""
    import boto3.exceptions
    import botocore.exceptions

    return (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError, boto3.exceptions.Boto3Error)


def _transient(e: BaseException) -> bool:
    """Network failures worth a retry/resume (connection refused, reset, cut mid-body, 5xx, throttling)."""
    import botocore.exceptions as bx
    import urllib3.exceptions as ux

    if isinstance(e, bx.ClientError):
        status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or e.response.get("Error", {}).get("Code") in ("SlowDown", "RequestTimeout")
    return isinstance(
        e,
        bx.ConnectionError
        | bx.HTTPClientError
        | bx.ResponseStreamingError
        | bx.IncompleteReadError
        | ux.HTTPError
        | ConnectionError
        | TimeoutError,
    )


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    base = os.environ.get("SEME_CACHE_DIR")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "seme") / "s3"


@contextlib.contextmanager
def _locked(path: Path, remove: bool = False) -> Iterator[None]:
    """Exclusive lock so two processes fetching the same URI do not write the same files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            if remove:  # no lock litter next to a user's directory (a waiter then re-checks the dir)
                path.unlink(missing_ok=True)
            fcntl.flock(fh, fcntl.LOCK_UN)


# ------------------------------------------------------------------------------------------------
# Reference lists (manifest / SHA256SUMS)
# ------------------------------------------------------------------------------------------------


def manifest_files(manifest: dict[str, Any], where: str) -> dict[str, tuple[str, int | None]]:
    """``{path: (sha256, bytes|None)}`` from a seme manifest (``files``, or ``outputs`` as an alias)."""
    if not isinstance(manifest, dict):
        raise StorageError(f"{where}: a manifest must be a JSON object, not {type(manifest).__name__}")
    entries = manifest.get("files", manifest.get("outputs"))
    if entries is None:
        raise StorageError(f"{where}: manifest has no 'files' list")
    if not isinstance(entries, list | dict):
        raise StorageError(f"{where}: 'files' must be a list of {{path, sha256, bytes}}, not {entries!r:.60}")
    out: dict[str, tuple[str, int | None]] = {}
    items = entries.items() if isinstance(entries, dict) else ((None, e) for e in entries)
    for name, e in items:
        if isinstance(e, str):  # {"path": "sha"} form
            path, sha, size = name, e, None
        elif isinstance(e, dict):
            path, sha, size = e.get("path", name), e.get("sha256"), e.get("bytes")
        else:
            raise StorageError(f"{where}: malformed manifest entry {e!r:.100}")
        if not isinstance(path, str) or not isinstance(sha, str) or not _HEX64.fullmatch(sha):
            raise StorageError(f"{where}: manifest entry without path/sha256: {e!r:.100}")
        if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 0):
            raise StorageError(f"{where}: manifest entry {path!r}: 'bytes' must be a size, not {size!r:.40}")
        out[safe_relpath(path, f"{where}: {path}")] = (sha.lower(), size)
    if not out:
        raise StorageError(f"{where}: the manifest lists no files")
    return out


def parse_sha256sums(text: str, where: str) -> dict[str, tuple[str, int | None]]:
    """Parse ``sha256sum`` output (``<hex>  <path>`` or ``<hex> *<path>``)."""
    out: dict[str, tuple[str, int | None]] = {}
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        sha, _, path = line.partition(" ")
        path = path.lstrip(" ").removeprefix("*").removeprefix("./")
        if not _HEX64.fullmatch(sha) or not path:
            raise StorageError(f"{where}: malformed line {i}: {line[:80]!r}")
        out[safe_relpath(path, f"{where}: {path}")] = (sha.lower(), None)
    if not out:
        raise StorageError(f"{where}: lists no files")
    return out


def format_sha256sums(sums: dict[str, str]) -> str:
    return "".join(f"{sha}  {path}\n" for path, sha in sorted(sums.items()))


# ------------------------------------------------------------------------------------------------
# Fetch
# ------------------------------------------------------------------------------------------------


def _list(s3: Any, bucket: str, prefix: str, uri: str, endpoint_url: str | None) -> dict[str, _Object]:
    pfx = f"{prefix}/" if prefix else ""
    objs: dict[str, _Object] = {}
    try:
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=pfx):
            for o in page.get("Contents", []):
                key = o["Key"]
                if key.endswith("/") and o["Size"] == 0:  # "directory" marker
                    continue
                rel = safe_relpath(key[len(pfx) :], f"s3://{bucket}/{key}")
                objs[rel] = _Object(rel, key, int(o["Size"]), o.get("ETag", "").strip('"'))
    except _boto_errors() as e:
        raise _describe(e, f"listing {uri}", endpoint_url) from None
    if not objs:
        raise StorageError(f"{uri}: no objects under this prefix (missing prefix?)")
    return objs


def _get_bytes(s3: Any, bucket: str, key: str, endpoint_url: str | None) -> bytes:
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except _boto_errors() as e:
        raise _describe(e, f"s3://{bucket}/{key}", endpoint_url) from None


def _download(
    s3: Any,
    bucket: str,
    obj: _Object,
    staging: Path,
    expected: str | None,
    retries: int,
    backoff: float,
    progress: Any,
) -> str:
    """Download one object into ``staging`` (resuming a ``.part`` file); verify; return its sha256."""
    from botocore.exceptions import ClientError

    done = staging / obj.rel
    if done.is_file() and done.stat().st_size == obj.size:  # verified and renamed by an earlier try
        digest = sha256_file(done)  # hashed again: it may have been damaged on disk since
        if expected is None or digest == expected:
            progress.update(obj.size)
            return digest
        log.warning("%s: damaged since it was verified; downloading it again", done)
        done.unlink()
    part = done.with_name(done.name + ".part")
    part.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    offset = part.stat().st_size if part.exists() else 0
    if offset > obj.size:
        part.unlink()
        offset = 0
    if offset:
        log.info("resuming s3://%s/%s at byte %d of %d", bucket, obj.key, offset, obj.size)
        with open(part, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
        progress.update(offset)
    failures = 0
    with open(part, "ab") as out:
        while offset < obj.size:
            try:
                resp = s3.get_object(
                    Bucket=bucket,
                    Key=obj.key,
                    Range=f"bytes={offset}-",
                    **({"IfMatch": obj.etag} if obj.etag else {}),
                )
                for chunk in resp["Body"].iter_chunks(_READ_CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    offset += len(chunk)
                    progress.update(len(chunk))
                    failures = 0
                out.flush()
                if offset < obj.size:  # body ended early without an exception
                    raise ConnectionError(f"short read at byte {offset} of {obj.size}")
            except Exception as e:  # noqa: BLE001 - classified below: transient -> resume, else fail
                out.flush()
                if isinstance(e, ClientError):
                    code = e.response.get("Error", {}).get("Code")
                    if code in ("PreconditionFailed", "412"):
                        raise StorageError(
                            f"s3://{bucket}/{obj.key} changed while it was being fetched; fetch again"
                        ) from None
                if not _transient(e):
                    raise _describe(e, f"s3://{bucket}/{obj.key}", None) from None
                failures += 1
                if failures > retries:
                    raise _Interrupted(
                        f"s3://{bucket}/{obj.key}: transfer interrupted at byte {offset} of {obj.size} "
                        f"after {retries} retries ({type(e).__name__})"
                    ) from None
                wait = backoff * 2 ** (failures - 1)
                log.warning(
                    "s3://%s/%s: %s at byte %d; retry %d/%d in %.1f s",
                    bucket, obj.key, type(e).__name__, offset, failures, retries, wait,
                )  # fmt: skip
                time.sleep(wait)
                out.seek(0, os.SEEK_END)
                offset = out.tell()
    digest = h.hexdigest()
    if expected is not None and digest != expected:
        raise StorageError(
            f"checksum mismatch for s3://{bucket}/{obj.key}: sha256 {digest[:12]}… != expected {expected[:12]}…"
        )
    part.rename(done)
    return digest


def _tqdm(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="B", unit_scale=True, desc=desc, disable=None, leave=False)


def fetch(
    uri: str,
    cache_dir: str | os.PathLike | None = None,
    endpoint_url: str | None = None,
    *,
    dest: str | os.PathLike | None = None,
    workers: int = 8,
    retries: int = 5,
    backoff: float = 0.5,
    also_fetch: frozenset[str] = frozenset(),
) -> Path:
    """Fetch the checkpoint prefix ``uri`` into a verified local directory and return its path.

    Without ``dest`` the directory lives in the cache (``cache_dir`` or ``$SEME_CACHE_DIR/s3``) and
    a second fetch of the same URI and manifest downloads nothing. With ``dest`` the verified
    directory is placed exactly there (an existing ``dest`` from the same fetch is reused).
    ``also_fetch``: objects not in the reference list that the caller checks itself (e.g. a registered
    version's MLflow files, against the registry): downloaded too, their sha256 computed and recorded.
    """
    bucket, prefix = parse_uri(uri)
    uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    s3 = _client(endpoint_url, pool=max(workers, 4) + 2)
    objs = _list(s3, bucket, prefix, uri, endpoint_url)

    # The reference list decides both what "verified" means and the cache key.
    ref_raw: bytes | None = None
    if MANIFEST in objs:
        ref_name = MANIFEST
        ref_raw = _get_bytes(s3, bucket, objs[MANIFEST].key, endpoint_url)
        try:
            manifest = json.loads(ref_raw)
        except ValueError:
            raise StorageError(f"{uri}/{MANIFEST}: not valid JSON") from None
        expected: dict[str, tuple[str, int | None]] | None = manifest_files(manifest, f"{uri}/{MANIFEST}")
    elif SHA256SUMS in objs:
        ref_name = SHA256SUMS
        ref_raw = _get_bytes(s3, bucket, objs[SHA256SUMS].key, endpoint_url)
        expected = parse_sha256sums(ref_raw.decode("utf-8", "replace"), f"{uri}/{SHA256SUMS}")
    else:
        trust = _trust_path(uri, cache_dir)
        expected = _read_trust(trust, uri)
        ref_name = f"the sha256 list recorded at its first fetch ({trust})" if expected else "computed"
    if ref_raw is not None:
        digest = hashlib.sha256(ref_raw).hexdigest()
    else:  # trust on first use: one cache entry per URI, checked against the recorded list
        digest = hashlib.sha256(f"trusted:{uri}".encode()).hexdigest()
    key = hashlib.sha256(f"{uri}\n{digest}".encode()).hexdigest()[:16]

    if dest is not None:
        final = Path(dest).expanduser().absolute()
    else:
        final = _cache_root(cache_dir).absolute() / bucket / f"{prefix.replace('/', '__') or '_root'}-{key}"
    staging = final.parent / f".{final.name}.partial-{key}"

    with _locked(final.parent / f".{final.name}.lock", remove=dest is not None):
        if final.exists():
            bad = _cached_bad(final, key, expected)
            if bad is None:
                log.info("%s: cached at %s", uri, final)
                return final
            if dest is not None:
                raise OutputError(f"{final} already exists and is not a verified fetch of {uri}: {bad}")
            log.warning("%s: cached copy %s is damaged (%s); fetching it again", uri, final, bad)
            shutil.rmtree(final)
        for stale in final.parent.glob(f".{final.name}.partial-*"):  # partials of an older version
            if stale != staging:
                shutil.rmtree(stale, ignore_errors=True)

        # Every object listed in the reference must exist, with the listed size; nothing else is fetched
        # (but also_fetch, which the caller verifies).
        to_get: dict[str, str | None] = {}
        if expected is not None:
            for rel, (sha, size) in sorted(expected.items()):
                if rel not in objs:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise StorageError(f"s3://{bucket}/{prefix}/{rel}: no such object (listed in {ref_name})")
                if size is not None and objs[rel].size != size:
                    shutil.rmtree(staging, ignore_errors=True)
                    raise StorageError(
                        f"size mismatch for s3://{bucket}/{objs[rel].key}: {objs[rel].size} bytes, "
                        f"{ref_name} says {size}"
                    )
                to_get[rel] = sha
            unlisted = sorted(r for r in objs if r not in to_get and r not in (MANIFEST, SHA256SUMS, RECORD))
            for r in unlisted:
                if r in also_fetch:  # the caller checks these itself (e.g. against the registry)
                    to_get[r] = None
            unlisted = [r for r in unlisted if r not in also_fetch]
            if unlisted:
                shown = ", ".join(unlisted[:5]) + (f" and {len(unlisted) - 5} more" if len(unlisted) > 5 else "")
                log.warning(
                    "%s: ignoring %d object(s) not listed in %s (never downloaded or used): %s",
                    uri, len(unlisted), ref_name, shown,
                )  # fmt: skip
        else:
            to_get = {r: None for r in sorted(objs) if r not in (MANIFEST, SHA256SUMS, RECORD)}

        staging.mkdir(parents=True, exist_ok=True)
        total = sum(objs[r].size for r in to_get)
        got: dict[str, str] = {}
        try:
            with _tqdm(total, f"fetch {uri}") as bar, cf.ThreadPoolExecutor(max(1, workers)) as pool:
                futs = {
                    pool.submit(_download, s3, bucket, objs[r], staging, sha, retries, backoff, bar): r
                    for r, sha in to_get.items()
                }
                try:
                    for fut in cf.as_completed(futs):
                        got[futs[fut]] = fut.result()
                except BaseException:
                    for f in futs:
                        f.cancel()
                    raise
        except _Interrupted as e:
            raise StorageError(f"{e}; partial download kept, run the fetch again to resume") from None
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

        if ref_raw is not None:
            (staging / ref_name).write_bytes(ref_raw)
        record = {
            "uri": uri,
            "endpoint": redact_url(_endpoint(endpoint_url) or "") or None,
            "cache_key": key,
            "reference": ref_name,
            "reference_sha256": digest if ref_raw is not None else None,
            "files": {
                r: {"sha256": got[r], "bytes": objs[r].size, "stat": _stat_id(staging / r)} for r in sorted(got)
            },
            "fetched": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        (staging / RECORD).write_text(json.dumps(record, indent=2))
        if expected is None:  # first fetch of a prefix without a reference list: record what we got
            _write_trust(_trust_path(uri, cache_dir), uri, {r: (got[r], objs[r].size) for r in got})
        staging.rename(final)
    log.info("%s: fetched %d files (%d bytes), verified against %s", uri, len(got), total, ref_name)
    return final


def get_manifest_bytes(uri: str, endpoint_url: str | None = None) -> bytes | None:
    """The raw ``seme_manifest.json`` of a published prefix (one small GET), or None when it has none."""
    from botocore.exceptions import ClientError

    bucket, prefix = parse_uri(uri)
    key = f"{prefix}/{MANIFEST}" if prefix else MANIFEST
    s3 = _client(endpoint_url, pool=2)
    try:
        return s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404", "NotFound"):
            return None
        raise _describe(e, f"s3://{bucket}/{key}", endpoint_url) from None
    except _boto_errors() as e:
        raise _describe(e, f"s3://{bucket}/{key}", endpoint_url) from None


def get_manifest(uri: str, endpoint_url: str | None = None) -> dict[str, Any] | None:
    """The ``seme_manifest.json`` of a published prefix (one small GET), or None when it has none."""
    raw = get_manifest_bytes(uri, endpoint_url)
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        raise StorageError(f"{uri}/{MANIFEST}: not valid JSON") from None


def _stat_id(p: Path) -> list[int]:
    """What changes when a file is written or replaced: size, mtime, ctime (not settable) and inode."""
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def _cached_bad(path: Path, key: str, expected: dict[str, tuple[str, int | None]] | None) -> str | None:
    """Why the fetched directory ``path`` cannot be reused (None: it can).

    Every file is re-verified: one whose stat identity is the one recorded at verification is
    trusted, any other is hashed in full against the recorded sha256 (and its new stat recorded).
    Files that are neither recorded nor the reference list make the directory unusable too.
    """
    try:
        rec = json.loads((path / RECORD).read_text())
        files = rec["files"]
        if rec.get("cache_key") != key or not isinstance(files, dict):
            return "it was fetched from another URI or version"
    except (OSError, ValueError, KeyError, TypeError):
        return f"no readable {RECORD}"
    if expected is not None:
        if set(files) != set(expected):
            return "its files are not the ones the reference list names"
        for r, (sha, _size) in expected.items():
            if files[r].get("sha256") != sha:
                return f"{r} was verified against another sha256"
    allowed = {*files, MANIFEST, SHA256SUMS, RECORD}
    for p in sorted(path.rglob("*")):
        rel = p.relative_to(path).as_posix()
        if p.is_symlink() or (not p.is_dir() and rel not in allowed):
            return f"{p} was not fetched"
    changed = False
    for r, f in sorted(files.items()):
        p = path / r
        if not p.is_file() or p.is_symlink():
            return f"{p} is missing"
        stamp = _stat_id(p)
        if stamp == f.get("stat"):
            continue
        if p.stat().st_size != f.get("bytes") or sha256_file(p) != f.get("sha256"):
            return f"{p} changed on disk since it was verified (sha256 mismatch)"
        f["stat"], changed = stamp, True
    if changed:  # verified again: remember the new stat identity
        with contextlib.suppress(OSError):
            tmp = path / f".{RECORD}.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(rec, indent=2))
            tmp.replace(path / RECORD)
    return None


def _trust_path(uri: str, cache_dir: str | os.PathLike | None) -> Path:
    """Where the sha256 list of a prefix without a reference list is recorded at its first fetch."""
    return _cache_root(cache_dir).absolute() / "trusted" / (hashlib.sha256(uri.encode()).hexdigest()[:24] + ".json")


def _read_trust(path: Path, uri: str) -> dict[str, tuple[str, int | None]] | None:
    try:
        rec = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        raise StorageError(f"{path}: unreadable sha256 record of {uri}; remove it to fetch {uri} afresh") from None
    if not isinstance(rec, dict) or rec.get("uri") != uri:
        raise StorageError(f"{path}: not the sha256 record of {uri}; remove it to fetch {uri} afresh")
    return manifest_files(rec, str(path))


def _write_trust(path: Path, uri: str, files: dict[str, tuple[str, int]]) -> None:
    rec = {
        "uri": uri,
        "note": "sha256 recorded at the first fetch; later fetches accept only these files",
        "recorded": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": [{"path": r, "sha256": sha, "bytes": size} for r, (sha, size) in sorted(files.items())],
    }
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(rec, indent=2))
        tmp.replace(path)
    except OSError as e:
        log.warning("%s: cannot record the sha256 list of %s (%s)", path, uri, e.strerror)


def resolve_model_path(path_or_uri: str | os.PathLike) -> Path:
    """A local path unchanged; an ``s3://`` URI fetched (verified, cached) to a local directory."""
    if is_s3_uri(path_or_uri):
        return fetch(str(path_or_uri))
    return Path(path_or_uri).expanduser()


# ------------------------------------------------------------------------------------------------
# Publish
# ------------------------------------------------------------------------------------------------


def _local_files(root: Path) -> list[str]:
    """The files to publish under ``root`` (relative paths), refusing anything that is not a regular
    file inside it: a symlink that resolves outside ``root`` (or to a directory), a FIFO, a device."""
    real_root = root.resolve()
    out = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        d = Path(dirpath)
        for name in sorted(dirnames + filenames):
            p = d / name
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                target = p.resolve()
                if not target.is_relative_to(real_root):
                    raise StorageError(
                        f"{p}: a symlink to {os.readlink(p)} outside {root}; refusing to publish it "
                        "(copy the file into the directory if it belongs there)"
                    )
                if target.is_dir():
                    raise StorageError(f"{p}: a symlink to a directory; refusing to publish it")
            elif name in dirnames:
                continue
            if rel == RECORD or name.endswith(".part"):
                continue
            if not p.is_file():
                raise StorageError(f"{p}: not a regular file; refusing to publish it")
            out.append(safe_relpath(rel, str(p)))
    return sorted(out)


def publish(
    local_dir: str | os.PathLike, uri: str, endpoint_url: str | None = None, *, workers: int = 4
) -> dict:
    """Upload a checkpoint directory to ``uri``, verified, with the manifest written last.

    Local files are first checked against ``seme_manifest.json`` / ``SHA256SUMS`` (a ``SHA256SUMS``
    is computed when neither exists). An existing remote manifest is deleted before any file is
    replaced, and the new one is uploaded after every file, so a reader never sees a manifest for
    files that are not all there. Large files go up as multipart uploads.
    """
    from boto3.s3.transfer import TransferConfig

    root = Path(local_dir).expanduser()
    if not root.is_dir():
        raise StorageError(f"{root}: not a directory")
    bucket, prefix = parse_uri(uri)
    pfx = f"{prefix}/" if prefix else ""
    uri = f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"
    files = _local_files(root)
    if not files:
        raise StorageError(f"{root}: nothing to publish")

    # Verify the local directory against its own reference before anything leaves the machine.
    if MANIFEST in files:
        try:
            ref = manifest_files(json.loads((root / MANIFEST).read_text()), str(root / MANIFEST))
        except ValueError:
            raise StorageError(f"{root / MANIFEST}: not valid JSON") from None
        refs = [MANIFEST]
    elif SHA256SUMS in files:
        ref = parse_sha256sums((root / SHA256SUMS).read_text(), str(root / SHA256SUMS))
        refs = [SHA256SUMS]
    else:
        ref, refs = {}, []
    sums: dict[str, str] = {}
    for rel in files:
        if rel in refs:
            continue
        sha = sha256_file(root / rel)
        sums[rel] = sha
        if rel in ref and ref[rel][0] != sha:
            raise StorageError(f"{root / rel}: sha256 does not match {refs[0]}; refusing to publish")
    missing = sorted(set(ref) - set(files))
    if missing:
        raise StorageError(f"{root}: {refs[0]} lists {missing[0]} but the file is missing")
    extra_ref: bytes | None = None
    if not refs:
        extra_ref = format_sha256sums(sums).encode()

    s3 = _client(endpoint_url, pool=workers * 4 + 2)
    cfg = TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNK,
        max_concurrency=4,
        use_threads=True,
    )
    # Take the old manifest down first: from here until the end, readers see "not published".
    for name in (MANIFEST, SHA256SUMS):
        try:
            s3.delete_object(Bucket=bucket, Key=pfx + name)
        except _boto_errors() as e:
            raise _describe(e, f"s3://{bucket}/{pfx}{name}", endpoint_url) from None

    def put(rel: str) -> None:
        try:
            s3.upload_file(str(root / rel), bucket, pfx + rel, Config=cfg)
        except _boto_errors() as e:
            raise _describe(e, f"uploading {root / rel} to s3://{bucket}/{pfx}{rel}", endpoint_url) from None

    data = [r for r in files if r not in refs]
    total = sum((root / r).stat().st_size for r in data)
    with _tqdm(total, f"publish {uri}") as bar, cf.ThreadPoolExecutor(max(1, workers)) as pool:
        for rel, _ in zip(data, pool.map(put, data), strict=True):
            bar.update((root / rel).stat().st_size)
    # The reference goes last.
    try:
        if extra_ref is not None:
            s3.put_object(Bucket=bucket, Key=pfx + SHA256SUMS, Body=extra_ref)
        for name in refs:
            s3.upload_file(str(root / name), bucket, pfx + name, Config=cfg)
    except _boto_errors() as e:
        raise _describe(e, f"writing the manifest of {uri}", endpoint_url) from None
    log.info("published %s -> %s (%d files, %d bytes)", root, uri, len(data), total)
    return {
        "uri": uri,
        "files": len(data),
        "bytes": total,
        "reference": refs[0] if refs else SHA256SUMS,
        "sha256": sums,
    }
