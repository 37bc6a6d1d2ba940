"""TLS for the server, with certificates reloaded from disk without a restart, and for its clients.

Decisions:

- The server's credentials are `grpc.dynamic_ssl_server_credentials`. gRPC calls our fetcher before the TLS
  handshake of every new connection (its first call is answered by gRPC itself with the initial
  configuration); the fetcher returns None for "no change" or a new certificate configuration, which that
  connection and every later one use. Connections already open keep the certificate they began with.
- A change is seen by `os.stat` of each file: (device, inode, mtime_ns, size), a few microseconds per
  connection, so the fetcher stats on every call and re-reads files only when a stamp differs. The inode is
  in the stamp so that a file replaced by rename (as Kubernetes swaps a mounted secret) counts as changed even
  with the same size and time.
- Files are checked before they are served, at start-up and at each reload: each holds PEM certificates (or a
  PEM key), the key is unencrypted and belongs to the chain's first certificate (public keys compared with
  `cryptography`). gRPC would refuse a mismatched pair too, but only inside a handshake, logging an error on
  every connection; at start-up we raise `ValueError` naming the file and what to do instead.
- The fetcher never raises (gRPC would log a traceback at every connection). When the new files
  are missing, half written (the certificate replaced, the key not yet) or do not match, it keeps serving the
  previous configuration and logs one warning per state of the files; when they change again (the key lands)
  it tries again. An expired certificate is served, with a warning: refusing it would turn a clock problem
  into an outage.
- One credentials object serves one `add_secure_port`: the fetcher hands each new configuration out once, to
  the one security connector gRPC makes per port.

Client certificates (`tls_client_auth`):

- "none": no client certificate is asked for; `tls_client_ca_file`, if set, is ignored (with a warning).
- "require": the handshake fails unless the client presents a certificate that chains to
  `tls_client_ca_file` (re-read on change, like the server's pair).
- "optional" cannot be expressed in grpc python (1.85): `require_client_authentication=False` maps to gRPC
  core's GRPC_SSL_DONT_REQUEST_CLIENT_CERTIFICATE whatever root certificates the configuration carries, so the
  server never sends a certificate request and clients never send a certificate. tests/test_tls.py checks it:
  with "optional", clients without a certificate, with one from the right CA and with one from an unrelated
  CA all connect, and the server's auth context holds no x509 entry in any case. Rather than serve a
  security setting that silently does less than it says, the server refuses to start with "optional".
"""

from __future__ import annotations

import datetime
import logging
import os
import pathlib
import threading

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from service.config import Settings

log = logging.getLogger(__name__)

_Stamp = tuple[int, int, int, int] | None  # (st_dev, st_ino, st_mtime_ns, st_size); None: cannot stat


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    """The server's TLS credentials, or None when TLS is off; raises ValueError on unusable files."""
    if not settings.tls:
        return None
    assert settings.tls_cert_file is not None and settings.tls_key_file is not None  # Settings checks both
    require = settings.tls_client_auth == "require"
    if settings.tls_client_auth == "optional":
        raise ValueError(
            "tls_client_auth = 'optional' cannot be served: grpc python cannot ask for a client certificate "
            "without requiring one, so no client would ever be identified by its certificate. Set "
            "tls_client_auth = 'require' for mutual TLS, or 'none' (and API keys) otherwise"
        )
    if settings.tls_client_auth == "none" and settings.tls_client_ca_file is not None:
        log.warning("tls_client_ca_file %s is ignored: tls_client_auth is 'none'",
                    settings.tls_client_ca_file)
    files = CertificateFiles(
        settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file if require else None
    )
    log.info("TLS on: certificate %s (%s); client certificates %s", files.cert_file, files.describe(),
             f"required, CA {files.client_ca_file}" if require else "not requested")
    return grpc.dynamic_ssl_server_credentials(
        files.configuration, files.fetch, require_client_authentication=require
    )


def channel_credentials(
    ca_file: os.PathLike | str | None = None,
    cert_file: os.PathLike | str | None = None,
    key_file: os.PathLike | str | None = None,
) -> grpc.ChannelCredentials:
    """A client's TLS credentials: the CA bundle that signed the server's certificate (None: the system's
    roots) and, for mutual TLS, the client's certificate chain and key (both or neither)."""
    if (cert_file is None) != (key_file is None):
        raise ValueError("cert_file and key_file go together: give both for a client certificate, or neither")
    root = None
    if ca_file is not None:
        root = _read(pathlib.Path(ca_file), "CA file")
        _certificates(root, pathlib.Path(ca_file), "CA file")
    chain = key = None
    if cert_file is not None and key_file is not None:
        cert_path, key_path = pathlib.Path(cert_file), pathlib.Path(key_file)
        chain, key, _ = _checked_pair(cert_path, key_path, "cert_file", "key_file")
    return grpc.ssl_channel_credentials(root_certificates=root, private_key=key, certificate_chain=chain)


class CertificateFiles:
    """The server's certificate, key and client CA files, and the configuration last built from them.

    Building one reads and checks the files (ValueError when they cannot be used); `fetch` is gRPC's
    certificate configuration fetcher.
    """

    def __init__(self, cert_file: pathlib.Path, key_file: pathlib.Path,
                 client_ca_file: pathlib.Path | None = None) -> None:
        self.cert_file = pathlib.Path(cert_file)
        self.key_file = pathlib.Path(key_file)
        self.client_ca_file = None if client_ca_file is None else pathlib.Path(client_ca_file)
        self._lock = threading.Lock()
        self._stamps = self._stat()
        self._refused: tuple[_Stamp, ...] | None = None
        self.configuration, self._leaf = self._load()

    def describe(self) -> str:
        """Subject, issuer and expiry of the certificate being served."""
        leaf = self._leaf
        return (f"{leaf.subject.rfc4514_string()} issued by {leaf.issuer.rfc4514_string()}, "
                f"valid until {leaf.not_valid_after_utc:%Y-%m-%d %H:%M} UTC")

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """A new configuration when the files changed into a usable set, else None (keep the current one)."""
        try:
            with self._lock:
                stamps = self._stat()
                if stamps == self._stamps or stamps == self._refused:
                    return None
                self._refused = stamps  # until they prove usable: one message per state of the files
                try:
                    configuration, leaf = self._load()
                except ValueError as exc:
                    log.warning("TLS files changed but cannot be served (%s); still serving %s", exc,
                                self.describe())
                    return None
                self._stamps, self._refused = stamps, None
                self.configuration, self._leaf = configuration, leaf
                log.info("TLS certificate reloaded from %s: %s", self.cert_file, self.describe())
                return configuration
        except Exception:  # raised into gRPC, it would be logged at every new connection
            log.exception("reloading TLS files failed; still serving the previous certificate")
            return None

    def _paths(self) -> tuple[pathlib.Path, ...]:
        return tuple(p for p in (self.cert_file, self.key_file, self.client_ca_file) if p is not None)

    def _stat(self) -> tuple[_Stamp, ...]:
        stamps: list[_Stamp] = []
        for path in self._paths():
            try:
                st = path.stat()
            except OSError:
                stamps.append(None)
            else:
                stamps.append((st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size))
        return tuple(stamps)

    def _load(self) -> tuple[grpc.ServerCertificateConfiguration, x509.Certificate]:
        chain, key, leaf = _checked_pair(self.cert_file, self.key_file, "tls_cert_file", "tls_key_file")
        client_ca = None
        if self.client_ca_file is not None:
            client_ca = _read(self.client_ca_file, "tls_client_ca_file")
            _certificates(client_ca, self.client_ca_file, "tls_client_ca_file")
        now = datetime.datetime.now(datetime.timezone.utc)
        if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
            log.warning("TLS certificate %s is valid from %s to %s only, not now; clients will refuse it",
                        self.cert_file, leaf.not_valid_before_utc, leaf.not_valid_after_utc)
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=client_ca), leaf


def _checked_pair(
    cert_file: pathlib.Path, key_file: pathlib.Path, cert_name: str, key_name: str
) -> tuple[bytes, bytes, x509.Certificate]:
    """The PEM chain, the PEM key and the chain's first certificate, once the key is found to belong to it.

    `cert_name` and `key_name` say in errors which setting or argument named the file.
    """
    chain = _read(cert_file, cert_name)
    key = _read(key_file, key_name)
    leaf = _certificates(chain, cert_file, cert_name)[0]
    try:
        private_key = serialization.load_pem_private_key(key, password=None)
    except TypeError:
        raise ValueError(
            f"{key_name} {key_file} is encrypted; gRPC needs an unencrypted PEM key "
            f"(e.g. `openssl pkey -in {key_file.name} -out plain.key`) kept readable by this user only"
        ) from None
    except Exception as exc:  # ValueError, UnsupportedAlgorithm: not a key we (or gRPC) can use
        raise ValueError(
            f"{key_name} {key_file} is not a PEM private key ({exc}); "
            "give the '-----BEGIN PRIVATE KEY-----' file that belongs to the certificate"
        ) from None
    der = serialization.Encoding.DER
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    if private_key.public_key().public_bytes(der, spki) != leaf.public_key().public_bytes(der, spki):
        raise ValueError(
            f"{key_name} {key_file} is not the key of the certificate in {cert_name} {cert_file} "
            f"({leaf.subject.rfc4514_string()}); give the key the certificate was issued for, "
            "with the certificate first in its file"
        )
    return chain, key, leaf


def _certificates(pem: bytes, path: pathlib.Path, name: str) -> list[x509.Certificate]:
    try:
        return x509.load_pem_x509_certificates(pem)
    except ValueError as exc:
        raise ValueError(
            f"{name} {path} holds no readable PEM certificate ({exc}); it must contain "
            "'-----BEGIN CERTIFICATE-----' blocks (convert DER with `openssl x509 -inform der`)"
        ) from None


def _read(path: pathlib.Path, name: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        where = "" if path.is_absolute() else f" (relative to {os.getcwd()})"
        raise ValueError(f"{name} {path} does not exist; check the path{where}") from None
    except OSError as exc:
        raise ValueError(
            f"{name} {path} cannot be read ({exc.strerror}); check the path and its permissions"
        ) from None
    if not data.strip():
        raise ValueError(f"{name} {path} is empty")
    return data
