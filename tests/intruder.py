"""An intruder on a pair's network: what it tries on a secondary.

Used by the real-QEMU and the namespace-lab tests; run as a program it
tries a secondary's data port three ways and prints, as JSON, how many
bytes each attempt got back before the secondary closed it (0: refused
at the handshake)::

    python -m tests.intruder HOST PORT DISK_SIZE
    # {"plain TCP": 0, "a stranger's certificate": 0, ...}
"""

import datetime
import json
import os
import socket
import ssl
import sys
import tempfile

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from mftvm_openstack.contract.hello import PROTOCOL_VERSION, Hello
from mftvm_openstack.ft import pair_tls, transport


def self_signed(directory):
    """A client cert and key of nobody's pair CA, in ``directory``."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME,
                                         'mftvm-primary-' + '0' * 32)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .sign(key, hashes.SHA256()))
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, 'client-cert.pem'), 'wb') as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(os.path.join(directory, 'client-key.pem'), 'wb') as f:
        f.write(key.private_bytes(serialization.Encoding.PEM,
                                  serialization.PrivateFormat.PKCS8,
                                  serialization.NoEncryption()))
    return directory


def intruder_context(directory):
    """TLS as an intruder speaks it: shows ``directory``'s client cert,
    trusts any server."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(os.path.join(directory, 'client-cert.pem'),
                        os.path.join(directory, 'client-key.pem'))
    return ctx


def hello_frame(disk_size):
    """A well-formed HELLO, as a primary of pair 'evil' would send it."""
    hello = Hello(version=PROTOCOL_VERSION, qemu_pid=1, host_pid=1,
                  boot_id='x', pair_id='evil', disk_size=disk_size,
                  domain_xml=None).to_dict()
    payload = json.dumps(hello).encode()
    return transport.HEADER.pack(transport.MAGIC, transport.Kind.HELLO, 0,
                                 len(payload)) + payload


def intrude(port, frame, ctx=None, host='127.0.0.1'):
    """Connect, (handshake,) send ``frame``; what came back before the
    secondary closed the connection (b'' for nothing)."""
    got = b''
    with socket.create_connection((host, port), timeout=10) as raw:
        sock = raw
        try:
            if ctx is not None:
                sock = ctx.wrap_socket(raw, server_hostname='x')
            sock.sendall(frame)
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                got += chunk
        except (ssl.SSLError, ConnectionError, OSError):
            pass
    return got


def intruders(tmp):
    """Name → TLS context (None: plain TCP) of each kind of intruder."""
    other = pair_tls.PairCredentials.generate()
    return {
        'plain TCP': None,
        'a stranger\'s certificate': intruder_context(
            self_signed(os.path.join(tmp, 'stranger'))),
        'another pair\'s certificate': intruder_context(
            pair_tls.write_client(other.client_bundle(),
                                  os.path.join(tmp, 'other'))),
    }


def main(argv):
    host, port, disk_size = argv[0], int(argv[1]), int(argv[2])
    # a HELLO, then PRIMARY_LOST: what would start a guest, or fail one
    # over, on a secondary that believed it
    frames = hello_frame(disk_size) + transport.HEADER.pack(
        transport.MAGIC, transport.Kind.PRIMARY_LOST, 0, 2) + b'{}'
    with tempfile.TemporaryDirectory() as tmp:
        got = {who: len(intrude(port, frames, ctx, host))
               for who, ctx in intruders(tmp).items()}
    print(json.dumps(got))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
