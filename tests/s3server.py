"""A real S3-compatible server for the tests: moto's standalone server on 127.0.0.1, credentials enforced.

Registered by `pytest_plugins = ["tests.s3server"]` in tests/conftest.py. Fixtures:

- `s3_server` (session): starts `python -m moto.server -H 127.0.0.1 -p <free port>` once per test
  session and terminates it at the end. moto checks signatures and IAM policies in server mode
  when `INITIAL_NO_AUTH_ACTION_COUNT` is set: the first N requests pass unchecked, every later one
  needs valid IAM credentials. The fixture spends exactly those free requests on an IAM user, its
  access key and an allow-all policy, then verifies that a wrong key is refused, so a test of wrong
  credentials meets a real `InvalidAccessKeyId`. The yielded `S3Server` has `endpoint_url`,
  `access_key`, `secret_key`, `region`, `env()` (AWS_* variables for a subprocess such as the
  `cli()` helper), `make_bucket(name)`, `client()` (a boto3 client of the test itself, for setup
  and for tampering with objects behind the code's back) and `settings()` (a
  `clusterfit.config.StorageConfig` with the endpoint and path-style addressing, no credentials).
- `s3_bucket` (function): `"s3://<bucket>"`, a fresh empty bucket per test.
- `s3_env` (function): puts the credentials and endpoint into the process environment (AWS_*,
  through monkeypatch, undone after the test) so that the code under test finds them through the
  AWS credential chain, as it would in a pod; returns the `S3Server`. Credentials never go into a
  config.

    def test_x(s3_env, s3_bucket):
        store = open_store(f"{s3_bucket}/exp", s3_env.settings())
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from clusterfit.config import S3Config, StorageConfig
from tests.infra.controlplane import stop_process

REGION = "us-east-1"
USER = "clusterfit-tests"
ALLOW_ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
# create_user, create_access_key, put_user_policy: the requests moto lets through unauthenticated.
FREE_REQUESTS = 3
START_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    """A running moto server and the IAM credentials it accepts."""

    endpoint_url: str
    access_key: str = ""
    secret_key: str = ""
    region: str = REGION
    log_path: Path | None = None
    _clients: dict[tuple[str, str], Any] = field(default_factory=dict, repr=False)

    def env(self, **overrides: str) -> dict[str, str]:
        """AWS_* variables that point the AWS credential chain and endpoint at this server."""
        env = {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_EC2_METADATA_DISABLED": "true",  # no instance-metadata probing when keys are missing
            "AWS_CONFIG_FILE": os.devnull,  # the developer's ~/.aws stays out of the tests
            "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        }
        env.update(overrides)
        return env

    def client(self, access_key: str | None = None, secret_key: str | None = None, service: str = "s3") -> Any:
        """A boto3 client of the test itself (explicit keys; the code under test never sees these)."""
        import boto3
        from botocore.config import Config as BotoConfig

        access_key = self.access_key if access_key is None else access_key
        secret_key = self.secret_key if secret_key is None else secret_key
        cache_key = (service, access_key + ":" + secret_key)
        if cache_key not in self._clients:
            self._clients[cache_key] = boto3.session.Session().client(
                service,
                endpoint_url=self.endpoint_url,
                region_name=self.region,
                aws_access_key_id=access_key,
                aws_secret_access_key=secret_key,
                config=BotoConfig(s3={"addressing_style": "path"}, retries={"mode": "standard", "max_attempts": 2}),
            )
        return self._clients[cache_key]

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a fresh unique name when none is given) and return its name."""
        name = name or f"cf-{uuid.uuid4().hex[:16]}"
        self.client().create_bucket(Bucket=name)
        return name

    def settings(self, **s3: Any) -> StorageConfig:
        """StorageConfig for this server: endpoint and path-style addressing; credentials stay in the env."""
        options: dict[str, Any] = {"ENDPOINT_URL": self.endpoint_url, "ADDRESSING_STYLE": "path", "REGION": self.region}
        options.update(s3)
        return StorageConfig(S3=S3Config(**options))


def start_moto(log_path: Path) -> tuple[subprocess.Popen[bytes], S3Server]:
    """Start moto's server on a free loopback port and wait until it answers HTTP."""
    port = free_port()
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(FREE_REQUESTS)}
    for name in list(env):
        if name.startswith("AWS_"):
            env.pop(name)
    log = log_path.open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    log.close()
    server = S3Server(endpoint_url=f"http://127.0.0.1:{port}", log_path=log_path)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"moto server exited with {proc.returncode}:\n{log_path.read_text()[-4000:]}")
        try:
            # moto's own API is not an AWS action: it does not use up a free request.
            with urllib.request.urlopen(f"{server.endpoint_url}/moto-api/data.json", timeout=2) as response:
                if response.status == 200:
                    return proc, server
        except OSError:
            pass
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(
                f"moto server did not answer within {START_TIMEOUT_S:.0f} s:\n{log_path.read_text()[-4000:]}"
            )
        time.sleep(0.1)


def create_credentials(server: S3Server) -> None:
    """Spend the unauthenticated requests on an IAM user with an allow-all policy, then check enforcement."""
    from botocore.exceptions import ClientError

    iam = server.client("anonymous", "anonymous", service="iam")
    iam.create_user(UserName=USER)
    key = iam.create_access_key(UserName=USER)["AccessKey"]
    iam.put_user_policy(UserName=USER, PolicyName="allow-all", PolicyDocument=json.dumps(ALLOW_ALL))
    server.access_key, server.secret_key = key["AccessKeyId"], key["SecretAccessKey"]
    server.client().list_buckets()  # the real key works ...
    try:  # ... and a wrong one does not: otherwise the credential tests would prove nothing
        server.client("AKIAWRONGWRONGWRONG0", "wrong-secret").list_buckets()
    except ClientError as exc:
        if exc.response["Error"]["Code"] != "InvalidAccessKeyId":
            raise
    else:
        raise RuntimeError("moto server accepted a wrong access key: authentication is not enforced")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the whole session, with enforced IAM credentials."""
    proc, server = start_moto(tmp_path_factory.mktemp("moto") / "server.log")
    try:
        create_credentials(server)
        yield server
    finally:
        stop_process(proc, 10)


@pytest.fixture
def s3_bucket(s3_server: S3Server) -> str:
    """`s3://<bucket>`: a fresh, empty bucket for one test."""
    return f"s3://{s3_server.make_bucket()}"


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server's credentials and endpoint in this process's environment, for the code under test."""
    for name in ("AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AWS_PROFILE", "AWS_ENDPOINT_URL_S3"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
