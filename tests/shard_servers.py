"""Loopback servers for shards on object storage: a small HTTP server that injects faults, and
moto's S3-compatible server. Both listen on 127.0.0.1 only and stop with the test."""

from __future__ import annotations

import collections
import http.server
import os
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import requests

from pretrain.engine.launcher import find_free_port

# The longest a stalled response holds its connection open (the server's own bound).
STALL_LIMIT_S = 60


class FaultServer:
    """Serves the files of ``root`` at ``/<fault>/<name>``, where the fault is:

    ``ok`` (the file), ``stall`` (accept, read the request, never answer), ``busy`` (HTTP 503),
    ``reset`` (headers with the full length, half the bytes, then a TCP reset).
    ``requests`` counts the requests per path, ``times`` holds when each came.
    """

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.requests: collections.Counter[str] = collections.Counter()
        self.times: collections.defaultdict[str, list[float]] = collections.defaultdict(list)
        self.stopping = threading.Event()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                server.requests[self.path] += 1
                server.times[self.path].append(time.monotonic())
                fault, _, name = self.path.lstrip("/").partition("/")
                if fault == "stall":
                    server.stopping.wait(STALL_LIMIT_S)
                    return
                if fault == "busy":
                    self.send_error(503)
                    return
                path = server.root / name
                if not path.is_file():
                    self.send_error(404)
                    return
                body = path.read_bytes()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "reset":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                               struct.pack("ii", 1, 0))
                    self.connection.close()
                    return
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]

    def url(self, fault: str, name: str) -> str:
        return f"http://127.0.0.1:{self.port}/{fault}/{name}"

    def __enter__(self) -> FaultServer:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()


class S3Server:
    """moto's S3-compatible server on a free loopback port, in its own process; ``env`` is
    what a client (boto3, and the jobs the tests start) needs to reach it."""

    def __init__(self) -> None:
        self.port = find_free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.env = {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": "testing",
                    "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> S3Server:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **self.env})
        deadline = time.monotonic() + 30
        while True:
            try:
                requests.get(self.endpoint, timeout=1)
                return self
            except requests.ConnectionError:
                if time.monotonic() > deadline or self.process.poll() is not None:
                    self.__exit__()
                    raise RuntimeError("moto's S3 server did not start") from None
                time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def client(self):  # noqa: ANN201 (boto3 is imported late)
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id="testing",
                            aws_secret_access_key="testing", region_name="us-east-1")

    def upload(self, bucket: str, folder: Path) -> None:
        """Every file of ``folder`` (shards, sizes.json, _stats.json) under the bucket's root."""
        client = self.client()
        client.create_bucket(Bucket=bucket)
        for path in sorted(Path(folder).iterdir()):
            client.upload_file(str(path), bucket, path.name)
