"""A self-signed CA and server certificates for the local stack's TLS (openssl CLI).

Made into a folder of the stack dir (git-ignored), never committed: ``ca.pem`` (the
CA's certificate, what clients trust: FLEETPULSE_REDIS_CA_FILE, FLEETPULSE_KAFKA_CA_FILE),
``ca.key``, and per server ``<name>.pem`` / ``<name>.key`` with the names it answers to
(subjectAltName: 127.0.0.1 and localhost, plus any given). Keys are mode 0600.

    python -m deploy.local.tls DIR [--name redis] [--san DNS:redis.fleetpulse.svc ...]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

from fleetpulse.errors import StackError

__all__ = ["ServerCert", "make_ca", "make_server_cert"]

DAYS = 365
LOCAL_NAMES = ("IP:127.0.0.1", "DNS:localhost")


class ServerCert(NamedTuple):
    """The files a TLS server and its clients need."""

    ca: Path  # the CA's certificate (clients' trust)
    cert: Path
    key: Path


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StackError(f"openssl {args[0]} failed: {done.stderr.strip()}")


def make_ca(folder: Path, cn: str = "fleetpulse local CA") -> tuple[Path, Path]:
    """The CA's certificate and key in ``folder`` (made once, kept after)."""
    folder.mkdir(parents=True, exist_ok=True)
    cert, key = folder / "ca.pem", folder / "ca.key"
    if cert.exists() and key.exists():
        return cert, key
    _openssl("genrsa", "-out", str(key), "2048")
    key.chmod(0o600)
    _openssl(
        "req", "-x509", "-new", "-key", str(key), "-sha256", "-days", str(DAYS),
        "-subj", f"/CN={cn}", "-out", str(cert),
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return cert, key


def make_server_cert(folder: Path, name: str, sans: Sequence[str] = ()) -> ServerCert:
    """A certificate for server ``name`` signed by the folder's CA (made if missing),
    valid for 127.0.0.1, localhost and ``sans`` (``DNS:host`` or ``IP:addr``)."""
    ca_cert, ca_key = make_ca(folder)
    cert, key, csr = folder / f"{name}.pem", folder / f"{name}.key", folder / f"{name}.csr"
    names = ",".join(dict.fromkeys((*LOCAL_NAMES, *sans)))
    ext = folder / f"{name}.ext"
    ext.write_text(
        f"subjectAltName={names}\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth,clientAuth\n"
    )
    _openssl("genrsa", "-out", str(key), "2048")
    key.chmod(0o600)
    _openssl("req", "-new", "-key", str(key), "-subj", f"/CN={name}", "-out", str(csr))
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
        "-CAcreateserial", "-days", str(DAYS), "-sha256", "-extfile", str(ext), "-out", str(cert),
    )  # fmt: skip
    csr.unlink()
    ext.unlink()
    return ServerCert(ca_cert, cert, key)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="deploy.local.tls", description=__doc__)
    parser.add_argument("folder", type=Path)
    parser.add_argument("--name", default="redis", help="the server's name (file names, CN)")
    parser.add_argument("--san", action="append", default=[], help="DNS:name or IP:addr")
    args = parser.parse_args(argv)
    try:
        made = make_server_cert(args.folder, args.name, args.san)
    except StackError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"CA {made.ca}\ncertificate {made.cert}\nkey {made.key}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
