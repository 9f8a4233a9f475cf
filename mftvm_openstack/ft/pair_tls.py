"""A pair's credentials: who may be a secondary's primary, and the reverse.

Whoever reaches a secondary's data port or its NBD export must not become
its primary, nor read or change the replica. So every pair gets its own
trust root when its secondary is prepared: a one-off certificate
authority, kept in memory only, signs one server certificate (the
secondary's) and one client certificate (the primary's), and its key is
then thrown away. Nobody can sign a third certificate for the pair; a
certificate of another pair, or of any other authority, fails the chain
check. Both ends check the other's name as well (:func:`server_name`,
:func:`client_name`).

The files are laid out as QEMU's ``tls-creds-x509`` object reads a
directory (``ca-cert.pem``, ``server-cert.pem`` and ``server-key.pem``;
or ``client-cert.pem`` and ``client-key.pem``), so the one directory
serves both the data stream (:mod:`ssl`) and the NBD export::

    creds = PairCredentials.generate()          # on the secondary's host
    creds.write_server('/var/lib/mftvm/vm0/tls/server')
    reply = creds.client_bundle().to_dict()     # to the primary, by RPC
    ...
    write_client(ClientCredentials.from_dict(reply),
                 '/var/lib/mftvm/vm0/tls/client')
    ctx = client_context('/var/lib/mftvm/vm0/tls/client')
    ctx = server_context('/var/lib/mftvm/vm0/tls/server')

The client key travels only in the agent's RPC reply (or, on one machine,
in the guest's own 0700 directory), never on the data stream it guards.
Files are 0600 in a 0700 directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import secrets
import ssl
from typing import Optional

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mftvm_openstack.contract.spec import ClientCredentials
from mftvm_openstack.files import private_dir, write_private

CA_CERT = 'ca-cert.pem'
SERVER_CERT = 'server-cert.pem'
SERVER_KEY = 'server-key.pem'
CLIENT_CERT = 'client-cert.pem'
CLIENT_KEY = 'client-key.pem'

#: how long the certificates are valid: a protection may last for years
#: (it is the CA's discarded key, not expiry, that keeps them apart)
VALIDITY = datetime.timedelta(days=3650)


class CredentialsError(Exception):
    """Credentials are missing, unreadable or not the pair's."""


def new_pair_key() -> str:
    """A fresh, unguessable id for one pair's certificates."""
    return secrets.token_hex(16)


def server_name(pair_key: str) -> str:
    """The secondary's certificate name (CN and DNS SAN)."""
    return f'mftvm-secondary-{pair_key}'


def client_name(pair_key: str) -> str:
    """The primary's certificate name (CN)."""
    return f'mftvm-primary-{pair_key}'


def client_dn(pair_key: str) -> str:
    """The primary's distinguished name as QEMU's ``tls-authz`` sees it
    (GnuTLS's RFC 4514 string of a CN-only subject)."""
    return f'CN={client_name(pair_key)}'


def _key() -> ec.EllipticCurvePrivateKey:
    # P-256: quick to make and to handshake, and GnuTLS (QEMU) takes it.
    return ec.generate_private_key(ec.SECP256R1())


def _pem_key(key: ec.EllipticCurvePrivateKey) -> str:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def _pem_cert(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _certificate(subject: x509.Name, key: ec.EllipticCurvePrivateKey,
                 issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
                 now: datetime.datetime, *,
                 usage: Optional[x509.ObjectIdentifier] = None,
                 dns_name: Optional[str] = None) -> x509.Certificate:
    """``subject``'s certificate for ``key``, signed by ``signer`` in
    ``issuer``'s name: the pair's CA without ``usage`` (it signs only
    certificates), else an end entity for that extended key usage."""
    ca = usage is None
    builder = (x509.CertificateBuilder()
               .subject_name(subject).issuer_name(issuer)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(
                   ca=ca, path_length=0 if ca else None), critical=True)
               .add_extension(x509.KeyUsage(
                   digital_signature=not ca, key_encipherment=not ca,
                   content_commitment=False, data_encipherment=False,
                   key_agreement=False, key_cert_sign=ca, crl_sign=ca,
                   encipher_only=False, decipher_only=False),
                   critical=True))
    if usage is not None:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]),
                                        critical=False)
    if dns_name is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(dns_name)]),
            critical=False)
    return builder.sign(signer, hashes.SHA256())


def write_client(bundle: ClientCredentials, directory: str) -> str:
    """Write the primary's creds directory (0700, files 0600)."""
    private_dir(directory)
    write_private(os.path.join(directory, CA_CERT), bundle.ca_cert.encode())
    write_private(os.path.join(directory, CLIENT_CERT), bundle.cert.encode())
    write_private(os.path.join(directory, CLIENT_KEY), bundle.key.encode())
    _write_pair_key(directory, bundle.pair_key)
    return directory


@dataclasses.dataclass(frozen=True)
class PairCredentials:
    """One pair's CA certificate and its two issued certificates (PEM);
    the CA's key is gone once :meth:`generate` returns."""

    pair_key: str
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    @classmethod
    def generate(cls, pair_key: Optional[str] = None,
                 now: Optional[datetime.datetime] = None) \
            -> PairCredentials:
        pair_key = pair_key or new_pair_key()
        now = now or datetime.datetime.now(datetime.UTC)
        ca_key, server_key, client_key = _key(), _key(), _key()
        ca_name = _name(f'mftvm-pair-ca-{pair_key}')
        ca_cert = _certificate(ca_name, ca_key, ca_name, ca_key, now)
        server_cert = _certificate(
            _name(server_name(pair_key)), server_key, ca_name, ca_key, now,
            usage=ExtendedKeyUsageOID.SERVER_AUTH,
            dns_name=server_name(pair_key))
        client_cert = _certificate(
            _name(client_name(pair_key)), client_key, ca_name, ca_key, now,
            usage=ExtendedKeyUsageOID.CLIENT_AUTH)
        # ca_key goes out of scope here: no further certificate can be
        # signed for this pair.
        return cls(pair_key=pair_key, ca_cert=_pem_cert(ca_cert),
                   server_cert=_pem_cert(server_cert),
                   server_key=_pem_key(server_key),
                   client_cert=_pem_cert(client_cert),
                   client_key=_pem_key(client_key))

    def client_bundle(self) -> ClientCredentials:
        """The primary's half, as it travels in an RPC reply."""
        return ClientCredentials(pair_key=self.pair_key, ca_cert=self.ca_cert,
                            cert=self.client_cert, key=self.client_key)

    def write_server(self, directory: str) -> str:
        """Write the secondary's creds directory (0700, files 0600)."""
        private_dir(directory)
        write_private(os.path.join(directory, CA_CERT),
                      self.ca_cert.encode())
        write_private(os.path.join(directory, SERVER_CERT),
                      self.server_cert.encode())
        write_private(os.path.join(directory, SERVER_KEY),
                      self.server_key.encode())
        _write_pair_key(directory, self.pair_key)
        return directory


_PAIR_KEY_FILE = 'pair-key'


def _write_pair_key(directory: str, pair_key: str) -> None:
    write_private(os.path.join(directory, _PAIR_KEY_FILE),
                  pair_key.encode())


def read_pair_key(directory: str) -> str:
    """The pair key of the creds in ``directory``."""
    try:
        with open(os.path.join(directory, _PAIR_KEY_FILE)) as f:
            key = f.read().strip()
    except OSError as exc:
        raise CredentialsError(f'no pair credentials in {directory}: '
                               f'{exc.strerror}') from None
    if not all(c in '0123456789abcdef' for c in key) or \
            not 16 <= len(key) <= 64:
        raise CredentialsError(f'bad pair key in {directory}')
    return key


def _context(purpose: int, directory: str, cert: str,
             key: str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_verify_locations(os.path.join(directory, CA_CERT))
        ctx.load_cert_chain(os.path.join(directory, cert),
                            os.path.join(directory, key))
    except (OSError, ssl.SSLError) as exc:
        raise CredentialsError(f'cannot load the pair credentials in '
                               f'{directory}: {exc}') from None
    return ctx


def server_context(directory: str) -> ssl.SSLContext:
    """The secondary's side of the data stream: TLS 1.3, the primary
    must show a certificate of the pair's CA (check its name with
    :func:`peer_is_client`)."""
    return _context(ssl.PROTOCOL_TLS_SERVER, directory, SERVER_CERT,
                    SERVER_KEY)


def client_context(directory: str) -> ssl.SSLContext:
    """The primary's side: TLS 1.3, the secondary's certificate must be
    of the pair's CA and named :func:`server_name` (pass that as
    ``server_hostname``)."""
    ctx = _context(ssl.PROTOCOL_TLS_CLIENT, directory, CLIENT_CERT,
                   CLIENT_KEY)
    ctx.check_hostname = True
    return ctx


def peer_common_name(peercert: Optional[dict[str, object]]) -> str:
    """The CN of a verified peer certificate (``getpeercert()``)."""
    if not peercert:
        return ''
    for rdn in peercert.get('subject', ()):  # type: ignore[attr-defined]
        for attr, value in rdn:
            if attr == 'commonName':
                return str(value)
    return ''


def peer_is_client(peercert: Optional[dict[str, object]],
                   pair_key: str) -> bool:
    """Whether a verified peer certificate is the pair's primary's."""
    return peer_common_name(peercert) == client_name(pair_key)
