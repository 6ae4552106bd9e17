"""The PEM files a TLS front end serves with (`TlsFiles`: `--ssl-certfile`, `--ssl-keyfile` and
`--ssl-ca-certs`, on HTTP and gRPC alike), and the checks `ServeConfig` runs on them before
anything starts: the certificate chain and its key load and belong together
(`check_tls_files`), the clients' CA bundle holds a certificate (`check_client_cas`). The
clients' side is `orchestrator.auth.client_tls`."""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class TlsFiles:
    """What a TLS front end serves with (PEM files)."""

    certfile: str  # the server's certificate chain
    keyfile: str  # its private key
    client_cas: str | None = None  # clients must present a certificate signed by one of these


def check_tls_files(certfile: str, keyfile: str) -> None:
    """ValueError unless the certificate chain and key load and belong together."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(certfile, keyfile)
    except FileNotFoundError as e:
        missing = [f for f in (certfile, keyfile) if not Path(f).is_file()]
        raise ValueError(
            f"--ssl-certfile / --ssl-keyfile: no such file: {', '.join(missing) or e}"
        ) from e
    except (ssl.SSLError, OSError) as e:
        raise ValueError(
            f"--ssl-certfile {certfile} / --ssl-keyfile {keyfile}: cannot load them as a PEM "
            f"certificate chain and its private key ({e})"
        ) from e


def check_client_cas(cafile: str) -> None:
    """ValueError unless `cafile` holds at least one PEM CA certificate."""
    if not cafile:
        raise ValueError("--ssl-ca-certs: empty; give the PEM file of the clients' CAs")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_verify_locations(cafile=cafile)
    except FileNotFoundError:
        raise ValueError(f"--ssl-ca-certs: no such file: {cafile}") from None
    except (ssl.SSLError, OSError) as e:
        raise ValueError(
            f"--ssl-ca-certs {cafile}: cannot load it as PEM CA certificates ({e})"
        ) from None
    if not context.cert_store_stats()["x509"]:
        raise ValueError(f"--ssl-ca-certs {cafile}: holds no certificate")
