"""HTTP for the DICOMweb client: the endpoint, a session, GET with bounded retries, and
path-free errors that say what went wrong (``host:port``, the TLS or connection cause).

A request URL holds UIDs, so no message here names a URL path; hosts and ports are not
identifiers and are named. pydicom's value-validation warnings quote the offending value (a
UID), so every process that talks to the PACS silences them (``quiet_http_logs``).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

USER_ENV, PASSWORD_ENV = "PDD_DICOMWEB_USER", "PDD_DICOMWEB_PASSWORD"
RETRY_CODES = (408, 429, 500, 502, 503, 504)
DICOM_JSON = "application/dicom+json"

# Request URLs hold UIDs: dicomweb-client logs them at DEBUG/INFO, urllib3 at DEBUG, and retrying
# logs each failed attempt (an exception's text holds the URL) as a warning.
QUIET_LOGGERS = {
    "dicomweb_client": logging.WARNING,
    "retrying": logging.ERROR,
    "urllib3": logging.ERROR,
    "pydicom": logging.ERROR,  # its value warnings are logged too, quoting the value
}


class DicomwebError(RuntimeError):
    """The PACS could not be used; the message holds no URL path, UID or credential."""


class DicomwebAuthError(DicomwebError):
    """The PACS refused the credentials, or wants some and none were given (HTTP 401/403)."""


@dataclass(frozen=True)
class Endpoint:
    """A DICOMweb root with its credentials (the password never shows in a repr)."""

    url: str  # http(s)://host:port/root, no trailing slash
    user: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout_s: float = 60.0
    max_attempts: int = 4
    backoff_ms: int = 500

    @property
    def host(self) -> str:
        """``host:port`` (for messages: no path, no credentials)."""
        parts = urlsplit(self.url)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        return f"{parts.hostname}:{port}"


def quiet_http_logs() -> None:
    """Raise the level of the loggers that would print request URLs (UIDs), and silence
    pydicom's warnings (they quote non-conformant values verbatim: UIDs, names)."""
    for name, level in QUIET_LOGGERS.items():
        logger = logging.getLogger(name)
        if logger.getEffectiveLevel() < level:
            logger.setLevel(level)
    warnings.filterwarnings("ignore", module=r"pydicom(\.|$)")


@contextmanager
def quiet_pydicom() -> Iterator[None]:
    """Read DICOM without value validation and with its warnings dropped (they quote values)."""
    import pydicom

    previous = pydicom.config.settings.reading_validation_mode
    pydicom.config.settings.reading_validation_mode = pydicom.config.IGNORE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        pydicom.config.settings.reading_validation_mode = previous


def new_session(endpoint: Endpoint) -> Any:
    """A ``requests.Session`` with the endpoint's login (basic auth) when it has one."""
    import requests

    quiet_http_logs()
    session = requests.Session()
    if endpoint.user:
        session.auth = (endpoint.user, endpoint.password or "")
    return session


def get(
    session: Any,
    endpoint: Endpoint,
    path: str,
    *,
    what: str,
    params: Mapping[str, Any] | None = None,
    accept: str = DICOM_JSON,
    stream: bool = False,
) -> Any:
    """GET ``endpoint.url + path``; 408/429/5xx and read timeouts are retried with exponential
    backoff (``max_attempts``), a refused connection, an unknown host or a TLS failure is not.

    Raises:
        DicomwebAuthError: HTTP 401/403.
        DicomwebError: any other failure, path-free (``http_failure``).
    """
    import requests

    attempts = max(endpoint.max_attempts, 1)
    for attempt in range(1, attempts + 1):
        try:
            response = session.get(
                endpoint.url + path,
                params=params,
                headers={"Accept": accept},
                stream=stream,
                timeout=endpoint.timeout_s,
            )
        except (requests.ReadTimeout, requests.exceptions.ChunkedEncodingError) as exc:
            if attempt == attempts:
                raise http_failure(what, exc, endpoint) from None
        except requests.RequestException as exc:
            raise http_failure(what, exc, endpoint) from None
        else:
            if response.ok:
                return response
            response.close()
            if response.status_code not in RETRY_CODES or attempt == attempts:
                raise http_failure(what, requests.HTTPError(response=response), endpoint)
        time.sleep(endpoint.backoff_ms / 1000 * 2 ** (attempt - 1))
    raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises


_SSL_REASON = re.compile(r"\[SSL: ([A-Z0-9_]+)\]")
_SSL_CAUSES = {
    "WRONG_VERSION_NUMBER": "the server does not speak TLS on this port (http:// instead?)",
    "CERTIFICATE_VERIFY_FAILED": "TLS certificate not verified (set REQUESTS_CA_BUNDLE)",
    "UNSUPPORTED_PROTOCOL": "the server offers only TLS versions this client refuses",
    "TLSV1_ALERT_PROTOCOL_VERSION": "the server offers only TLS versions this client refuses",
}


def _tls_cause(text: str) -> str:
    """The cause of a TLS failure, from the OpenSSL reason code in the exception's text."""
    if "hostname mismatch" in text.lower() or "doesn't match" in text:
        return "the TLS certificate names another host"
    found = _SSL_REASON.search(text)
    if found is None:
        if "record layer failure" in text or "wrong version number" in text:
            return _SSL_CAUSES["WRONG_VERSION_NUMBER"]
        return "TLS handshake failed"
    return _SSL_CAUSES.get(found.group(1), f"TLS handshake failed ({found.group(1)})")


def _connection_cause(exc: BaseException, host: str, timeout_s: float | None) -> str:
    """Why no connection was made: unknown host, refused, or no answer in time."""
    import requests

    text = str(exc)
    name = host.rsplit(":", 1)[0]
    if isinstance(exc, requests.ConnectTimeout):
        limit = f" within {timeout_s:g} s" if timeout_s else ""
        return f"no answer from {host}{limit}"
    if "NameResolutionError" in text or "Name or service not known" in text:
        return f"unknown host {name} (name not resolved)"
    if "Connection refused" in text:
        return f"connection refused by {host} (nothing listens on that port)"
    return f"cannot connect to {host} ({type(exc).__name__})"


def _exc_host(exc: BaseException) -> str:
    found = re.search(r"host='([^']*)', port=(\d+)", str(exc))
    return f"{found.group(1)}:{found.group(2)}" if found else "the server"


def http_failure(what: str, exc: BaseException, endpoint: Endpoint | None = None) -> DicomwebError:
    """A path-free error for a failed request: the status code, the TLS or connection cause
    (naming ``host:port``), or the exception's type."""
    import requests
    from retrying import RetryError

    response = getattr(exc, "response", None)
    if isinstance(exc, RetryError):  # retries spent: the last attempt's response or exception
        value = exc.last_attempt.value
        if isinstance(value, tuple) and len(value) == 3:
            exc = value[1]
            response = getattr(exc, "response", None)
        else:
            response = value
    code = getattr(response, "status_code", None)
    host = endpoint.host if endpoint is not None else _exc_host(exc)
    if code in (401, 403):
        if code == 401 and endpoint is not None and not endpoint.user:
            return DicomwebAuthError(
                f"{what}: {host} wants a login and none was given "
                f"(set {USER_ENV}/{PASSWORD_ENV} or a netrc entry for the host)"
            )
        return DicomwebAuthError(f"{what}: the server refused the credentials (HTTP {code})")
    if code is not None:
        return DicomwebError(f"{what} failed (HTTP {code})")
    if isinstance(exc, requests.exceptions.SSLError):
        return DicomwebError(f"{what} failed: {_tls_cause(str(exc))} ({host})")
    if isinstance(exc, requests.ConnectionError) and not isinstance(exc, requests.ReadTimeout):
        timeout = endpoint.timeout_s if endpoint is not None else None
        return DicomwebError(f"{what} failed: {_connection_cause(exc, host, timeout)}")
    return DicomwebError(f"{what} failed ({type(exc).__name__})")


def make_client(endpoint: Endpoint) -> Any:
    """A ``dicomweb_client.DICOMwebClient`` (the export's STOW-RS and metadata requests) with
    retries (exponential backoff) on 408/429/5xx."""
    from dicomweb_client import DICOMwebClient

    session = new_session(endpoint)
    client = DICOMwebClient(endpoint.url, session=session, timeout=endpoint.timeout_s)
    client.set_http_retry_params(
        retry=endpoint.max_attempts > 1,
        max_attempts=max(endpoint.max_attempts, 1),
        wait_exponential_multiplier=endpoint.backoff_ms,
        retriable_error_codes=RETRY_CODES,
    )
    return client


def probe(endpoint: Endpoint) -> str:
    """One QIDO-RS request (``/studies?limit=1``): what a doctor line says about the endpoint.

    Raises:
        DicomwebError: the endpoint does not answer as a DICOMweb server (auth included).
    """
    once = Endpoint(endpoint.url, endpoint.user, endpoint.password, endpoint.timeout_s, 1)
    what = "QIDO-RS query"
    with new_session(once) as session:
        response = get(session, once, "/studies", what=what, params={"limit": 1})
        try:
            response.json()
        except ValueError:
            raise DicomwebError(f"{what}: the answer is not DICOM JSON (wrong root?)") from None
    return f"QIDO-RS answers at {endpoint.host}"
