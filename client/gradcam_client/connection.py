"""Where a client connects and how: the address (one server, several replicas balanced
round-robin, or a resolver name: `channel_target`), TLS and mutual TLS, the bearer token, the
default deadline and the retry policy, all checked once (`Connection.make`); the channel either
client opens from it (`Connection.open_channel`); and each call's attempts
(`Connection.attempts`). Messages may be as large as the server's (64 MiB).
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import grpc

from .retry import DEFAULT_BACKOFF, DEFAULT_RETRIES, DEFAULT_TIMEOUT, CallAttempts, RetryPolicy

PemInput = Union[bytes, str, os.PathLike[str]]
"""PEM data as bytes, or the path of a PEM file."""

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # as the server
DEFAULT_TARGET = "127.0.0.1:8001"


def _pem(value: PemInput | None) -> bytes | None:
    """PEM bytes of PEM bytes, PEM text, or the path of a PEM file."""
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, str) and value.lstrip().startswith("-----BEGIN"):
        return value.encode()
    return Path(value).read_bytes()


# Several replicas: calls spread over every address that passes grpc.health.v1 (gRPC's
# round_robin policy with health-checked subchannels); a failing replica leaves the rotation.
_REPLICAS_SERVICE_CONFIG = json.dumps({
    "loadBalancingConfig": [{"round_robin": {}}],
    "healthCheckConfig": {"serviceName": ""},
})


def channel_target(target: str | Sequence[str]) -> tuple[str, tuple[tuple[str, Any], ...]]:
    """The gRPC target and channel options for ``target``: one "host:port"; several replicas,
    as a sequence of "host:port" or one comma-separated string (each host resolved here, all
    its addresses kept); or a resolver name such as "dns:///gradcam.example:8001" (every
    address the name resolves to). Several addresses are balanced round-robin over the
    replicas that report SERVING; one address is used as given."""
    if isinstance(target, str):
        target = target.strip()
        if target.startswith(("dns:", "ipv4:", "ipv6:", "unix:")):
            return target, (("grpc.service_config", _REPLICAS_SERVICE_CONFIG),)
        addresses = [a.strip() for a in target.split(",") if a.strip()]
    else:
        addresses = [str(a).strip() for a in target]
    addresses = [a.removeprefix("grpc://").removeprefix("grpcs://") for a in addresses]
    if not addresses:
        raise ValueError("no server address given")
    if len(addresses) == 1:
        return addresses[0], ()
    resolved: dict[int, list[str]] = {socket.AF_INET: [], socket.AF_INET6: []}
    families = []  # per address, the families it resolves to
    for address in addresses:
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected host:port, got {address!r}")
        try:
            infos = socket.getaddrinfo(host.strip("[]"), int(port), type=socket.SOCK_STREAM)
        except socket.gaierror as error:
            raise ValueError(f"cannot resolve {host!r}: {error}") from error
        found = set()
        for family, _, _, _, sockaddr in infos:
            if family in resolved:
                found.add(family)
                ip = sockaddr[0] if family == socket.AF_INET else f"[{sockaddr[0]}]"
                if f"{ip}:{port}" not in resolved[family]:
                    resolved[family].append(f"{ip}:{port}")
        families.append(found)
    # gRPC's address list holds one family: IPv4 where every replica has an IPv4 address.
    family = next((f for f in (socket.AF_INET, socket.AF_INET6)
                   if all(f in found for found in families)), None)
    if family is None:
        raise ValueError("the replicas mix IPv4-only and IPv6-only addresses, and one channel "
                         "takes one family: give addresses of one family, or a dns:/// name")
    scheme = "ipv4" if family == socket.AF_INET else "ipv6"
    options = (("grpc.service_config", _REPLICAS_SERVICE_CONFIG),
               ("grpc.default_authority", addresses[0]))  # the name TLS checks
    return f"{scheme}:{','.join(resolved[family])}", options


@dataclass(frozen=True)
class Connection:
    """Settings both clients share: where, how securely, deadlines and retries."""

    target: str
    tls: bool
    root_certificates: bytes | None
    client_certificate: bytes | None
    client_key: bytes | None
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    retry: RetryPolicy
    options: tuple[tuple[str, Any], ...]

    @classmethod
    def make(
        cls,
        target: str | Sequence[str] = DEFAULT_TARGET,
        *,
        tls: bool | None = None,
        root_certificates: PemInput | None = None,
        client_certificate: PemInput | None = None,
        client_key: PemInput | None = None,
        token: str | None = None,
        timeout: float | None = DEFAULT_TIMEOUT,
        retries: int = DEFAULT_RETRIES,
        backoff: float = DEFAULT_BACKOFF,
        options: Sequence[tuple[str, Any]] = (),
    ) -> Connection:
        """The settings of a client's arguments (`GradCamClient` says what each means);
        ValueError for a combination that cannot work."""
        retry = RetryPolicy(retries, backoff)
        if (client_certificate is None) != (client_key is None):
            raise ValueError("mutual TLS needs both client_certificate and client_key")
        secure = tls if tls is not None else any(
            v is not None for v in (root_certificates, client_certificate)
        )
        if not secure and (root_certificates is not None or client_certificate is not None):
            raise ValueError("certificates were given but tls=False")
        metadata = (("authorization", f"Bearer {token}"),) if token else ()
        target, balancing = channel_target(target)
        channel_options = (
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            *balancing,
            *options,
        )
        return cls(
            target, secure,
            _pem(root_certificates), _pem(client_certificate), _pem(client_key),
            metadata, timeout, retry, channel_options,
        )

    def open_channel(self, grpc_module: Any) -> Any:
        """A channel of ``grpc_module`` (`grpc`, or `grpc.aio` for the asyncio client)."""
        if not self.tls:
            return grpc_module.insecure_channel(self.target, options=self.options)
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.root_certificates,
            private_key=self.client_key,
            certificate_chain=self.client_certificate,
        )
        return grpc_module.secure_channel(self.target, credentials, options=self.options)

    def attempts(self, timeout: float | None) -> CallAttempts:
        """The attempts of one call, within ``timeout`` seconds (None: the client's)."""
        return CallAttempts(self.retry, self.target, self.timeout if timeout is None else timeout)
