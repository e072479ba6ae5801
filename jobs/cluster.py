"""Connecting to Ray: join a cluster (``--address`` / ``RAY_ADDRESS``) or start a local one.

A local cluster listens on 127.0.0.1 only and starts no dashboard. (``ray.init`` alone turns a
127.0.0.1 node address into the machine's network address and listens there; Ray's single-host
mode, ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, keeps it on the loopback.) Other users of the
same host can still reach the loopback, so a local cluster always uses Ray's token
authentication (Ray >= 2.60):
``RAY_AUTH_MODE`` is set to ``token`` whatever the environment says (``disabled`` is
overridden, with a warning: in the log, and one line on the console of ``pdd-batch screen``).
The token is the caller's own (``RAY_AUTH_TOKEN`` or
``RAY_AUTH_TOKEN_PATH``), or else one generated once into a private file,
``$XDG_CONFIG_HOME/pdd-batch/ray_auth_token`` (folder 0700, file 0600). Session files, logs
and object spills go to ``<tmp>/pdd-batch-<uid>/ray`` inside a private (0700) folder, not the
world-readable ``/tmp/ray``.

Joining a cluster keeps whatever ``RAY_AUTH_MODE`` the caller set; when it is unset and a token
is at hand (Ray's own sources or the file above), token authentication is switched on for the
connection.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import ray

log = logging.getLogger(__name__)

LOCAL_HOST = "127.0.0.1"
AUTH_MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"
TOKEN_FILE = "ray_auth_token"
# Ray's Unix sockets live under the temp folder (session_<date>_<pid>/sockets/...); a socket
# path may hold ~107 bytes, so the folder name must stay short.
_MAX_TEMP_DIR_LEN = 40


class ClusterSecurityError(RuntimeError):
    """A private folder or token file is unsafe (a symlink, another user's, not a folder)."""


@dataclass(frozen=True)
class ClusterInfo:
    """What the run got: how it connected and the cluster's total resources."""

    mode: str  # "local" (started here), "joined" (--address/RAY_ADDRESS), "existing" (already up)
    address: str | None
    resources: dict[str, float]
    nodes: int


def private_dir(path: Path) -> Path:
    """Create ``path`` (mode 0700) or check an existing one; tighten a too-open mode of ours.

    Raises:
        ClusterSecurityError: ``path`` is a symlink, not a folder, or owned by another user.
    """
    try:
        path.mkdir(mode=0o700, parents=True)
    except FileExistsError:
        pass
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        raise ClusterSecurityError(f"{path} is a symlink or not a folder; refusing to use it")
    if st.st_uid != os.getuid():
        raise ClusterSecurityError(f"{path} belongs to another user; refusing to use it")
    if stat.S_IMODE(st.st_mode) != 0o700:
        os.chmod(path, 0o700)
    return path


def config_dir() -> Path:
    """``$XDG_CONFIG_HOME/pdd-batch`` (``~/.config/pdd-batch`` by default), not yet created."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "pdd-batch"


def ray_temp_dir() -> Path:
    """The temp folder of clusters started here: ``<tmp>/pdd-batch-<uid>/ray``.

    ``<tmp>/pdd-batch-<uid>`` is private (0700, this user's, not a symlink); Ray makes its own
    folder inside world-writable, which the private parent makes unreachable to others.
    """
    name = f"pdd-batch-{os.getuid()}"
    parent = Path(tempfile.gettempdir()) / name
    if len(str(parent)) > _MAX_TEMP_DIR_LEN:  # e.g. macOS's long per-user TMPDIR
        parent = Path("/tmp") / name
    return private_dir(parent) / "ray"


def auth_token_file() -> Path:
    """The project's token file, generated (256 random bits, mode 0600) on first use.

    Raises:
        ClusterSecurityError: the folder or file is unsafe (symlink, other owner).
    """
    path = private_dir(config_dir()) / TOKEN_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except FileExistsError:
        st = path.lstat()
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.getuid():
            raise ClusterSecurityError(f"{path} is not a regular file of this user") from None
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(path, 0o600)
        return path
    with os.fdopen(fd, "w") as f:
        f.write(secrets.token_hex(32))
    log.info("generated a Ray auth token in %s", path)
    return path


def _has_own_token() -> bool:
    """Whether the caller gave Ray a token (env value, or a token file path)."""
    return bool(os.environ.get(TOKEN_ENV) or os.environ.get(TOKEN_PATH_ENV))


def _refresh_ray_auth() -> None:
    """Make this process's Ray re-read the auth settings just put in the environment.

    Ray caches them in its C++ config and token loader; ``ray.init`` does the same refresh when
    it turns token auth on itself.
    """
    from ray._raylet import AuthenticationTokenLoader, Config

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()


def use_loopback_only() -> None:
    """Keep clusters started by this process (and the processes it starts) on 127.0.0.1.

    Ray reads ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER`` when imported; child processes get it from
    the environment, this (already importing) process through the constant it was read into.
    """
    from ray._private import ray_constants

    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _auth_override_note(mode: str) -> str:
    return (
        f"{AUTH_MODE_ENV}={mode} ignored: a Ray cluster started by pdd-batch always uses token "
        f"authentication (the token is in {TOKEN_ENV} or {config_dir()}/{TOKEN_FILE})"
    )


def override_auth_mode_for_local(address: str | None) -> str | None:
    """For a command about to run on a local cluster (no ``address``, no ``RAY_ADDRESS``): set
    ``RAY_AUTH_MODE=token`` now and return the warning for the command's console when the
    environment asked for another mode; ``None`` otherwise (joining keeps the caller's mode).

    ``use_token_auth`` would override it too, but only into the run's log: during a run the
    console shows the live view, and descriptor 2 goes to the run's log folder.
    """
    if address or os.environ.get("RAY_ADDRESS"):
        return None
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is None or mode.lower() == "token":
        return None
    os.environ[AUTH_MODE_ENV] = "token"
    return _auth_override_note(mode)


def use_token_auth() -> None:
    """Token auth for a cluster started by this process (and every process it starts)."""
    mode = os.environ.get(AUTH_MODE_ENV)
    if mode is not None and mode.lower() != "token":
        log.warning("%s", _auth_override_note(mode))
    os.environ[AUTH_MODE_ENV] = "token"
    if not _has_own_token():
        os.environ[TOKEN_PATH_ENV] = str(auth_token_file())
    _refresh_ray_auth()


def _auth_for_joining() -> None:
    """Offer the project's token when joining, unless the caller chose the auth mode."""
    if os.environ.get(AUTH_MODE_ENV) is None:
        own = config_dir() / TOKEN_FILE
        default = Path.home() / ".ray" / "auth_token"  # Ray's own default location
        if not _has_own_token() and not default.is_file() and own.is_file():
            os.environ[TOKEN_PATH_ENV] = str(auth_token_file())
        if _has_own_token() or default.is_file():
            os.environ[AUTH_MODE_ENV] = "token"
    _refresh_ray_auth()


def join(address: str, **kwargs: object) -> None:
    """``ray.init`` joining the cluster at ``address``, with the token at hand (module docstring).

    Ray's own INFO/WARNING lines stay off the console (errors still show).
    """
    _auth_for_joining()
    ray.init(address=address, logging_level=logging.ERROR, **kwargs)


def local_node_args(num_cpus: int | None = None) -> dict[str, object]:
    """``ray.init`` keywords of a local cluster: loopback address, no dashboard, private temp.

    Call ``use_token_auth()`` and ``use_loopback_only()`` first (``start_local`` does).
    """
    return {
        "num_cpus": num_cpus,
        "include_dashboard": False,
        "_node_ip_address": LOCAL_HOST,
        "_temp_dir": str(ray_temp_dir()),
    }


def start_local(num_cpus: int | None = None, **kwargs: object) -> None:
    """``ray.init`` of a local cluster: token auth, 127.0.0.1, private temp folder.

    Ray's own INFO/WARNING lines stay off the console (errors still show). ``kwargs`` go to
    ``ray.init`` and override the defaults (e.g. ``_temp_dir`` of a private folder of one's own).
    """
    use_token_auth()
    use_loopback_only()
    args = {**local_node_args(num_cpus), "logging_level": logging.ERROR, **kwargs}
    ray.init(address="local", **args)  # a new cluster, never one another `ray start` left


# Ray Data's default logging config with its console handler raised from INFO to ERROR.
_RAY_DATA_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"ray": {"format": "%(asctime)s\t%(levelname)s %(name)s -- %(message)s"}},
    "filters": {"console_filter": {"()": "ray.data._internal.logging.HiddenRecordFilter"}},
    "handlers": {
        "file": {
            "class": "ray.data._internal.logging.SessionFileHandler",
            "formatter": "ray",
            "filename": "ray-data.log",
        },
        "console": {
            "class": "ray._private.log.PlainRayHandler",
            "formatter": "ray",
            "level": "ERROR",
            "filters": ["console_filter"],
        },
    },
    "loggers": {
        "ray.data": {"level": "DEBUG", "handlers": ["file", "console"], "propagate": False}
    },
}


def quiet_ray_console() -> None:
    """Keep Ray Data's INFO/WARNING lines off the console (errors still show).

    They still go to ``ray-data.log`` in the session's log folder. Ray Data re-reads the file
    named by ``RAY_DATA_LOGGING_CONFIG`` whenever a dataset runs; a caller's own is kept.
    """
    if os.environ.get("RAY_DATA_LOGGING_CONFIG"):
        return
    path = ray_temp_dir().parent / "ray-data-logging.json"  # JSON is valid YAML
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(_RAY_DATA_LOGGING), encoding="utf-8")
    os.replace(tmp, path)
    os.environ["RAY_DATA_LOGGING_CONFIG"] = str(path)


def _info(mode: str, address: str | None) -> ClusterInfo:
    res = {k: float(v) for k, v in ray.cluster_resources().items() if k in ("CPU", "GPU")}
    nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
    return ClusterInfo(mode=mode, address=address, resources=res, nodes=nodes)


@contextmanager
def connect(address: str | None = None, *, num_cpus: int | None = None) -> Iterator[ClusterInfo]:
    """Yield a connected Ray; shut it down afterwards only if this call started or joined it.

    Args:
        address: cluster to join (``ray://`` or ``host:port`` or ``auto``); ``None`` also reads
            ``RAY_ADDRESS``, and without either starts a local cluster on 127.0.0.1 with token
            authentication (see the module docstring).
        num_cpus: CPUs of a local cluster (ignored when joining).
    """
    if ray.is_initialized():
        yield _info("existing", address)
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address:
        join(address, log_to_driver=True)
        mode = "joined"
    else:
        start_local(num_cpus, log_to_driver=True)
        mode = "local"
    quiet_ray_console()
    try:
        info = _info(mode, address)
        log.info("ray %s cluster: %d node(s), %s", mode, info.nodes, info.resources)
        yield info
    finally:
        ray.shutdown()
