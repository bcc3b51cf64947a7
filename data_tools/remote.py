"""Opening a shard wherever it lives, with every wait bounded.

A shard URL is a local path, ``http(s)://...``, ``s3://bucket/key`` or ``pipe:COMMAND`` (the
command's standard output is the tar, as webdataset's ``pipe:`` URLs: ``pipe:curl -s ...``,
``pipe:aws s3 cp s3://... -``, ``pipe:gsutil cat gs://...``). Remote shards are read through
well-kept clients: ``requests`` for HTTP, boto3 (the S3 API, any S3-compatible store: set
``AWS_ENDPOINT_URL``) for ``s3://``.

What a :class:`RemotePolicy` bounds (webdataset's own opener runs curl with a connect timeout
and 30 retries 2 s apart, but no read timeout, so a server that accepts and never sends held a
rank forever, and a 503 froze it a minute per draw):

* ``read_timeout``: no byte for that long ends the attempt (the wait for the response too);
* ``connect_timeout``: for the TCP connection (HTTP, S3);
* ``retries``: failures before the first byte (refused, reset, timed out, HTTP 5xx / 429,
  S3 throttling, a pipe command that failed without output) are retried that many times,
  ``backoff`` seconds after the first and doubling up to ``max_backoff``; a definite answer
  (HTTP 404, S3 NoSuchKey / AccessDenied) is not retried.

A shard that fails after its first byte (a reset or a stall mid-shard) cannot be retried
without repeating samples: the read raises and the caller ends that shard there.
"""

from __future__ import annotations

import os
import select
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Any, BinaryIO, Protocol

import requests

REMOTE_PREFIXES = ("http://", "https://", "s3://", "pipe:")


@dataclass(frozen=True)
class RemotePolicy:
    connect_timeout: float = 20.0
    read_timeout: float = 60.0
    retries: int = 3
    backoff: float = 1.0
    max_backoff: float = 16.0

    def worst_case_s(self) -> float:
        """The longest one shard can hold a reader before it is given up on."""
        waits = sum(min(self.backoff * 2**i, self.max_backoff) for i in range(self.retries))
        per_attempt = self.connect_timeout + self.read_timeout
        return (self.retries + 1) * per_attempt + waits


class ShardUnavailable(OSError):
    """A shard that could not be opened within the policy (the reason names why)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(f"{url}: {reason}")
        self.url, self.reason = url, reason


class _Definite(Exception):
    """A failure that retrying will not change (not found, forbidden)."""


class Readable(Protocol):
    def read(self, size: int = -1) -> bytes: ...

    def close(self) -> None: ...


def is_remote(url: str) -> bool:
    return url.startswith(REMOTE_PREFIXES)


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:")


def open_shard(url: str, policy: RemotePolicy) -> Readable | BinaryIO:
    """The shard's bytes as a stream; raises :class:`ShardUnavailable` once its retries are
    spent. Reads of a remote stream raise ``OSError`` / ``requests`` / botocore errors when
    the bytes stop for ``read_timeout`` or the connection breaks."""
    if is_local(url):
        try:
            return open(url, "rb")  # noqa: SIM115 (the caller closes it)
        except OSError as error:  # deleted or unreadable since start-up: skipped like others
            raise ShardUnavailable(url, describe_error(error)) from None
    opener = _open_pipe if url.startswith("pipe:") else _open_s3 if url.startswith(
        "s3://") else _open_http
    reason = "no attempt"
    for attempt in range(policy.retries + 1):
        if attempt:
            time.sleep(min(policy.backoff * 2 ** (attempt - 1), policy.max_backoff))
        try:
            return opener(url, policy)
        except _Definite as error:
            raise ShardUnavailable(url, str(error)) from None
        except Exception as error:  # any transport failure before the first byte: retry
            reason = describe_error(error)
    raise ShardUnavailable(url, f"{reason} ({policy.retries + 1} attempts)")


def describe_error(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


# --------------------------------------------------------------------------- HTTP
def _open_http(url: str, policy: RemotePolicy) -> Readable:
    response = requests.get(url, stream=True,
                            timeout=(policy.connect_timeout, policy.read_timeout))
    if response.status_code in (408, 429) or response.status_code >= 500:
        response.close()
        raise OSError(f"HTTP {response.status_code}")
    if response.status_code >= 400:
        response.close()
        raise _Definite(f"HTTP {response.status_code}")
    return _HttpBody(response)


class _HttpBody:
    def __init__(self, response: requests.Response) -> None:
        self.response = response

    def read(self, size: int = -1) -> bytes:
        # urllib3 raises on a socket read that waits read_timeout, and on a body shorter than
        # its Content-Length (a connection reset mid-shard).
        return self.response.raw.read(None if size < 0 else size, decode_content=True)

    def close(self) -> None:
        self.response.close()


# --------------------------------------------------------------------------- S3
_s3_clients: dict[RemotePolicy, Any] = {}


def _s3_client(policy: RemotePolicy) -> Any:
    """One boto3 client per process and policy (a data worker builds its own); the endpoint,
    region and credentials come from boto3's usual sources (``AWS_ENDPOINT_URL``,
    ``AWS_REGION``, ``AWS_ACCESS_KEY_ID`` ..., ~/.aws, instance roles)."""
    if policy not in _s3_clients:
        import boto3
        from botocore.config import Config

        _s3_clients[policy] = boto3.client("s3", config=Config(
            connect_timeout=policy.connect_timeout, read_timeout=policy.read_timeout,
            retries={"total_max_attempts": 1}))  # the retries are ours, counted as for HTTP
    return _s3_clients[policy]


def _open_s3(url: str, policy: RemotePolicy) -> Readable:
    from botocore.exceptions import ClientError

    bucket, _, key = url.removeprefix("s3://").partition("/")
    try:
        return _s3_client(policy).get_object(Bucket=bucket, Key=key)["Body"]
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        if status < 500 and code not in ("SlowDown", "Throttling", "RequestTimeout"):
            raise _Definite(f"S3 {code or status}") from None
        raise


def s3_head(url: str, policy: RemotePolicy) -> int:
    """The object's size in bytes (raises :class:`ShardUnavailable` if it cannot be had)."""
    bucket, _, key = url.removeprefix("s3://").partition("/")
    try:
        return int(_s3_client(policy).head_object(Bucket=bucket, Key=key)["ContentLength"])
    except Exception as error:
        raise ShardUnavailable(url, describe_error(error)) from None


# --------------------------------------------------------------------------- pipe:
def _open_pipe(url: str, policy: RemotePolicy) -> Readable:
    """Run the command (through the shell, as webdataset does: ``pipe:`` URLs are commands the
    user wrote in the config) and wait for its first bytes. Its standard error goes to a file
    (a pipe could fill and block it), whose end becomes the reason if it fails."""
    errors = tempfile.TemporaryFile()  # noqa: SIM115 (closed with the stream)
    process = subprocess.Popen(url.removeprefix("pipe:"), shell=True,  # noqa: S602
                               stdout=subprocess.PIPE, stderr=errors)
    stream = _PipeOutput(process, errors, policy.read_timeout)
    try:
        first = stream.read(1)
        if not first:
            raise OSError("the command wrote nothing")
    except OSError:
        stream.close()
        raise
    stream.pending = first
    return stream


class _PipeOutput:
    """A command's standard output whose every read waits at most ``read_timeout``."""

    def __init__(self, process: subprocess.Popen, errors: BinaryIO, read_timeout: float) -> None:
        self.process, self.errors, self.read_timeout = process, errors, read_timeout
        self.pending = b""

    def read(self, size: int = -1) -> bytes:
        if self.pending:
            data, self.pending = self.pending, b""
            return data
        fd = self.process.stdout.fileno()
        if not select.select([fd], [], [], self.read_timeout)[0]:
            raise TimeoutError(f"no bytes for {self.read_timeout:g} s")
        data = os.read(fd, 1 << 20 if size < 0 else max(1, size))
        if not data:
            status = self.process.wait(timeout=self.read_timeout)
            if status not in (0, -13, 141):  # SIGPIPE: a reader that stopped early
                self.errors.seek(0)
                said = " ".join(self.errors.read().decode("utf-8", "replace").split())
                raise OSError(f"the command exited {status}" + (f": {said[-300:]}" if said
                                                                else ""))
        return data

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=self.read_timeout)
        self.process.stdout.close()
        self.errors.close()
