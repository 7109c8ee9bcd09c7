"""The S3 backend of `storage`: boto3 with retries that ride out resets, stalls and throttling, and
errors that name the object, the endpoint and the cause.

Retries, innermost first: botocore's standard mode (`S3.MAX_ATTEMPTS` attempts with jittered
backoff; connection errors, timeouts, 5xx and 503 SlowDown, never a 4xx), s3transfer's own retry of
a download whose body broke off, and `S3Backend._retrying`: rounds of those with pauses growing to
10 s for `S3.RETRY_BUDGET_S`, once the endpoint has answered this process. Every retry is logged.
Credentials come only from the AWS credential chain; boto3 is imported only when a client is made.
"""

from __future__ import annotations

import io
import itertools
import logging
import os
import random
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from clusterfit.config import StorageConfig
from clusterfit.storage import NotFound, StorageError, TransientStorageError

log = logging.getLogger(__name__)
_T = TypeVar("_T")


class S3Backend:
    def __init__(self, bucket: str, prefix: str, settings: StorageConfig) -> None:
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.settings = settings.S3
        self._client: Any = None
        self._client_pid = -1
        self._lock = threading.Lock()
        self._reached = False  # has the endpoint answered this process yet (see _retrying)

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _errors(self, key: str, passthrough: tuple[type[BaseException], ...] = ()) -> _s3_errors:
        return _s3_errors(self.uri(key), passthrough, s3_endpoint(self.settings))

    def _failure(self, key: str, exc: BaseException) -> StorageError:
        return _translate(exc, self.uri(key), s3_endpoint(self.settings)) or StorageError(f"{self.uri(key)}: {exc}")

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    @property
    def client(self) -> Any:
        # One client per process: boto3 clients must not cross a fork (DataLoader workers).
        with self._lock:
            if self._client is None or self._client_pid != os.getpid():
                self._client = make_s3_client(self.settings)
                self._client_pid = os.getpid()
            return self._client

    def _transfer_config(self) -> Any:
        from boto3.s3.transfer import TransferConfig

        mb = 1024 * 1024
        return TransferConfig(
            multipart_threshold=self.settings.MULTIPART_THRESHOLD_MB * mb,
            multipart_chunksize=self.settings.MULTIPART_CHUNKSIZE_MB * mb,
            max_concurrency=self.settings.MAX_CONCURRENCY,
        )

    def _retrying(self, key: str, op: Callable[[], _T]) -> _T:
        """op(), tried again while it fails transiently (the connection, a 5xx, throttling) after botocore's
        own retries, with growing pauses until S3.RETRY_BUDGET_S has passed: an endpoint that restarts or a
        network that drops for seconds costs a pause, not the step. Each retry is logged. Only once the
        endpoint has answered this process: a mistyped endpoint fails at once."""
        deadline = time.monotonic() + self.settings.RETRY_BUDGET_S
        for attempt in itertools.count(1):
            try:
                with self._errors(key):
                    result = op()
                self._reached = True
                return result
            except TransientStorageError as exc:
                pause_s = min(10.0, 0.5 * 2 ** (attempt - 1)) * (0.5 + random.random() / 2)
                if not self._reached:  # never answered: a wrong endpoint or a dead server, said at once
                    raise
                if time.monotonic() + pause_s > deadline:
                    if attempt == 1:  # S3.RETRY_BUDGET_S: 0
                        raise
                    spent_s = self.settings.RETRY_BUDGET_S - (deadline - time.monotonic())
                    raise StorageError(f"{exc} (still failing after {attempt} rounds over {spent_s:.0f} s)") from None
                log.warning("%s; retrying in %.1f s (round %d, S3.RETRY_BUDGET_S)", exc, pause_s, attempt + 1)
                time.sleep(pause_s)
        raise AssertionError("unreachable")

    def put_bytes(self, key: str, data: bytes) -> None:
        if len(data) >= self.settings.MULTIPART_THRESHOLD_MB * 1024 * 1024:
            config = self._transfer_config()
            self._retrying(
                key, lambda: self.client.upload_fileobj(io.BytesIO(data), self.bucket, self._key(key), Config=config)
            )
            return
        self._retrying(key, lambda: self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data))

    def get_bytes(self, key: str) -> bytes:
        def download() -> bytes:
            buffer = io.BytesIO()
            self.client.download_fileobj(self.bucket, self._key(key), buffer, Config=self._transfer_config())
            return buffer.getvalue()

        return self._retrying(key, download)

    def put_file(self, key: str, path: Path) -> None:
        config = self._transfer_config()
        self._retrying(key, lambda: self.client.upload_file(str(path), self.bucket, self._key(key), Config=config))

    def get_file(self, key: str, path: Path) -> None:
        config = self._transfer_config()
        self._retrying(key, lambda: self.client.download_file(self.bucket, self._key(key), str(path), Config=config))

    def exists(self, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            with self._errors(key, passthrough=(ClientError,)):
                self.client.head_object(Bucket=self.bucket, Key=self._key(key))
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise self._failure(key, exc) from None

    def list(self, prefix: str) -> list[str]:
        return sorted(self.sizes(prefix))

    def sizes(self, prefix: str) -> dict[str, int]:
        strip = len(self.prefix) + 1 if self.prefix else 0

        def listing() -> dict[str, int]:
            found: dict[str, int] = {}
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)):
                found.update((item["Key"][strip:], int(item["Size"])) for item in page.get("Contents", []))
            return found

        return self._retrying(prefix, listing)

    def delete(self, key: str) -> None:
        self._retrying(key, lambda: self.client.delete_object(Bucket=self.bucket, Key=self._key(key)))

    # Conditional requests: S3 evaluates If-None-Match / If-Match atomically with the write, answering 412 when
    # the condition fails, 409 when a concurrent conditional write on the key won, 404 when an If-Match names
    # an object that is gone. A retried request whose first try succeeded also gets 412: callers that must know
    # read the object back (clusterfit/lease.py does). MinIO ignores If-Match on DeleteObject (it deletes).
    def _conditional(self, key: str, call: Callable[..., Any], **kwargs: Any) -> Any | None:
        """`call(Bucket=..., Key=..., **kwargs)`'s response, or None when its condition did not hold."""
        from botocore.exceptions import ClientError

        try:
            with self._errors(key, passthrough=(ClientError,)):
                return call(Bucket=self.bucket, Key=self._key(key), **kwargs)
        except ClientError as exc:
            code = str(exc.response.get("Error", {}).get("Code", ""))
            if code in ("PreconditionFailed", "412", "ConditionalRequestConflict", "409", "NoSuchKey", "404"):
                return None
            raise self._failure(key, exc) from None

    def get_with_token(self, key: str) -> tuple[bytes, str]:
        with self._errors(key):
            response = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            return response["Body"].read(), str(response["ETag"])

    def put_if_absent(self, key: str, data: bytes) -> str | None:
        response = self._conditional(key, self.client.put_object, Body=data, IfNoneMatch="*")
        return None if response is None else str(response["ETag"])

    def put_if_match(self, key: str, data: bytes, token: str) -> str | None:
        response = self._conditional(key, self.client.put_object, Body=data, IfMatch=token)
        return None if response is None else str(response["ETag"])

    def delete_if_match(self, key: str, token: str) -> bool:
        return self._conditional(key, self.client.delete_object, IfMatch=token) is not None


def s3_endpoint(settings: Any) -> str:
    """The endpoint a client of these settings talks to (empty: AWS's own, chosen by region)."""
    return str(
        settings.ENDPOINT_URL or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""
    )


def make_s3_client(settings: Any) -> Any:
    """A boto3 S3 client from the S3 settings; credentials from the AWS chain only.

    Retries are botocore's 'standard' mode: connection errors, timeouts, 5xx answers and throttling
    (503 SlowDown) are retried with jittered exponential backoff up to S3.MAX_ATTEMPTS attempts in all;
    4xx answers (403 AccessDenied) are not. Each retry is logged (`log_retries`)."""
    import boto3
    from botocore.config import Config as BotoConfig

    options: dict[str, Any] = {
        # total_max_attempts counts the first try; botocore's max_attempts would count retries only.
        "retries": {"mode": "standard", "total_max_attempts": settings.MAX_ATTEMPTS},
        "connect_timeout": settings.CONNECT_TIMEOUT_S,
        "read_timeout": settings.READ_TIMEOUT_S,
        "s3": {"addressing_style": settings.ADDRESSING_STYLE},
        "request_checksum_calculation": settings.CHECKSUMS,
        "response_checksum_validation": settings.CHECKSUMS,
    }
    region = settings.REGION or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    session = boto3.session.Session()
    client = session.client(
        "s3", endpoint_url=s3_endpoint(settings) or None, region_name=region, config=BotoConfig(**options)
    )
    client.meta.events.register("needs-retry.s3", _RetryLogger(settings.MAX_ATTEMPTS))
    log_transfer_retries()
    return client


class _RetryLogger:
    """botocore `needs-retry` hook: logs a failed attempt that its retry handler will retry. It returns
    None, so it never changes the decision (botocore takes the first non-None answer)."""

    def __init__(self, max_attempts: int) -> None:
        self.max_attempts = max_attempts

    def __call__(self, attempts: int, response: Any, caught_exception: Any, request_dict: Any, **_: Any) -> None:
        if attempts >= self.max_attempts:
            return  # the last attempt: the caller's StorageError says what failed
        if caught_exception is not None:
            reason = f"{type(caught_exception).__name__}: {caught_exception}"
        else:
            status = response[0].status_code if response else 0
            code = (response[1] or {}).get("Error", {}).get("Code", "") if response else ""
            if status < 500 and status != 429 and code not in ("SlowDown", "Throttling", "RequestTimeout"):
                return  # not retried (403, 404, ...): no noise
            reason = f"HTTP {status} {code}".strip()
        url = str(request_dict.get("url", "")).split("?")[0]  # the query could carry a presigned signature
        log.warning(
            "S3 %s %s: attempt %d of %d failed (%s); retrying with backoff",
            request_dict.get("method", ""),
            url,
            attempts,
            self.max_attempts,
            reason,
        )


class _TransferRetries(logging.Filter):
    """s3transfer retries a download whose body broke off (reset, stall) on its own and says so only at
    DEBUG: raise that message to WARNING, and drop its other DEBUG chatter."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Retrying exception caught"):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.exc_info, record.exc_text = None, None  # one line, not a traceback per retry
            return True
        return record.levelno >= logging.INFO


def log_transfer_retries() -> None:
    transfer_log = logging.getLogger("s3transfer.download")
    if not any(isinstance(f, _TransferRetries) for f in transfer_log.filters):
        transfer_log.addFilter(_TransferRetries())
        transfer_log.setLevel(logging.DEBUG)  # so that the retry record is made at all


class _s3_errors:
    """Turn botocore's exceptions into StorageError naming the URI, the endpoint and the likely cause."""

    def __init__(self, uri: str, passthrough: tuple[type[BaseException], ...] = (), endpoint: str = "") -> None:
        self.uri = uri
        self.passthrough = passthrough
        self.endpoint = endpoint

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc is None or isinstance(exc, (StorageError, *self.passthrough)):
            return
        translated = _translate(exc, self.uri, self.endpoint)
        if translated is not None:
            raise translated from None


def _translate(exc: BaseException, uri: str, endpoint: str = "") -> StorageError | None:
    from boto3.exceptions import S3UploadFailedError
    from botocore.exceptions import (
        ClientError,
        ConnectionError,
        ConnectTimeoutError,
        EndpointConnectionError,
        HTTPClientError,
        IncompleteReadError,
        NoCredentialsError,
        ReadTimeoutError,
    )
    from s3transfer.exceptions import RetriesExceededError

    where = f"{uri} (endpoint {endpoint or 'AWS default'})"
    if isinstance(exc, NoCredentialsError):
        return StorageError(
            f"{uri}: no S3 credentials found (set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile)"
        )
    if isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, ReadTimeoutError)):
        return TransientStorageError(f"{where}: S3 endpoint unreachable: {exc}")
    if isinstance(exc, RetriesExceededError):  # s3transfer's download retries, all spent
        exc = exc.last_exception or exc
    if isinstance(exc, (ConnectionError, HTTPClientError, IncompleteReadError)):
        return TransientStorageError(
            f"{where}: the connection failed on every attempt (reset, stall or timeout): {exc}"
        )
    if isinstance(exc, S3UploadFailedError):
        inner = exc.__cause__ or exc.__context__
        if isinstance(inner, ClientError):
            return _translate(inner, uri, endpoint)
        return StorageError(f"{where}: upload failed: {exc}")
    if isinstance(exc, ClientError):
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("404", "NoSuchKey", "NotFound"):
            return NotFound(f"{uri}: no such object")
        if code in ("NoSuchBucket",):
            return StorageError(f"{uri}: bucket does not exist")
        if code in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return StorageError(f"{where}: access denied ({code}): check the S3 credentials and their permissions")
        status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
        if status >= 500 or code in ("SlowDown", "Throttling", "RequestTimeout", "RequestTimeTooSkewed"):
            return TransientStorageError(f"{where}: S3 error {code} (HTTP {status}) on every attempt: {exc}")
        return StorageError(f"{where}: S3 error {code}: {exc}")
    return None
