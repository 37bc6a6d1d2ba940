"""TLS and mutual TLS through real servers and real channels, with certificates made here for each run.

Two real headserve servers (TLS only, client certificates required) plus
one whose files are rotated under it; a bare gRPC server with the same credentials shows what the server
learns of its peer. Every call opens a fresh channel with its own subchannel pool, so no connection (and no
certificate) is reused from an earlier call.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import pathlib
from concurrent import futures

import grpc
import pydantic
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service import tls
from service.gen import headserve_pb2 as pb
from service.gen import headserve_pb2_grpc as pb_grpc
from service.server import build_server
from conftest import TINY_TEXT, make_settings

TIMEOUT = 5.0
OK, UNAVAILABLE = grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE


# --- certificates -------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Authority:
    """A CA that issues certificates, all P-256 (quick to make), valid for a day."""

    name: str
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @classmethod
    def create(cls, name: str) -> Authority:
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        cert = (
            _builder(subject, subject, key.public_key())
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )
        return cls(name, key, cert)

    @property
    def pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    def issue(self, common_name: str, server: bool) -> tuple[bytes, bytes]:
        """(certificate PEM, unencrypted key PEM); a server certificate is for localhost and 127.0.0.1."""
        key = ec.generate_private_key(ec.SECP256R1())
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
        builder = _builder(subject, self.cert.subject, key.public_key()).add_extension(
            x509.BasicConstraints(ca=False, path_length=None), critical=True
        )
        if server:
            builder = builder.add_extension(
                x509.SubjectAlternativeName(
                    [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
                ),
                critical=False,
            ).add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        else:
            builder = builder.add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
            )
        cert = builder.sign(self.key, hashes.SHA256())
        key_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
        return cert.public_bytes(serialization.Encoding.PEM), key_pem


def _builder(subject: x509.Name, issuer: x509.Name, public_key) -> x509.CertificateBuilder:
    now = datetime.datetime.now(datetime.timezone.utc)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
    )


def write(path: pathlib.Path, data: bytes) -> pathlib.Path:
    """Writes by rename, as a deployment tool would (and so that every write is a new inode)."""
    part = path.with_name(path.name + ".part")
    part.write_bytes(data)
    os.replace(part, path)
    return path


@dataclasses.dataclass
class Files:
    """Everything the tests give servers and clients: CA bundles, the server's pair, client pairs."""

    root: pathlib.Path
    ca: Authority
    stranger_ca: Authority

    def __post_init__(self) -> None:
        self.ca_file = write(self.root / "ca.pem", self.ca.pem)
        self.stranger_ca_file = write(self.root / "stranger-ca.pem", self.stranger_ca.pem)
        self.server_cert, self.server_key = self.pair("server", self.ca, "localhost", server=True)
        self.client_cert, self.client_key = self.pair("client", self.ca, "client-a", server=False)
        self.stranger_cert, self.stranger_key = self.pair("stranger", self.stranger_ca, "client-x", False)

    def pair(self, stem: str, ca: Authority, cn: str, server: bool) -> tuple[pathlib.Path, pathlib.Path]:
        cert, key = ca.issue(cn, server)
        return write(self.root / f"{stem}.crt", cert), write(self.root / f"{stem}.key", key)

    def client(self, ca_file: pathlib.Path | None = None, who: str | None = None) -> grpc.ChannelCredentials:
        """Credentials trusting `ca_file` (default: our CA), presenting `who`'s certificate if given."""
        cert, key = {None: (None, None), "client": (self.client_cert, self.client_key),
                     "stranger": (self.stranger_cert, self.stranger_key)}[who]
        return tls.channel_credentials(ca_file or self.ca_file, cert, key)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Files:
    return Files(tmp_path_factory.mktemp("pki"), Authority.create("test CA"), Authority.create("stranger CA"))


# --- servers and calls --------------------------------------------------------------------------------------


def channel(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.Channel:
    options = [("grpc.use_local_subchannel_pool", 1)]  # no subchannel (connection) shared with other channels
    target = f"localhost:{port}"
    if credentials is None:
        return grpc.insecure_channel(target, options=options)
    return grpc.secure_channel(target, credentials, options=options)


def check(port: int, credentials: grpc.ChannelCredentials | None) -> grpc.StatusCode:
    """The status of one Health Check on a new connection."""
    with channel(port, credentials) as ch:
        try:
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
        except grpc.RpcError as exc:
            return exc.code()
        return OK


def serve(tmp_path_factory, **tls_settings):
    settings = make_settings(tmp_path_factory.mktemp("data"), builtin_backbones=[], **tls_settings)
    return build_server(settings)


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory, files):
    running = serve(tmp_path_factory, tls_cert_file=files.server_cert, tls_key_file=files.server_key)
    yield running
    running.stop(0)


@pytest.fixture(scope="module")
def mtls_server(tmp_path_factory, files):
    running = serve(tmp_path_factory, tls_cert_file=files.server_cert, tls_key_file=files.server_key,
                    tls_client_ca_file=files.ca_file, tls_client_auth="require")
    yield running
    running.stop(0)


class PeerProbe:
    """A bare gRPC server with headserve's credentials and one method that returns its peer's auth context."""

    def __init__(self, settings) -> None:
        def peer(request: bytes, context: grpc.ServicerContext) -> bytes:
            seen = {k: [v.decode(errors="replace") for v in vs] for k, vs in context.auth_context().items()}
            return json.dumps(seen).encode()

        handler = grpc.method_handlers_generic_handler(
            "probe.Probe", {"Peer": grpc.unary_unary_rpc_method_handler(peer)}
        )
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(handler,))
        self.port = self.server.add_secure_port("127.0.0.1:0", tls.server_credentials(settings))
        self.server.start()

    def peer(self, credentials: grpc.ChannelCredentials) -> dict[str, list[str]]:
        with channel(self.port, credentials) as ch:
            return json.loads(ch.unary_unary("/probe.Probe/Peer")(b"", timeout=TIMEOUT))

    def stop(self) -> None:
        self.server.stop(0).wait()


# --- TLS, server side only ----------------------------------------------------------------------------------


def test_tls_client_is_served(tls_server, files):
    assert check(tls_server.port, files.client()) == OK
    with channel(tls_server.port, files.client()) as ch:
        names = [b.name for b in pb_grpc.HeadServeStub(ch).ListBackbones(pb.ListBackbonesRequest(),
                                                                            timeout=TIMEOUT).backbones]
    assert TINY_TEXT in names


def test_plaintext_client_is_refused(tls_server):
    assert check(tls_server.port, None) == UNAVAILABLE


def test_client_trusting_another_ca_refuses_the_server(tls_server, files):
    assert check(tls_server.port, files.client(files.stranger_ca_file)) == UNAVAILABLE


def test_client_certificate_is_not_needed_nor_looked_at_without_client_auth(tls_server, files):
    assert check(tls_server.port, files.client(who="client")) == OK
    assert check(tls_server.port, files.client(who="stranger")) == OK


# --- mutual TLS ---------------------------------------------------------------------------------------------


def test_required_client_certificate(mtls_server, files):
    assert check(mtls_server.port, files.client()) == UNAVAILABLE
    assert check(mtls_server.port, files.client(who="stranger")) == UNAVAILABLE
    assert check(mtls_server.port, files.client(who="client")) == OK
    assert check(mtls_server.port, None) == UNAVAILABLE


def test_optional_client_auth_refuses_to_start(tmp_path, files):
    """grpc python cannot request a client certificate without requiring it (see service/tls.py), so
    'optional' would silently mean 'none': the server refuses it instead."""
    settings = make_settings(tmp_path, tls_cert_file=files.server_cert, tls_key_file=files.server_key,
                             tls_client_ca_file=files.ca_file, tls_client_auth="optional")
    with pytest.raises(ValueError, match="optional"):
        tls.server_credentials(settings)


def test_what_the_server_learns_of_its_peer(tmp_path, files):
    """With 'require' the client's certificate reaches the server's auth context."""
    required = PeerProbe(make_settings(tmp_path, tls_client_auth="require", tls_cert_file=files.server_cert,
                                       tls_key_file=files.server_key, tls_client_ca_file=files.ca_file))
    try:
        assert required.peer(files.client(who="client"))["x509_common_name"] == ["client-a"]
    finally:
        required.stop()


# --- rotation -----------------------------------------------------------------------------------------------


def test_rotation_serves_new_files_to_new_connections(tmp_path_factory, files, caplog):
    root = tmp_path_factory.mktemp("rotating")
    cert = write(root / "tls.crt", files.server_cert.read_bytes())
    key = write(root / "tls.key", files.server_key.read_bytes())
    new_ca = Authority.create("next CA")
    new_ca_file = write(root / "next-ca.pem", new_ca.pem)
    new_cert, new_key = new_ca.issue("localhost", server=True)
    old_client, new_client = files.client(), files.client(new_ca_file)

    running = serve(tmp_path_factory, tls_cert_file=cert, tls_key_file=key)
    try:
        with channel(running.port, old_client) as kept:  # a connection opened before the rotation
            stub = health_pb2_grpc.HealthStub(kept)
            stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
            assert check(running.port, old_client) == OK
            assert check(running.port, new_client) == UNAVAILABLE

            # Half written: the new certificate is in place, its key is not. The old pair is still served,
            # with one warning for this state of the files however many connections see it.
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="service.tls"):
                write(cert, new_cert)
                assert check(running.port, old_client) == OK
                assert check(running.port, old_client) == OK
                assert check(running.port, new_client) == UNAVAILABLE
            warnings = [r for r in caplog.records if r.name == "service.tls"]
            assert len(warnings) == 1, [r.getMessage() for r in warnings]
            assert "is not the key of the certificate" in warnings[0].getMessage()

            # The key lands: new connections get the new certificate, without a restart.
            write(key, new_key)
            assert check(running.port, new_client) == OK
            assert check(running.port, old_client) == UNAVAILABLE

            # Garbage written over the certificate: the last good pair stays.
            write(cert, b"not a certificate\n")
            assert check(running.port, new_client) == OK

            # The connection opened before the rotation keeps working.
            stub.Check(health_pb2.HealthCheckRequest(), timeout=TIMEOUT)
    finally:
        running.stop(0)


def test_reload_of_client_ca(tmp_path, files):
    """The client CA is re-read too: after it is replaced, only clients of the new CA get in."""
    ca_file = write(tmp_path / "clients.pem", files.ca.pem)
    probe = PeerProbe(make_settings(tmp_path, tls_cert_file=files.server_cert, tls_key_file=files.server_key,
                                    tls_client_ca_file=ca_file, tls_client_auth="require"))
    try:
        assert probe.peer(files.client(who="client"))["x509_common_name"] == ["client-a"]
        write(ca_file, files.stranger_ca.pem)
        assert probe.peer(files.client(who="stranger"))["x509_common_name"] == ["client-x"]
        with pytest.raises(grpc.RpcError) as refused:
            probe.peer(files.client(who="client"))
        assert refused.value.code() == UNAVAILABLE
    finally:
        probe.stop()


# --- start-up errors ----------------------------------------------------------------------------------------


def test_certificate_without_key_is_rejected_by_settings(tmp_path, files):
    with pytest.raises(pydantic.ValidationError, match="tls_cert_file and tls_key_file go together"):
        make_settings(tmp_path, tls_cert_file=files.server_cert)


def test_tls_off_gives_no_credentials(tmp_path):
    assert tls.server_credentials(make_settings(tmp_path)) is None


@pytest.mark.parametrize(
    "damage, match",
    [
        ("cert_not_pem", r"tls_cert_file .*server\.crt holds no readable PEM certificate"),
        ("key_not_pem", r"tls_key_file .*server\.key is not a PEM private key"),
        ("key_of_another", r"tls_key_file .*server\.key is not the key of the certificate"),
        ("key_encrypted", r"tls_key_file .*server\.key is encrypted"),
        ("cert_missing", r"tls_cert_file .*server\.crt does not exist"),
        ("cert_empty", r"tls_cert_file .*server\.crt is empty"),
        ("ca_not_pem", r"tls_client_ca_file .*ca\.pem holds no readable PEM certificate"),
    ],
)
def test_unusable_files_raise_value_error_naming_the_file(tmp_path, files, damage, match):
    cert = write(tmp_path / "server.crt", files.server_cert.read_bytes())
    key = write(tmp_path / "server.key", files.server_key.read_bytes())
    ca = write(tmp_path / "ca.pem", files.ca.pem)
    if damage == "cert_not_pem":
        write(cert, files.server_cert.read_bytes().replace(b"-----BEGIN CERTIFICATE-----", b""))
    elif damage == "key_not_pem":
        write(key, b"hello\n")
    elif damage == "key_of_another":
        write(key, files.client_key.read_bytes())
    elif damage == "key_encrypted":
        private = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
        write(key, private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                         serialization.BestAvailableEncryption(b"secret")))
    elif damage == "cert_missing":
        cert.unlink()
    elif damage == "cert_empty":
        write(cert, b"\n")
    elif damage == "ca_not_pem":
        write(ca, b"junk")
    settings = make_settings(tmp_path, tls_cert_file=cert, tls_key_file=key, tls_client_ca_file=ca,
                             tls_client_auth="require")
    with pytest.raises(ValueError, match=match):
        tls.server_credentials(settings)


# --- client credentials -------------------------------------------------------------------------------------


def test_channel_credentials_arguments(tmp_path, files):
    assert isinstance(tls.channel_credentials(), grpc.ChannelCredentials)  # the system's roots
    assert isinstance(tls.channel_credentials(files.ca_file, files.client_cert, files.client_key),
                      grpc.ChannelCredentials)
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        tls.channel_credentials(files.ca_file, cert_file=files.client_cert)
    with pytest.raises(ValueError, match="cert_file and key_file go together"):
        tls.channel_credentials(key_file=files.client_key)
    with pytest.raises(ValueError, match=r"CA file .*nowhere\.pem does not exist"):
        tls.channel_credentials(tmp_path / "nowhere.pem")
    with pytest.raises(ValueError, match=r"CA file .*client\.key holds no readable PEM certificate"):
        tls.channel_credentials(files.client_key)
    with pytest.raises(ValueError, match=r"key_file .*stranger\.key is not the key of the certificate"):
        tls.channel_credentials(files.ca_file, files.client_cert, files.stranger_key)
