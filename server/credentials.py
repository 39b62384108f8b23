"""Deployment credentials: a TLS certificate authority, the SuperLink's certificate, SuperNode keys.

Flower 1.42 takes the TLS files as `flower-superlink --ssl-ca-certfile
--ssl-certfile --ssl-keyfile` and `flower-supernode --root-certificates`.
SuperNode authentication uses one elliptic-curve key pair per SuperNode: the
SuperNode signs its requests with the private key (`flower-supernode
--auth-supernode-private-key`, OpenSSH format), and a SuperLink started with
`--enable-supernode-auth` accepts only nodes whose public key (OpenSSH format,
a NIST curve) was registered with `flwr supernode register KEY.pub`.

Private keys are written with mode 0600 and never logged.
"""

import datetime
import ipaddress
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT_FILE = "ca.crt"
CA_KEY_FILE = "ca.key"
SERVER_CERT_FILE = "server.pem"
SERVER_KEY_FILE = "server.key"
PUBLIC_KEY_LIST_FILE = "public-keys.txt"

PRIVATE_FILE_MODE = 0o600

# P-384 is the curve Flower's documentation uses for SuperNode keys; the
# SuperLink accepts any NIST curve. TLS keys use it too.
CURVE = ec.SECP384R1()

NODE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")

# One DNS label (RFC 1123): letters, digits and inner hyphens, at most 63 characters.
DNS_LABEL_PATTERN = re.compile(r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?")
MAX_DNS_NAME_LENGTH = 253


class ExistingFilesError(FileExistsError):
    """Raised instead of replacing credentials that other machines may already use."""


@dataclass(frozen=True)
class CertificateFiles:
    """Paths of the files that `create_certificates` writes."""

    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path


@dataclass(frozen=True)
class NodeKeyFiles:
    """Paths of one SuperNode's key pair."""

    name: str
    private_key: Path
    public_key: Path


def create_certificates(
    out_dir: Path,
    host: str,
    extra_hosts: tuple[str, ...] = (),
    valid_days: int = 365,
    force: bool = False,
) -> CertificateFiles:
    """Create a CA and a server certificate for `host`, signed by that CA, in `out_dir`.

    The server certificate's subject alternative names hold `host` and each of
    `extra_hosts`: an IP address as an IP entry, anything else as a DNS name.
    gRPC checks the name (or IP) that a SuperNode dials against these entries,
    so list every address clients use.

    Existing files are replaced only with `force`: a new CA breaks every
    SuperNode and `flwr` client that uses the old `ca.crt`.
    """
    if valid_days < 1:
        raise ValueError(f"invalid validity {valid_days} days: use at least 1 day")
    names = [_subject_alternative_name(value) for value in (host, *extra_hosts)]
    files = CertificateFiles(
        ca_certificate=out_dir / CA_CERT_FILE,
        ca_key=out_dir / CA_KEY_FILE,
        server_certificate=out_dir / SERVER_CERT_FILE,
        server_key=out_dir / SERVER_KEY_FILE,
    )
    _make_folder(out_dir)
    if not force:
        _reject_existing(
            [files.ca_certificate, files.ca_key, files.server_certificate, files.server_key],
            "every SuperNode that uses the old ca.crt would fail the TLS handshake",
        )

    now = datetime.datetime.now(datetime.timezone.utc)
    # A minute of slack so that a clock slightly behind the CA's still accepts it.
    not_before = now - datetime.timedelta(minutes=1)
    not_after = now + datetime.timedelta(days=valid_days)

    ca_key = ec.generate_private_key(CURVE)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pocketfl CA")])
    ca_certificate = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    server_key = ec.generate_private_key(CURVE)
    server_certificate = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )

    write_file(files.ca_certificate, ca_certificate.public_bytes(serialization.Encoding.PEM))
    write_file(files.ca_key, _pkcs8_pem(ca_key), private=True)
    write_file(files.server_certificate, server_certificate.public_bytes(serialization.Encoding.PEM))
    write_file(files.server_key, _pkcs8_pem(server_key), private=True)
    return files


def create_node_keys(out_dir: Path, names: list[str], force: bool = False) -> list[NodeKeyFiles]:
    """Create one SuperNode key pair per name, and the list of all public key files in `out_dir`.

    Writes `<name>` (private key, OpenSSH format, mode 0600) and `<name>.pub`
    (public key, OpenSSH format) for each name, and `public-keys.txt` with the
    absolute paths of every `*.pub` file in `out_dir`, sorted, one a line: the
    SuperNodes to register with `flwr supernode register`. Key pairs of other
    names already in the folder stay listed. Existing files of these names are
    replaced only with `force`, since a registered SuperNode's key may be in use.
    """
    if not names:
        raise ValueError("no SuperNode names given: pass at least one name, for example 'phone-1'")
    for name in names:
        if not NODE_NAME_PATTERN.fullmatch(name):
            raise ValueError(
                f"invalid SuperNode name {name!r}: use letters, digits, '.', '_' and '-', "
                "starting with a letter or digit"
            )
    if len(set(names)) != len(names):
        raise ValueError(f"duplicate SuperNode names in {names}: give each SuperNode its own name")

    _make_folder(out_dir)
    if not force:
        paths = [out_dir / f"{name}{suffix}" for name in names for suffix in ("", ".pub")]
        _reject_existing(paths, "a SuperNode may already use the old key and be registered with it")

    created = []
    for name in names:
        key = ec.generate_private_key(CURVE)
        files = NodeKeyFiles(name=name, private_key=out_dir / name, public_key=out_dir / f"{name}.pub")
        private_bytes = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.OpenSSH,
            serialization.NoEncryption(),
        )
        public_bytes = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        write_file(files.private_key, private_bytes, private=True)
        write_file(files.public_key, public_bytes + b"\n")
        created.append(files)

    public_keys = sorted(path.resolve() for path in out_dir.glob("*.pub") if path.is_file())
    listing = "".join(f"{path}\n" for path in public_keys)
    write_file(out_dir / PUBLIC_KEY_LIST_FILE, listing.encode())
    return created


def write_file(path: Path, data: bytes, private: bool = False) -> None:
    """Write `data` to `path` atomically; with `private`, the file is mode 0600 from its creation.

    The temporary file that `mkstemp` creates is already 0600, so a private key
    is never readable by others, not even for a moment.
    """
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        if not private:
            os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        os.unlink(temporary)
        raise


def _make_folder(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"{out_dir} is a file, but a folder was expected: choose another --out-dir")
    out_dir.mkdir(parents=True, exist_ok=True)


def _reject_existing(paths: list[Path], consequence: str) -> None:
    existing = [str(path) for path in paths if path.exists()]
    if existing:
        raise ExistingFilesError(
            f"{', '.join(existing)} already exist: {consequence}. "
            "Choose another --out-dir, or pass --force to replace them"
        )


def _subject_alternative_name(value: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(value))
    except ValueError:
        pass
    if not _is_dns_name(value):
        raise ValueError(
            f"invalid host {value!r}: give an IP address or a DNS name of letters, digits, "
            "hyphens and dots, for example fl.example.org"
        )
    return x509.DNSName(value)


def _is_dns_name(value: str) -> bool:
    name = value.removesuffix(".")
    if not name or len(name) > MAX_DNS_NAME_LENGTH:
        return False
    return all(DNS_LABEL_PATTERN.fullmatch(label) for label in name.split("."))


def _pkcs8_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
