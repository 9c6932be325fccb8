"""Certificates and keys of a fedldt deployment, made with the ``cryptography`` library.

A deployment needs three kinds of files (see ``docs/deploy.md``):

* a certificate authority (``ca.crt`` / ``ca.key``): the coordinator keeps ``ca.key``; every
  territory receives ``ca.crt`` to verify the SuperLink;
* the SuperLink's TLS certificate (``server.pem`` / ``server.key``), signed by the CA, whose
  subject alternative names list the addresses territories dial (here ``IP:127.0.0.1``);
* one ECDSA key pair per territory (OpenSSH format, NIST P-384), for SuperNode authentication:
  the private key stays with the territory, the public key (``.pub``) is registered on the
  SuperLink with ``flwr supernode register``.

Command line (what the coordinator runs; prints the files written)::

    python -m fedldt.federation.certs ca --out pki --san 127.0.0.1
    python -m fedldt.federation.certs territory-key --out keys/territory-0
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class ServerPKI:
    """Paths of the CA and SuperLink TLS files (PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (mode 0600)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_server_pki(out_dir: Path, san: Sequence[str] = ("127.0.0.1",), days: int = 365,
                    common_name: str = "fedldt SuperLink") -> ServerPKI:
    """Create a CA and a SuperLink certificate signed by it (RSA 3072, SHA-256).

    Args:
        out_dir: folder for ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` (created;
            existing files are overwritten; keys get mode 0600).
        san: addresses territories use to reach the SuperLink: IP addresses (``127.0.0.1``)
            become ``IP:`` entries, anything else ``DNS:`` entries. A SuperNode refuses the
            TLS handshake when the address it dials is not listed.
        days: validity in days, from now.
        common_name: subject CN of the server certificate.

    Returns:
        The four paths.

    Raises:
        ValueError: ``san`` is empty or ``days`` < 1.
    """
    if not san:
        raise ValueError("make_server_pki: san must list at least one address the SuperLink is reached at (e.g. 127.0.0.1)")
    if days < 1:
        raise ValueError(f"make_server_pki: days={days} must be >= 1")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedldt federation CA")])
    ca_cert = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    srv_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    srv_cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)]))
        .issuer_name(ca_name).public_key(srv_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now).not_valid_after(until)
        .add_extension(_san(san), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA256())
    )

    pki = ServerPKI(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key")
    pem = serialization.Encoding.PEM
    pki.ca_cert.write_bytes(ca_cert.public_bytes(pem))
    pki.server_cert.write_bytes(srv_cert.public_bytes(pem))
    for path, key in ((pki.ca_key, ca_key), (pki.server_key, srv_key)):
        _write_private(path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pki


def make_territory_key(path: Path) -> tuple[Path, Path]:
    """Create a territory's SuperNode authentication key pair (ECDSA NIST P-384, OpenSSH format).

    Equivalent to ``ssh-keygen -t ecdsa -b 384 -N "" -f PATH``: Flower requires NIST EC keys
    for SuperNode authentication (ed25519 keys are refused).

    Args:
        path: private key file (mode 0600); the public key goes to ``PATH.pub``.

    Returns:
        ``(private_key_path, public_key_path)``.
    """
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    pub = path.with_name(path.name + ".pub")
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                    + f" {path.stem}\n".encode())
    return path, pub


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: ``ca`` (CA + SuperLink certificate) and ``territory-key`` (one key pair)."""
    p = argparse.ArgumentParser(prog="python -m fedldt.federation.certs", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    ca = sub.add_parser("ca", help="CA and SuperLink TLS certificate")
    ca.add_argument("--out", type=Path, required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    ca.add_argument("--san", nargs="+", default=["127.0.0.1"],
                    help="IP addresses / DNS names territories dial to reach the SuperLink (default 127.0.0.1)")
    ca.add_argument("--days", type=int, default=365)
    tk = sub.add_parser("territory-key", help="a territory's ECDSA P-384 key pair (OpenSSH format)")
    tk.add_argument("--out", type=Path, required=True, help="private key file; the public key goes to OUT.pub")
    args = p.parse_args(argv)
    if args.cmd == "ca":
        pki = make_server_pki(args.out, args.san, args.days)
        for f in (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key):
            print(f)
    else:
        for f in make_territory_key(args.out):
            print(f)


if __name__ == "__main__":
    main()
