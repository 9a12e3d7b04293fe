"""Where an operator client connects, and with which certificate.

Precedence for every setting is: command-line flag, environment variable, default. The files
default to the standard names of a PKI directory (`taskrun certs init`) under `--certs-dir`.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

ENV_SERVER = "TASKRUN_SERVER"
ENV_CERTS_DIR = "TASKRUN_CERTS_DIR"
ENV_CA = "TASKRUN_CA"
ENV_CERT = "TASKRUN_CERT"
ENV_KEY = "TASKRUN_KEY"
ENV_SERVER_NAME = "TASKRUN_SERVER_NAME"
ENV_API_TOKEN = "TASKRUN_API_TOKEN"

DEFAULT_SERVER = "127.0.0.1:50051"
DEFAULT_CERTS_DIR = Path("certs")
# The name `taskrun certs init` always puts in the server certificate.
DEFAULT_TLS_NAME = "localhost"


class MissingCredentials(Exception):
    """A certificate or key file the client needs does not exist or cannot be read."""


@dataclass(frozen=True, slots=True)
class OperatorSettings:
    """Resolved connection settings of an operator client."""

    server: str
    ca: Path
    cert: Path
    key: Path
    server_name: str | None  # TLS name to verify instead of the host in `server`
    # An API token (`tra_…`): sent as `authorization: Bearer …` instead of a client certificate
    api_token: str | None = None


@dataclass(frozen=True, slots=True)
class Credentials:
    """The PEM bytes of an operator's TLS material (no certificate when an API token is used)."""

    ca: bytes
    cert: bytes | None
    key: bytes | None
    api_token: str | None = None


def _pick(flag: str | None, env: Mapping[str, str], name: str) -> str | None:
    """The flag value if given, else the non-empty environment value, else None."""
    if flag:
        return flag
    return env.get(name) or None


def target_host(target: str) -> str:
    """The host part of a gRPC target such as `127.0.0.1:50051`, `[::1]:443` or `dns:///h:1`."""
    for scheme in ("dns:///", "dns:", "ipv4:", "ipv6:"):
        if target.startswith(scheme):
            target = target[len(scheme) :]
            break
    if target.startswith("["):
        return target[1:].partition("]")[0]
    if target.count(":") == 1:
        return target.partition(":")[0]
    return target  # no port, or a bare IPv6 address


def is_ip_literal(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def default_server_name(target: str) -> str | None:
    """`localhost` when the target's host is an IP literal (what our server certificate names)."""
    return DEFAULT_TLS_NAME if is_ip_literal(target_host(target)) else None


def resolve_certs_dir(flag: str | None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    value = _pick(flag, env, ENV_CERTS_DIR)
    return Path(value) if value else DEFAULT_CERTS_DIR


def resolve_server(flag: str | None, env: Mapping[str, str] | None = None) -> str:
    env = os.environ if env is None else env
    return _pick(flag, env, ENV_SERVER) or DEFAULT_SERVER


def resolve_server_name(
    flag: str | None, server: str, env: Mapping[str, str] | None = None
) -> str | None:
    env = os.environ if env is None else env
    return _pick(flag, env, ENV_SERVER_NAME) or default_server_name(server)


def resolve_ca(flag: str | None, certs_dir: Path, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    value = _pick(flag, env, ENV_CA)
    return Path(value) if value else certs_dir / "ca.pem"


def resolve_settings(
    *,
    server: str | None = None,
    certs_dir: str | None = None,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    server_name: str | None = None,
    api_token: str | None = None,
    env: Mapping[str, str] | None = None,
) -> OperatorSettings:
    """Fill every setting not given as an argument from `env` (default os.environ) or defaults."""
    env = os.environ if env is None else env
    directory = resolve_certs_dir(certs_dir, env)
    target = resolve_server(server, env)
    cert_value = _pick(cert, env, ENV_CERT)
    key_value = _pick(key, env, ENV_KEY)
    return OperatorSettings(
        server=target,
        ca=resolve_ca(ca, directory, env),
        cert=Path(cert_value) if cert_value else directory / "operator.pem",
        key=Path(key_value) if key_value else directory / "operator-key.pem",
        server_name=resolve_server_name(server_name, target, env),
        api_token=_pick(api_token, env, ENV_API_TOKEN),
    )


def read_pem(path: Path, what: str) -> bytes:
    """Read a PEM file, or raise MissingCredentials naming it and saying how to create it."""
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise MissingCredentials(
            f"{what} {path} does not exist: create the certificates with `taskrun certs init` "
            "or point --certs-dir (TASKRUN_CERTS_DIR) at them"
        ) from None
    except OSError as exc:
        raise MissingCredentials(f"cannot read {what} {path}: {exc.strerror}") from None


def load_credentials(settings: OperatorSettings) -> Credentials:
    if settings.api_token:
        ca = read_pem(settings.ca, "CA certificate")
        return Credentials(ca=ca, cert=None, key=None, api_token=settings.api_token)
    return Credentials(
        ca=read_pem(settings.ca, "CA certificate"),
        cert=read_pem(settings.cert, "client certificate"),
        key=read_pem(settings.key, "client key"),
    )
