"""TLS for the server and its clients (placeholder until the TLS module lands)."""

from __future__ import annotations

import grpc

from service.config import Settings


def server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if not settings.tls:
        return None
    raise NotImplementedError("TLS is being built")
