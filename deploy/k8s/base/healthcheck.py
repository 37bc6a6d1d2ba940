"""Health check of a headserve server from inside its container, with or without TLS.

The compose healthcheck runs this file (mounted at /etc/headserve/healthcheck.py); the Kubernetes probes run
the copy in k8s/base/healthcheck.py (tests/test_deploy.py checks that the two are the same):

    python /etc/headserve/healthcheck.py [--service NAME] [--port 50051] [--config FILE]
                                         [--tls-cert PEM --tls-key PEM]

Exit status 0 when NAME ("" = the server as a whole) answers SERVING on 127.0.0.1:PORT; otherwise 1, with
the reason on stdout (Kubernetes shows it in the pod's events).

- Why not Kubernetes' built-in `grpc:` probe: it connects in plaintext, and a TLS server refuses that.
- TLS on or off comes from the server's own settings (HEADSERVE_* variables, and the TOML file given with
  --config), so the check follows the server.
- With TLS, a first handshake reads the certificate the server presents now, without verifying it; the
  gRPC call then trusts exactly that certificate, under a name it carries. This checks that the server
  answers over TLS, not who it is (on loopback, it is the process in this container), so a certificate
  from any CA passes, as does the previous certificate while a rotation is still unread. An expired
  certificate fails, as it fails every client.
- With tls_client_auth = "require" the server completes no handshake without a client certificate: give
  one issued by tls_client_ca_file with --tls-cert and --tls-key.
- Health needs no API key.
"""

from __future__ import annotations

import argparse
import datetime
import socket
import ssl
import sys

import grpc
from cryptography import x509
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service.config import Settings


def served_certificate(port: int, cert: str | None, key: str | None, timeout: float) -> bytes:
    """The certificate the server presents on 127.0.0.1:PORT, as PEM (read, not verified)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE  # only to read it; gRPC verifies the same certificate below
    context.set_alpn_protocols(["h2"])
    if cert:
        context.load_cert_chain(cert, key)
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    with context.wrap_socket(sock) as conn:  # closes sock too
        der = conn.getpeercert(binary_form=True)
    return ssl.DER_cert_to_PEM_cert(der).encode()


def name_in(leaf: x509.Certificate) -> str:
    """A host name the certificate is valid for (a wildcard's label filled in), to check it under."""
    names: list[str] = []
    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        names += san.get_values_for_type(x509.DNSName)
        names += [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        names += [str(a.value) for a in leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    if not names:
        raise ValueError("the server's certificate names no host")
    return names[0].replace("*", "probe", 1)


def check(args: argparse.Namespace) -> str:
    """'SERVING', or raises with the reason."""
    settings = Settings.load(args.config)
    target = f"127.0.0.1:{args.port}"
    if settings.tls:
        if settings.tls_client_auth == "require" and not args.tls_cert:
            raise ValueError("tls_client_auth = 'require': give the check a client certificate "
                             "(--tls-cert, --tls-key)")
        cert = key = None
        if args.tls_cert:
            with open(args.tls_cert, "rb") as c, open(args.tls_key, "rb") as k:
                cert, key = c.read(), k.read()
        pem = served_certificate(args.port, args.tls_cert, args.tls_key, args.timeout)
        leaf = x509.load_pem_x509_certificate(pem)
        if leaf.not_valid_after_utc < datetime.datetime.now(datetime.timezone.utc):
            expiry = leaf.not_valid_after_utc
            raise ValueError(f"the server's certificate expired at {expiry:%Y-%m-%d %H:%M} UTC")
        credentials = grpc.ssl_channel_credentials(pem, private_key=key, certificate_chain=cert)
        # Checked under a name the certificate carries: 127.0.0.1 is rarely one of them.
        options = [("grpc.ssl_target_name_override", name_in(leaf))]
        channel = grpc.secure_channel(target, credentials, options=options)
    else:
        channel = grpc.insecure_channel(target)
    with channel:
        request = health_pb2.HealthCheckRequest(service=args.service)
        response = health_pb2_grpc.HealthStub(channel).Check(request, timeout=args.timeout)
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description="exit 0 when the headserve server here is SERVING")
    parser.add_argument("--service", default="", help='health service name (default: "", the server overall)')
    parser.add_argument("--port", type=int, default=50051)
    parser.add_argument("--config", help="the server's TOML settings file, if it has one")
    parser.add_argument("--tls-cert", help="client certificate, when the server requires one")
    parser.add_argument("--tls-key", help="private key of --tls-cert")
    parser.add_argument("--timeout", type=float, default=4.0,
                        help="seconds for each of its two steps (default: 4)")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.tls_cert) != bool(args.tls_key):
        parser.error("--tls-cert and --tls-key go together")
    try:
        status = check(args)
    except grpc.RpcError as exc:
        print(f"not healthy: {exc.code().name}: {exc.details()}")
        return 1
    except (OSError, ValueError) as exc:  # not listening yet, TLS failures, unusable settings or files
        print(f"not healthy: {exc}")
        return 1
    print(status)
    return 0 if status == "SERVING" else 1


if __name__ == "__main__":
    sys.exit(main())
