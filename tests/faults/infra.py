"""The fault tests' servers: MinIO, toxiproxy in front of it, and a small HTTP front that answers
503 SlowDown / 403 AccessDenied and triggers toxics on chosen requests.

    client (boto3 in a step) -> toxiproxy (TCP faults) -> Front (HTTP rules) -> MinIO

Toxiproxy does what a network does: resets a connection mid-body (`limit_data`), holds every byte
(`timeout`), adds latency. The front sees each request, so a fault can start at an exact moment
("the first PUT of a checkpoint") instead of after a guessed delay; it also gives the answers a
loaded S3 gives (503 SlowDown bursts) and a permission S3 refuses (403 on a prefix). MinIO and
toxiproxy-server are built by tests/infra/build_bins.sh (node group) and found in its cache.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import subprocess
import threading
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from tests.infra.controlplane import find_binary, free_port, stop_process

START_TIMEOUT_S = 60.0
REGION = "us-east-1"


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"{what} did not answer {url} within {START_TIMEOUT_S:.0f} s:\n{log.read_text()[-3000:]}")


@dataclass
class MinIO:
    """A MinIO server on loopback with a random root password (the secret the leak checks look for)."""

    endpoint_url: str
    access_key: str
    secret_key: str

    def client(self, endpoint_url: str | None = None) -> Any:
        import boto3
        from botocore.config import Config as BotoConfig

        return boto3.session.Session().client(
            "s3",
            endpoint_url=endpoint_url or self.endpoint_url,
            region_name=REGION,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            config=BotoConfig(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 3}),
        )

    def env(self, endpoint_url: str) -> dict[str, str]:
        """AWS_* variables for a step subprocess that talks to `endpoint_url` (the proxy, usually)."""
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": endpoint_url,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
            "AWS_CONFIG_FILE": os.devnull,
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }


@contextmanager
def run_minio(workdir: Path) -> Iterator[MinIO]:
    port, console = free_port(), free_port()
    user, password = "faults", secrets.token_hex(16)
    log = workdir / "minio.log"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(workdir),
        "MINIO_ROOT_USER": user,
        "MINIO_ROOT_PASSWORD": password,
        "MINIO_BROWSER": "off",
    }
    argv = [str(find_binary("minio")), "server", str(workdir / "data"), f"--address=127.0.0.1:{port}"]
    argv += [f"--console-address=127.0.0.1:{console}", f"--certs-dir={workdir / 'certs'}", "--quiet"]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        wait_http(f"http://127.0.0.1:{port}/minio/health/ready", proc, log, "minio")
        yield MinIO(f"http://127.0.0.1:{port}", user, password)
    finally:
        stop_process(proc, 10)


@dataclass
class Toxiproxy:
    """toxiproxy-server's REST API: one proxy per upstream, toxics added and removed while traffic flows."""

    api: str
    name: str = ""  # the proxy that toxics go to (the last one `proxy` made)

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.api + path, data=data, method=method)
        request.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
        return json.loads(raw) if raw else None

    def proxy(self, upstream: str) -> str:
        """A new proxy to `upstream` (host:port); returns its http:// URL."""
        name = f"p-{uuid.uuid4().hex[:8]}"
        made = self.call("POST", "/proxies", {"name": name, "listen": "127.0.0.1:0", "upstream": upstream})
        self.name = name
        return f"http://{made['listen']}"

    def add(self, kind: str, stream: str = "downstream", **attributes: Any) -> str:
        name = f"{kind}-{stream}-{uuid.uuid4().hex[:6]}"
        toxic = {"name": name, "type": kind, "stream": stream, "toxicity": 1.0, "attributes": attributes}
        self.call("POST", f"/proxies/{self.name}/toxics", toxic)
        return name

    def remove(self, name: str) -> None:
        self.call("DELETE", f"/proxies/{self.name}/toxics/{name}")

    def clear(self) -> None:
        for toxic in self.call("GET", f"/proxies/{self.name}/toxics"):
            self.remove(toxic["name"])

    def window(self, kind: str, hold_s: float, stream: str = "downstream", **attributes: Any) -> None:
        """Add a toxic now and remove it after hold_s seconds (in the background)."""
        name = self.add(kind, stream, **attributes)
        timer = threading.Timer(hold_s, self.remove, args=(name,))
        timer.daemon = True
        timer.start()


@contextmanager
def run_toxiproxy(workdir: Path) -> Iterator[Toxiproxy]:
    port = free_port()
    log = workdir / "toxiproxy.log"
    argv = [str(find_binary("toxiproxy-server")), "-host", "127.0.0.1", "-port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/version", proc, log, "toxiproxy-server")
        yield Toxiproxy(f"http://127.0.0.1:{port}")
    finally:
        stop_process(proc, 10)


@dataclass
class Rule:
    """What the front does with requests whose method matches and whose path contains `part`."""

    method: str
    part: str
    times: int  # how many matching requests it acts on (-1: every one)
    status: int = 0  # answer this status instead of forwarding (0: forward)
    code: str = ""
    action: Callable[[], None] | None = None  # run before forwarding (e.g. open a toxiproxy window)
    hits: int = 0


@dataclass
class Front:
    """An HTTP front that forwards every request unchanged (headers, body and framing as received, so
    signatures hold) and applies its rules first. `seen` records (method, path) of every request."""

    upstream: str  # host:port
    rules: list[Rule] = field(default_factory=list)
    seen: list[tuple[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def on(self, method: str, part: str, times: int = 1, **what: Any) -> Rule:
        rule = Rule(method, part, times, **what)
        with self.lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self.lock:
            self.rules.clear()
            self.seen.clear()

    def match(self, method: str, path: str) -> Rule | None:
        with self.lock:
            self.seen.append((method, path))
            for rule in self.rules:
                if rule.method in (method, "*") and rule.part in path and rule.times != 0:
                    rule.times -= 1 if rule.times > 0 else 0
                    rule.hits += 1
                    return rule
        return None


def error_xml(code: str, path: str) -> bytes:
    return (
        f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{code} (fault test)</Message>'
        f"<Resource>{path}</Resource><RequestId>fault</RequestId></Error>"
    ).encode()


def make_handler(front: Front) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def raw_body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                body = b""
                while True:
                    line = self.rfile.readline()
                    body += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while True:  # trailers, up to the empty line
                            trailer = self.rfile.readline()
                            body += trailer
                            if trailer in (b"\r\n", b"\n", b""):
                                return body
                    body += self.rfile.read(size + 2)
            expected = int(self.headers.get("Content-Length", 0) or 0)
            body = self.rfile.read(expected)
            if len(body) < expected:  # the client's connection broke mid-body: nothing to forward
                raise ConnectionAbortedError(f"{len(body)} of {expected} bytes")
            return body

        def answer(self, status: int, body: bytes, headers: list[tuple[str, str]]) -> None:
            self.send_response_only(status)
            for name, value in headers:
                if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                    self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def handle_any(self) -> None:
            try:
                body = self.raw_body()
            except (ConnectionError, ValueError):
                self.close_connection = True
                return
            rule = front.match(self.command, self.path)
            if rule is not None and rule.action is not None:
                rule.action()
            if rule is not None and rule.status:
                self.answer(rule.status, error_xml(rule.code, self.path), [("Content-Type", "application/xml")])
                return
            upstream = http.client.HTTPConnection(front.upstream, timeout=120)
            try:
                upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for name, value in self.headers.items():
                    upstream.putheader(name, value)
                upstream.endheaders()
                if body:
                    upstream.send(body)
                try:
                    response = upstream.getresponse()
                    data = response.read()
                except (ConnectionError, http.client.HTTPException):  # MinIO hung up: so do we
                    self.close_connection = True
                    return
                content_length = response.getheader("Content-Length")
                headers = response.getheaders()
                if self.command == "HEAD" and content_length is not None:
                    self.send_response_only(response.status)
                    for name, value in headers:
                        if name.lower() not in ("transfer-encoding", "connection"):
                            self.send_header(name, value)
                    self.end_headers()
                    return
                self.answer(response.status, data, headers)
            finally:
                upstream.close()

        do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = handle_any

    return Handler


class QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A client that toxiproxy cut off mid-request is the point of these tests, not news."""
        import sys

        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextmanager
def run_front(upstream: str) -> Iterator[Front]:
    front = Front(upstream)
    server = QuietServer(("127.0.0.1", 0), make_handler(front))
    server.daemon_threads = True
    front.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield front
    finally:
        server.shutdown()
        server.server_close()
