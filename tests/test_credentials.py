"""Certificates and SuperNode keys that `pocketfl certs` and `pocketfl node-keys` write."""

import ipaddress
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from pocketfl.server.credentials import (
    PUBLIC_KEY_LIST_FILE,
    ExistingFilesError,
    create_certificates,
    create_node_keys,
)


def _mode(path):
    return stat.S_IMODE(path.stat().st_mode)


def test_server_certificate_chains_to_ca(tmp_path):
    files = create_certificates(tmp_path, "fl.example.org")
    ca = x509.load_pem_x509_certificate(files.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())

    # Raises if the issuer does not match or the signature is not the CA's.
    server.verify_directly_issued_by(ca)
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca


def test_server_key_matches_certificate(tmp_path):
    files = create_certificates(tmp_path, "fl.example.org")
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), password=None)

    assert key.public_key().public_numbers() == server.public_key().public_numbers()


def test_san_holds_dns_host(tmp_path):
    files = create_certificates(tmp_path, "fl.example.org", ("localhost",))
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert names.get_values_for_type(x509.DNSName) == ["fl.example.org", "localhost"]
    assert names.get_values_for_type(x509.IPAddress) == []


def test_san_holds_ip_host(tmp_path):
    files = create_certificates(tmp_path, "127.0.0.1")
    server = x509.load_pem_x509_certificate(files.server_certificate.read_bytes())
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value

    assert names.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]


def test_private_keys_are_owner_only(tmp_path):
    files = create_certificates(tmp_path, "127.0.0.1")

    assert _mode(files.server_key) == 0o600
    assert _mode(files.ca_key) == 0o600
    assert _mode(files.server_certificate) == 0o644
    assert _mode(files.ca_certificate) == 0o644


def test_rewrite_keeps_owner_only_mode(tmp_path):
    files = create_certificates(tmp_path, "127.0.0.1")
    files.server_key.chmod(0o644)
    create_certificates(tmp_path, "127.0.0.1", force=True)

    assert _mode(files.server_key) == 0o600


def test_certificates_keep_existing_ca(tmp_path):
    files = create_certificates(tmp_path, "127.0.0.1")
    ca_before = files.ca_certificate.read_bytes()

    with pytest.raises(ExistingFilesError, match=r"ca\.crt.*ca\.key.*server\.pem.*server\.key.*--force"):
        create_certificates(tmp_path, "127.0.0.1")
    assert files.ca_certificate.read_bytes() == ca_before

    create_certificates(tmp_path, "127.0.0.1", force=True)
    assert files.ca_certificate.read_bytes() != ca_before


def test_certificates_reject_file_as_folder(tmp_path):
    target = tmp_path / "afile"
    target.write_text("not a folder")

    with pytest.raises(NotADirectoryError, match="folder was expected"):
        create_certificates(target, "127.0.0.1")


@pytest.mark.parametrize("host", ["localhost", "fl.example.org", "fl.example.org.", "::1", "10.0.0.7"])
def test_certificates_accept_dns_names_and_ips(tmp_path, host):
    create_certificates(tmp_path, host)


@pytest.mark.parametrize(
    "host", ["", " spaced", "with space ", "bad host!", "-lead.example.org", "a..b", "x" * 64 + ".org"]
)
def test_certificates_reject_bad_host(tmp_path, host):
    with pytest.raises(ValueError, match="invalid host"):
        create_certificates(tmp_path, host)


def test_node_keys_are_openssh_p384(tmp_path):
    created = create_node_keys(tmp_path, ["phone-1", "phone-2"])

    for files in created:
        private = serialization.load_ssh_private_key(files.private_key.read_bytes(), password=None)
        public = serialization.load_ssh_public_key(files.public_key.read_bytes())
        assert isinstance(private.curve, ec.SECP384R1)
        assert private.public_key().public_numbers() == public.public_numbers()
        assert _mode(files.private_key) == 0o600


def test_node_key_list_names_public_keys(tmp_path):
    created = create_node_keys(tmp_path, ["phone-1", "phone-2"])
    listed = (tmp_path / PUBLIC_KEY_LIST_FILE).read_text().splitlines()

    assert listed == [str(files.public_key.resolve()) for files in created]


def test_node_keys_keep_existing_key(tmp_path):
    (first,) = create_node_keys(tmp_path, ["phone-1"])
    key_before = first.private_key.read_bytes()

    with pytest.raises(ExistingFilesError, match=r"phone-1.*--force"):
        create_node_keys(tmp_path, ["phone-2", "phone-1"])
    assert first.private_key.read_bytes() == key_before
    assert not (tmp_path / "phone-2").exists()

    create_node_keys(tmp_path, ["phone-1"], force=True)
    assert first.private_key.read_bytes() != key_before


def test_node_key_list_keeps_earlier_pairs(tmp_path):
    earlier = create_node_keys(tmp_path, ["phone-1"])
    later = create_node_keys(tmp_path, ["phone-2", "phone-3"])
    listed = (tmp_path / PUBLIC_KEY_LIST_FILE).read_text().splitlines()

    assert listed == [str(files.public_key.resolve()) for files in earlier + later]


@pytest.mark.parametrize("names", [[], ["a b"], ["-x"], ["same", "same"]])
def test_node_keys_reject_bad_names(tmp_path, names):
    with pytest.raises(ValueError):
        create_node_keys(tmp_path, names)
