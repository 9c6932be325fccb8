"""Certificates and keys of a fedldt deployment, made with the ``cryptography`` library.

A deployment needs three kinds of files (see ``docs/deploy.md``):

* a certificate authority (``ca.crt`` / ``ca.key``): the coordinator keeps ``ca.key``; every
  territory receives ``ca.crt`` to verify the SuperLink;
* the SuperLink's TLS certificate (``server.pem`` / ``server.key``), signed by the CA, whose
  subject alternative names list the addresses territories dial (here ``IP:127.0.0.1``);
* one ECDSA key pair per territory (OpenSSH format, NIST P-384), for SuperNode authentication:
  the private key stays with the territory, the public key (``.pub``) is registered on the
  SuperLink with ``flwr supernode register``.

Command line (what the coordinator runs; prints the files written; ``python -m fedldt.launch.certs``
takes the same arguments)::

    fedldt certs ca --out pki --san 127.0.0.1
    fedldt certs territory-key --out keys/territory-0

Private keys are written 0600 (certificates and public keys 0644) through a new temporary file
and an atomic rename, whatever the umask or an existing file's mode. Existing files are never
replaced unless ``--force`` (``overwrite=True``) is given, and then only when they parse as the
kind of key or certificate fedldt writes; symbolic links are refused.
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


#: Subject CN of the CA fedldt creates (how ``overwrite=True`` recognises fedldt's certificates).
CA_COMMON_NAME = "fedldt federation CA"


@dataclass(frozen=True)
class ServerPKI:
    """Paths of the CA and SuperLink TLS files (PEM)."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path


class KeyFileError(RuntimeError):
    """A key or certificate file cannot be written (it exists and is not fedldt's, or is a link)."""


#: What each kind of file fedldt writes must parse as for ``overwrite=True`` to replace it.
_KIND_NAMES = {"pkcs8-key": "an unencrypted PKCS8 PEM private key", "openssh-key": "an unencrypted OpenSSH private key",
               "certificate": f"a certificate issued by a {CA_COMMON_NAME!r}", "openssh-pub": "an OpenSSH public key"}
_KINDS = {
    "pkcs8-key": lambda b: serialization.load_pem_private_key(b, password=None),
    "openssh-key": lambda b: serialization.load_ssh_private_key(b, password=None),
    "certificate": lambda b: _fedldt_certificate(x509.load_pem_x509_certificate(b)),
    "openssh-pub": lambda b: serialization.load_ssh_public_key(b.strip()),
}


def _fedldt_certificate(cert: x509.Certificate) -> x509.Certificate:
    """``cert`` if fedldt issued it (issuer CN ``fedldt federation CA``), else ``ValueError``."""
    cns = [a.value for a in cert.issuer.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if cns != [CA_COMMON_NAME]:
        raise ValueError(f"issuer {cert.issuer.rfc4514_string()} is not {CA_COMMON_NAME!r}")
    return cert


def _check_writable(path: Path, kind: str, overwrite: bool) -> None:
    """Refuse to write ``path`` unless it is absent, or ``overwrite`` and it holds a ``kind`` fedldt writes.

    Raises:
        KeyFileError: ``path`` is a symbolic link, not a regular file, exists without
            ``overwrite``, or exists but does not parse as ``kind`` (fedldt did not write it).
    """
    if path.is_symlink():
        raise KeyFileError(f"{path} is a symbolic link; fedldt writes keys and certificates to regular files only: "
                           "remove the link or choose another --out")
    if not path.exists():
        return
    if not path.is_file():
        raise KeyFileError(f"{path} exists and is not a regular file; choose another --out")
    if not overwrite:
        raise KeyFileError(f"{path} already exists; fedldt does not overwrite it. Choose another --out, or pass "
                           "--force to replace a key or certificate fedldt made")
    try:
        _KINDS[kind](path.read_bytes()[:1_000_000])
    except Exception as e:  # noqa: BLE001 - any parse failure means: not a file fedldt wrote
        raise KeyFileError(f"{path} exists and is not what fedldt writes there ({_KIND_NAMES[kind]}: "
                           f"{type(e).__name__}); fedldt only replaces its own files: move it away or choose "
                           "another --out") from None


def _write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with exactly ``mode``, replacing it atomically.

    The bytes go to a new temporary file in the same folder (created 0600 by ``mkstemp``,
    then ``fchmod`` to ``mode`` whatever the umask), are fsynced, and ``os.replace`` moves it
    over ``path``: an existing file's mode (e.g. 0644) is never kept, and a symbolic link at
    ``path`` would be replaced, not written through (``_check_writable`` refuses links first).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def _write_private(path: Path, data: bytes) -> None:
    """Write a secret readable by its owner only (mode 0600, also over an existing 0644 file)."""
    _write_atomic(path, data, 0o600)


def _write_public(path: Path, data: bytes) -> None:
    """Write a public file (certificate, public key) with mode 0644."""
    _write_atomic(path, data, 0o644)


def _san(names: Sequence[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def make_server_pki(out_dir: Path, san: Sequence[str] = ("127.0.0.1",), days: int = 365,
                    common_name: str = "fedldt SuperLink", overwrite: bool = False) -> ServerPKI:
    """Create a CA and a SuperLink certificate signed by it (RSA 3072, SHA-256).

    Args:
        out_dir: folder for ``ca.crt``, ``ca.key``, ``server.pem``, ``server.key`` (created;
            keys get mode 0600, certificates 0644, whatever the umask or an old file's mode).
        san: addresses territories use to reach the SuperLink: IP addresses (``127.0.0.1``)
            become ``IP:`` entries, anything else ``DNS:`` entries. A SuperNode refuses the
            TLS handshake when the address it dials is not listed.
        days: validity in days, from now.
        common_name: subject CN of the server certificate.
        overwrite: replace existing files, but only ones fedldt writes (PKCS8 PEM private keys,
            certificates issued by a ``fedldt federation CA``); without it any existing file is
            refused. Nothing is written unless all four files may be.

    Returns:
        The four paths.

    Raises:
        ValueError: ``san`` is empty or ``days`` < 1.
        KeyFileError: one of the four files is a symbolic link, exists without ``overwrite``,
            or exists and is not a file fedldt writes.
    """
    if not san:
        raise ValueError("make_server_pki: san must list at least one address the SuperLink is reached at (e.g. 127.0.0.1)")
    if days < 1:
        raise ValueError(f"make_server_pki: days={days} must be >= 1")
    out_dir = Path(out_dir)
    pki = ServerPKI(out_dir / "ca.crt", out_dir / "ca.key", out_dir / "server.pem", out_dir / "server.key")
    for path, kind in ((pki.ca_cert, "certificate"), (pki.ca_key, "pkcs8-key"), (pki.server_cert, "certificate"),
                       (pki.server_key, "pkcs8-key")):
        _check_writable(path, kind, overwrite)
    out_dir.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.timezone.utc) - dt.timedelta(minutes=5)  # tolerate small clock skew
    until = now + dt.timedelta(days=days)

    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, CA_COMMON_NAME)])
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

    pem = serialization.Encoding.PEM
    _write_public(pki.ca_cert, ca_cert.public_bytes(pem))
    _write_public(pki.server_cert, srv_cert.public_bytes(pem))
    for path, key in ((pki.ca_key, ca_key), (pki.server_key, srv_key)):
        _write_private(path, key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return pki


def make_territory_key(path: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Create a territory's SuperNode authentication key pair (ECDSA NIST P-384, OpenSSH format).

    Equivalent to ``ssh-keygen -t ecdsa -b 384 -N "" -f PATH``: Flower requires NIST EC keys
    for SuperNode authentication (ed25519 keys are refused).

    Args:
        path: private key file (mode 0600); the public key goes to ``PATH.pub`` (0644).
        overwrite: replace an existing pair, but only files fedldt writes (an OpenSSH private
            key, an OpenSSH public key); without it an existing file is refused.

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        KeyFileError: ``PATH`` or ``PATH.pub`` is a symbolic link, exists without ``overwrite``,
            or exists and is not a key fedldt writes. Nothing is written then.
    """
    path = Path(path)
    pub = path.with_name(path.name + ".pub")
    _check_writable(path, "openssh-key", overwrite)
    _check_writable(pub, "openssh-pub", overwrite)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                           serialization.NoEncryption()))
    _write_public(pub, key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
                  + f" {path.stem}\n".encode())
    return path, pub


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``ca`` and ``territory-key`` subcommands (shared by ``fedldt certs`` and ``python -m fedldt.launch.certs``)."""
    sub = p.add_subparsers(dest="cmd", required=True)
    ca = sub.add_parser("ca", help="CA and SuperLink TLS certificate")
    ca.add_argument("--out", type=Path, required=True, help="folder for ca.crt, ca.key, server.pem, server.key")
    ca.add_argument("--san", nargs="+", default=["127.0.0.1"],
                    help="IP addresses / DNS names territories dial to reach the SuperLink (default 127.0.0.1)")
    ca.add_argument("--days", type=int, default=365)
    tk = sub.add_parser("territory-key", help="a territory's ECDSA P-384 key pair (OpenSSH format)")
    tk.add_argument("--out", type=Path, required=True, help="private key file; the public key goes to OUT.pub")
    for sp in (ca, tk):
        sp.add_argument("--force", action="store_true",
                        help="replace existing files, only keys and certificates fedldt made (anything else is refused)")


def run(args: argparse.Namespace) -> int:
    """Write what ``args.cmd`` asks and print the files written; 0, or 1 with the error on stderr."""
    try:
        if args.cmd == "ca":
            pki = make_server_pki(args.out, args.san, args.days, overwrite=args.force)
            files: Sequence[Path] = (pki.ca_cert, pki.ca_key, pki.server_cert, pki.server_key)
        else:
            files = make_territory_key(args.out, overwrite=args.force)
    except (KeyFileError, ValueError) as e:
        print(f"fedldt certs {args.cmd}: error: {e}", file=sys.stderr)
        return 1
    for f in files:
        print(f)
    return 0


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m fedldt.launch.certs`` (the same as ``fedldt certs``); exits with :func:`run`'s status."""
    p = argparse.ArgumentParser(prog="python -m fedldt.launch.certs", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    status = run(p.parse_args(argv))
    if status:
        sys.exit(status)


if __name__ == "__main__":
    main()
