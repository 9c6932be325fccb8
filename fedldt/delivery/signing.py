"""Ed25519 signatures of model packages (optional), made with the ``cryptography`` library.

A package's ``package.json`` carries a ``digest`` over all of its content (every file's sha256
and every task field; see :func:`fedldt.delivery.package.manifest_digest`). Signing a package
writes ``package.sig``, a detached Ed25519 signature of that digest::

    {"format": "fedldt-package-signature/1", "algorithm": "ed25519",
     "digest": "sha256:<64 hex>",          # the manifest digest that was signed
     "public_key": "<base64, 32 bytes>",    # the signer's raw public key (to name a wrong key)
     "signature": "<base64, 64 bytes>"}     # Ed25519 over SIGNED_PREFIX + digest (ASCII)

Keys are PEM files: the private key PKCS#8 (mode 0600, unencrypted), the public key
SubjectPublicKeyInfo (``KEY.pub``). Command line::

    fedldt keygen --out keys/exporter            # keys/exporter (0600) and keys/exporter.pub
    fedldt export RUN --territory t1 --out PKG --sign-key keys/exporter
    fedldt predict PKG --input latest.csv --verify-key keys/exporter.pub
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import stat
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from fedldt.launch.certs import _write_private

SIGNATURE_FORMAT = "fedldt-package-signature/1"
#: What is signed: this prefix, then the manifest digest (``sha256:<hex>``) in ASCII.
SIGNED_PREFIX = b"fedldt-package-signature/1\n"
#: Largest key or signature file read, bytes.
MAX_KEY_BYTES = 64 * 1024


class SignatureError(ValueError):
    """A key or signature file is unusable, or a signature does not verify; the message names
    the file and the fix."""


def _raw(pub: Ed25519PublicKey) -> bytes:
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint(pub: Ed25519PublicKey) -> str:
    """``"sha256:<first 16 hex digits>"`` of the raw 32-byte public key: a short name for a key."""
    return "sha256:" + hashlib.sha256(_raw(pub)).hexdigest()[:16]


def _read_small(path: Path, what: str) -> bytes:
    path = Path(path)
    if not path.is_file():
        raise SignatureError(f"{path}: {what} not found (make a key pair with `fedldt keygen --out KEY`)")
    data = path.read_bytes()[: MAX_KEY_BYTES + 1]
    if len(data) > MAX_KEY_BYTES:
        raise SignatureError(f"{path}: larger than {MAX_KEY_BYTES} bytes; not a {what}")
    return data


def generate_keypair(path: str | Path) -> tuple[Path, Path]:
    """Make an Ed25519 key pair for signing packages.

    Args:
        path: the private key file to create (PEM PKCS#8, mode 0600); the public key goes to
            ``PATH.pub`` (PEM SubjectPublicKeyInfo). Neither may exist.

    Returns:
        ``(private_key_path, public_key_path)``.

    Raises:
        SignatureError: ``path`` or ``PATH.pub`` exists (nothing is overwritten).
    """
    path = Path(path)
    pub_path = path.with_name(path.name + ".pub")
    for p in (path, pub_path):
        if p.exists() or p.is_symlink():
            raise SignatureError(f"{p} exists; fedldt keygen never overwrites a file: choose another --out")
    key = Ed25519PrivateKey.generate()
    _write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    pub_path.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                       serialization.PublicFormat.SubjectPublicKeyInfo))
    return path, pub_path


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    """The Ed25519 private key of a PEM file (from :func:`generate_keypair`).

    Raises:
        SignatureError: the file is missing, readable by group or others (``chmod 600`` it),
            not an unencrypted PEM private key, or not an Ed25519 key.
    """
    path = Path(path)
    data = _read_small(path, "private key")
    mode = stat.S_IMODE(os.stat(path).st_mode)
    if os.name == "posix" and mode & 0o077:
        raise SignatureError(f"{path}: private key is readable by others (mode {mode:04o}); run `chmod 600 {path}`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not an unencrypted PEM private key ({e})") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 key; make one with `fedldt keygen`")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """The Ed25519 public key of a PEM file (``KEY.pub`` of :func:`generate_keypair`).

    Raises:
        SignatureError: the file is missing, not a PEM public key, or not an Ed25519 key.
    """
    path = Path(path)
    data = _read_small(path, "public key")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise SignatureError(f"{path}: not a PEM public key ({e})") from None
    if not isinstance(key, Ed25519PublicKey):
        raise SignatureError(f"{path}: a {type(key).__name__}, not an Ed25519 public key")
    return key


def sign_digest(key: Ed25519PrivateKey, digest: str) -> dict[str, Any]:
    """The ``package.sig`` document signing manifest ``digest`` (``sha256:<hex>``) with ``key``."""
    return {
        "format": SIGNATURE_FORMAT,
        "algorithm": "ed25519",
        "digest": digest,
        "public_key": base64.b64encode(_raw(key.public_key())).decode("ascii"),
        "signature": base64.b64encode(key.sign(SIGNED_PREFIX + digest.encode("ascii"))).decode("ascii"),
    }


def read_signature(path: Path) -> dict[str, Any]:
    """Parse a ``package.sig`` document (structure only, no verification).

    Raises:
        SignatureError: not JSON, unknown format or algorithm, or a field is missing or not a string.
    """
    data = _read_small(path, "signature")
    try:
        doc = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SignatureError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIGNATURE_FORMAT or doc.get("algorithm") != "ed25519":
        raise SignatureError(f"{path}: not a {SIGNATURE_FORMAT} Ed25519 signature")
    for name in ("digest", "public_key", "signature"):
        if not isinstance(doc.get(name), str):
            raise SignatureError(f"{path}: field {name!r} missing or not a string")
    return doc


def verify_signature(path: Path, digest: str, pub: Ed25519PublicKey, pub_path: str | Path) -> None:
    """Check that ``package.sig`` at ``path`` is a valid signature of ``digest`` by ``pub``.

    Raises:
        SignatureError: the signature signs another digest, was made by another key (both
            fingerprints named) or does not verify.
    """
    doc = read_signature(path)
    if doc["digest"] != digest:
        raise SignatureError(f"{path}: signs manifest digest {doc['digest']}, but package.json's digest is {digest}: "
                             "the package was altered after signing, or the signature belongs to another package")
    try:
        signer = base64.b64decode(doc["public_key"], validate=True)
        sig = base64.b64decode(doc["signature"], validate=True)
    except binascii.Error:
        raise SignatureError(f"{path}: public_key or signature is not base64") from None
    if signer != _raw(pub):
        theirs = "sha256:" + hashlib.sha256(signer).hexdigest()[:16]
        raise SignatureError(f"{path}: signed by key {theirs}, not by --verify-key {pub_path} ({fingerprint(pub)}); "
                             "the package was (re-)signed by someone else, or the wrong public key was given")
    try:
        pub.verify(sig, SIGNED_PREFIX + digest.encode("ascii"))
    except InvalidSignature:
        raise SignatureError(f"{path}: the Ed25519 signature does not verify with {pub_path}; "
                             "the signature file was altered") from None
