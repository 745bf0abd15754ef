"""The Prefect API the flows talk to: the user's server (runtime.prefect_api_url / PREFECT_API_URL), else
Prefect's local (ephemeral) server, started here with the time a first start needs.

Prefect gives its local server 20 s to answer. A first start also creates and migrates its database, which
on a busy laptop takes longer, and the first ``make demo`` failed that way. Unless the user set
``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS``, ganforge waits up to ``LOCAL_SERVER_TIMEOUT_S`` and
says so in one line; when even that is not enough, the line says what to do instead.
"""

from __future__ import annotations

import logging
import os
import time

from ganforge.tasks.errors import ServiceError

log = logging.getLogger("ganforge")

LOCAL_SERVER_TIMEOUT_S = 300
_TIMEOUT_ENV = "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"


def local_server_timeout() -> tuple[int, bool]:
    """(seconds to wait for Prefect's local server, whether the user chose them)."""
    from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS

    configured = int(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    try:
        from prefect.settings.models.server.ephemeral import ServerEphemeralSettings

        default = ServerEphemeralSettings.model_fields["startup_timeout_seconds"].default
    except (ImportError, KeyError):  # another Prefect 3 layout: its documented default
        default = 20
    if _TIMEOUT_ENV in os.environ or configured != default:  # the environment or a Prefect profile set it
        return configured, True
    return LOCAL_SERVER_TIMEOUT_S, False


def ensure_prefect_api() -> str | None:
    """The API URL the flows will use; starts Prefect's local server when no URL is configured (Prefect would
    start it on the first call anyway, with its shorter wait). Raises ServiceError in one line."""
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    url = PREFECT_API_URL.value()
    if url:
        return url
    if not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        raise ServiceError("no Prefect API: set PREFECT_API_URL (or runtime.prefect_api_url) to a running server "
                           "(`prefect server start`), or allow Prefect's local server")
    from prefect.server.api.server import SubprocessASGIServer

    server = SubprocessASGIServer()
    if server.running:
        return server.api_url
    timeout, chosen = local_server_timeout()
    log.info("Prefect: starting its local server (a first start creates its database; waiting up to %d s%s)",
             timeout, f", {_TIMEOUT_ENV}" if chosen else "")
    t0 = time.monotonic()
    try:
        server.start(timeout=timeout)
    except Exception as e:  # noqa: BLE001 - Prefect raises RuntimeError with the server's whole output
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise ServiceError(
            f"Prefect's local server did not start within {timeout} s ({first}); start a server with "
            f"`prefect server start` and set PREFECT_API_URL=http://127.0.0.1:4200/api, or wait longer with "
            f"{_TIMEOUT_ENV}=600") from e
    log.debug("Prefect's local server answered after %.1f s at %s", time.monotonic() - t0, server.api_url)
    return server.api_url
