"""The cluster's TLS material: a CA made once in the state dir, and the server certificates it issues.

The API certificate names the VIP and every api-pe node's address (HAProxy verifies the nodes with it, clients
the VIP); the bus certificate names the bus VIP, every bus node and 127.0.0.1 (the bus agent's own checks).
A certificate is issued again when the addresses it must name change or its end is near, never otherwise:
a second deploy pushes the same bytes. An operator may bring the API certificate (api.cert_file/key_file,
ca_file to verify it); the bus always uses the cluster CA.
"""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from congressctl.errors import TlsError
from congressctl.files import atomic_write
from congressctl.inventory import Inventory

TLS_DIR = "/etc/congressctl/tls"          # on the hosts
API_CA = f"{TLS_DIR}/ca.crt"              # verifies the API's certificate (the cluster CA or the operator's)
API_CERT = f"{TLS_DIR}/api.crt"
API_KEY = f"{TLS_DIR}/api.key"
API_PEM = f"{TLS_DIR}/api.pem"            # certificate and key in one file, as HAProxy's `crt` takes them
BUS_CA = f"{TLS_DIR}/bus-ca.crt"
BUS_CERT = f"{TLS_DIR}/bus.crt"
BUS_KEY = f"{TLS_DIR}/bus.key"
CA_DAYS = 3650
CERT_DAYS = 825          # the longest validity clients (Apple's, browsers') still accept for a server certificate
RENEW_DAYS = 30          # a certificate with less left is issued again by the next deploy


@dataclass(frozen=True)
class Pair:
    cert: bytes    # PEM (a chain for an operator's certificate)
    key: bytes     # PEM, unencrypted


@dataclass(frozen=True)
class Material:
    """What deploy pushes: the API's certificate and the CA that verifies it, and the bus's when bus.tls."""

    api: Pair
    api_ca: bytes
    bus: Pair | None = None
    bus_ca: bytes | None = None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def make_ca(cluster: str, *, days: int = CA_DAYS) -> Pair:
    key = _new_key()
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"congressctl {cluster} cluster CA")])
    now = _now()
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return Pair(cert=cert.public_bytes(serialization.Encoding.PEM), key=_key_pem(key))


def issue(ca: Pair, *, name: str, addresses: list[str], days: int = CERT_DAYS) -> Pair:
    """A server certificate signed by `ca` naming `addresses` (IP addresses) as its subject alternative names."""
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    ca_key = serialization.load_pem_private_key(ca.key, password=None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    key = _new_key()
    now = _now()
    sans = [x509.IPAddress(ipaddress.ip_address(a)) for a in sorted(set(addresses))]
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_cert.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    return Pair(cert=cert.public_bytes(serialization.Encoding.PEM), key=_key_pem(key))


def addresses_of(cert_pem: bytes) -> set[str]:
    """The IP addresses a certificate names (its first certificate, for a chain)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    return {str(a) for a in sans.get_values_for_type(x509.IPAddress)}


def still_good(pair: Pair, ca: Pair, addresses: list[str]) -> bool:
    """`pair` was issued by `ca`, names exactly `addresses`, and has more than RENEW_DAYS left."""
    cert = x509.load_pem_x509_certificate(pair.cert)
    ca_cert = x509.load_pem_x509_certificate(ca.cert)
    if cert.issuer != ca_cert.subject or addresses_of(pair.cert) != set(addresses):
        return False
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return cert.not_valid_after_utc - _now() > datetime.timedelta(days=RENEW_DAYS)


def api_addresses(inv: Inventory) -> list[str]:
    return [inv.vip.address] + [n.address for n in inv.with_role("api-pe")]


def bus_addresses(inv: Inventory) -> list[str]:
    return ([inv.bus.vip] if inv.bus.vip else []) + [n.address for n in inv.with_role("bus")] + ["127.0.0.1"]


def _read_pair(folder: Path, name: str) -> Pair | None:
    cert, key = folder / f"{name}.crt", folder / f"{name}.key"
    if not (cert.exists() and key.exists()):
        return None
    return Pair(cert=cert.read_bytes(), key=key.read_bytes())


def _write_pair(folder: Path, name: str, pair: Pair) -> Pair:
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    atomic_write(folder / f"{name}.key", pair.key, 0o600)   # the key first: a cert never names a missing key
    atomic_write(folder / f"{name}.crt", pair.cert, 0o644)
    return pair


def state_folder(inv: Inventory) -> Path:
    return inv.state_dir / "tls"


def ca_path(inv: Inventory) -> Path:
    """The file clients verify the API with (`--os-cacert`): the operator's ca_file, or the cluster CA."""
    if inv.api_tls.ca_file:
        return inv.resolve(inv.api_tls.ca_file)
    return state_folder(inv) / "ca.crt"


def cluster_ca(inv: Inventory, create: bool = True) -> Pair | None:
    folder = state_folder(inv)
    ca = _read_pair(folder, "ca")
    if ca is None and create:
        ca = _write_pair(folder, "ca", make_ca(inv.cluster))
    return ca


def server_pair(inv: Inventory, ca: Pair, name: str, addresses: list[str], *, create: bool = True) -> Pair:
    """The certificate `name` of the state dir, issued again when it no longer fits (see still_good); kept
    in the state dir only when `create` (a dry run shows what would change and writes nothing)."""
    folder = state_folder(inv)
    pair = _read_pair(folder, name)
    if pair is not None and still_good(pair, ca, addresses):
        return pair
    pair = issue(ca, name=f"congressctl {inv.cluster} {name}", addresses=addresses)
    return _write_pair(folder, name, pair) if create else pair


def _operator_api(inv: Inventory) -> tuple[Pair, bytes]:
    paths = {"api.cert_file": inv.api_tls.cert_file, "api.key_file": inv.api_tls.key_file,
             "api.ca_file": inv.api_tls.ca_file}
    data = {}
    for field_name, relative in paths.items():
        assert relative is not None   # the inventory takes the three together or none
        path = inv.resolve(relative)
        try:
            data[field_name] = path.read_bytes()
        except OSError as exc:
            raise TlsError(f"{field_name} {path}: {exc.strerror}", file=str(inv.path), field=field_name) from None
    return Pair(cert=data["api.cert_file"], key=data["api.key_file"]), data["api.ca_file"]


def load_material(inv: Inventory, create: bool = True) -> Material | None:
    """Everything deploy pushes for TLS (None when the inventory turns it all off, or when it is missing
    and create=False). Makes the cluster CA once and (re)issues the certificates as needed."""
    if not inv.api_tls.enabled and not inv.bus.tls:
        return None
    ca = cluster_ca(inv, create)
    if ca is None:
        return None
    if inv.api_tls.cert_file:
        api, api_ca = _operator_api(inv)
    else:
        api, api_ca = server_pair(inv, ca, "api", api_addresses(inv), create=create), ca.cert
    bus = server_pair(inv, ca, "bus", bus_addresses(inv), create=create) if inv.bus.tls else None
    return Material(api=api, api_ca=api_ca, bus=bus, bus_ca=ca.cert if inv.bus.tls else None)


def client_context(ca_file: str | Path) -> ssl.SSLContext:
    """What congressctl's own clients verify the API with: `ca_file` alone, never the system's store."""
    try:
        return ssl.create_default_context(cafile=str(ca_file))
    except (OSError, ssl.SSLError) as exc:
        raise TlsError(f"cannot load the CA file {ca_file} ({exc}); `congressctl deploy` makes it",
                       file=str(ca_file)) from None


def client_verify(inv: Inventory) -> ssl.SSLContext | bool:
    """httpx's `verify` for the API of `inv`: the CA's context with TLS on (True, unused, for plain HTTP)."""
    return client_context(ca_path(inv)) if inv.api_tls.enabled else True


def curl_args(inv: Inventory) -> str:
    """curl's options on a host to verify the API (the CA file deploy pushed there), empty for plain HTTP."""
    return f"--cacert {API_CA} " if inv.api_tls.enabled else ""
