"""The Ray cluster the project starts: token auth always on, private token and temp folders."""

from __future__ import annotations

import json
import logging
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from jobs.cluster import (
    TOKEN_FILE,
    ClusterSecurityError,
    auth_token_file,
    connect,
    private_dir,
    ray_temp_dir,
)

REPO = Path(__file__).resolve().parents[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def test_token_file_is_private_and_generated_once(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "cfg"))
    path = auth_token_file()
    assert path == tmp_path / "cfg" / "pdd-batch" / TOKEN_FILE
    assert _mode(path.parent) == 0o700 and _mode(path) == 0o600
    token = path.read_text()
    assert len(token) == 64 and int(token, 16) > 0  # 256 random bits, hex
    assert auth_token_file().read_text() == token  # kept, not regenerated
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ClusterSecurityError, match="regular file"):
        auth_token_file()


def test_unsafe_private_folders_are_refused(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir(mode=0o755)
    assert private_dir(real) == real and _mode(real) == 0o700  # our own, tightened
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(ClusterSecurityError, match="symlink"):
        private_dir(link)
    if os.getuid() == 0:  # only root can give a folder to another user
        theirs = tmp_path / "theirs"
        theirs.mkdir()
        os.chown(theirs, 65534, 65534)
        with pytest.raises(ClusterSecurityError, match="another user"):
            private_dir(theirs)


def test_ray_temp_dir_is_private_and_short() -> None:
    path = ray_temp_dir()
    parent = path.parent
    assert parent.name == f"pdd-batch-{os.getuid()}"
    assert _mode(parent) == 0o700 and parent.lstat().st_uid == os.getuid()
    # Ray's socket paths (<temp>/session_<date>_<pid>/sockets/plasma_store) stay < 107 bytes
    assert len(str(path)) + len("/session_2026-12-04_15-00-14_000459_4194304/sockets/raylet") < 107


_JOIN = """
import sys
from jobs.cluster import connect
try:
    with connect(sys.argv[1]) as info:
        print("JOINED", info.mode)
except Exception as exc:
    print("REFUSED", type(exc).__name__)
"""


def _join_from_another_process(address: str, tmp_path: Path, **env: str) -> str:
    """Try to join ``address`` from a fresh process; its own HOME, no token unless given."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    base.update(
        HOME=str(tmp_path / "home"),
        PYTHONPATH=str(REPO),
        RAY_gcs_server_port_wait_time_s="2",  # give up after 2 s, not 20
        **env,
    )
    run = subprocess.run(
        [sys.executable, "-c", _JOIN, address], env=base, capture_output=True, text=True,
        timeout=180, cwd=REPO,
    )  # fmt: skip
    return run.stdout


def _assert_not_reachable_from_the_network(port: int) -> None:
    """The port answers on the loopback, not on the address Ray would otherwise have used."""
    from ray._private.services import node_ip_address_from_perspective

    socket.create_connection(("127.0.0.1", port), timeout=5).close()
    ip = node_ip_address_from_perspective()
    if ip.startswith("127."):
        return  # no network address on this machine
    with pytest.raises(OSError):
        socket.create_connection((ip, port), timeout=5).close()


@pytest.mark.ray
@pytest.mark.slow
def test_local_cluster_uses_token_auth_even_when_disabled(monkeypatch, tmp_path, caplog) -> None:
    import ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    cfg = tmp_path / "cfg"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(cfg))
    monkeypatch.delenv("RAY_DATA_LOGGING_CONFIG", raising=False)
    with caplog.at_level(logging.WARNING, "jobs.cluster"), connect(num_cpus=1) as info:
        assert info.mode == "local"
        assert get_authentication_mode() == AuthenticationMode.TOKEN
        session = Path(ray._private.worker._global_node.get_session_dir_path())
        assert session.parent == ray_temp_dir()
        address = ray.get_runtime_context().gcs_address
        assert address.startswith("127.0.0.1:")
        _assert_not_reachable_from_the_network(int(address.rsplit(":", 1)[1]))
        without = _join_from_another_process(address, tmp_path, RAY_AUTH_MODE="disabled")
        wrong = _join_from_another_process(
            address, tmp_path, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64
        )
        with_file = _join_from_another_process(address, tmp_path, XDG_CONFIG_HOME=str(cfg))
    assert "RAY_AUTH_MODE=disabled ignored" in caplog.text
    assert without.startswith("REFUSED") and wrong.startswith("REFUSED")
    assert with_file.startswith("JOINED joined")  # --address works with the project's token
    assert _mode(cfg / "pdd-batch" / TOKEN_FILE) == 0o600
    # Ray Data's INFO/WARNING lines go to the session log only, not the console
    logging_config = json.loads(Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).read_text())
    assert logging_config["handlers"]["console"]["level"] == "ERROR"
