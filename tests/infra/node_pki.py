"""Certificates of the test node that the control plane does not make (tests/infra/node.py)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

from tests.infra import node_config as conf


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True)


def kubelet_client_pki(pki: Path) -> None:
    """A CA the kubelet trusts for client certificates, and the API server's client certificate
    (system:masters, so the kubelet's webhook authorizer lets `kubectl logs/exec` through)."""
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    _openssl(
        pki,
        "req",
        "-x509",
        *ec,
        "-days",
        "2",
        "-subj",
        "/CN=clusterfit-kubelet-client-ca",
        "-keyout",
        "ca.key",
        "-out",
        "ca.crt",
    )
    _openssl(
        pki,
        "req",
        *ec,
        "-subj",
        "/O=system:masters/CN=kube-apiserver-kubelet-client",
        "-keyout",
        "apiserver-client.key",
        "-out",
        "apiserver-client.csr",
    )
    (pki / "client.ext").write_text("extendedKeyUsage=clientAuth\nkeyUsage=critical,digitalSignature\n")
    _openssl(
        pki,
        "x509",
        "-req",
        "-in",
        "apiserver-client.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-days",
        "2",
        "-extfile",
        "client.ext",
        "-out",
        "apiserver-client.crt",
    )


def operator_certs(folder: Path) -> dict[str, bytes]:
    """The operator's webhook CA and serving certificate, made once per machine (RSA keys take a
    second each here). Its cert rotator keeps what it finds if valid for 90 more days, the CA key
    is PKCS#1 and the CA names itself `training-operator-ca`: it checks all three."""
    names = ("ca.crt", "ca.key", "tls.crt", "tls.key")
    fresh = all((folder / n).exists() for n in names) and time.time() - (folder / "tls.crt").stat().st_mtime < 3e7
    if not fresh:
        folder.mkdir(parents=True, exist_ok=True)
        dns = f"{conf.OPERATOR_SERVICE}.{conf.OPERATOR_NAMESPACE}.svc"
        _openssl(folder, "genrsa", "-traditional", "-out", "ca.key", "2048")
        _openssl(
            folder,
            "req",
            "-x509",
            "-new",
            "-key",
            "ca.key",
            "-days",
            "3650",
            "-subj",
            "/O=training-operator/CN=training-operator-ca",
            "-addext",
            "subjectAltName=DNS:training-operator-ca",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign",
            "-out",
            "ca.crt",
        )
        (folder / "tls.ext").write_text(
            f"subjectAltName=DNS:{dns}\nextendedKeyUsage=serverAuth\n"
            "keyUsage=critical,digitalSignature,keyEncipherment\n"
        )
        _openssl(
            folder,
            "req",
            "-new",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "tls.key",
            "-subj",
            f"/CN={dns}",
            "-out",
            "tls.csr",
        )
        _openssl(
            folder,
            "x509",
            "-req",
            "-in",
            "tls.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "730",
            "-extfile",
            "tls.ext",
            "-out",
            "tls.crt",
        )
    return {n: (folder / n).read_bytes() for n in names}
