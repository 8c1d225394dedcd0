"""Ray's token authentication seen from outside: a fresh Python process that tries to join a Ray
cluster as a driver (`ray.init(address=...)`), with or without the token, and the processes of a
Ray instance this test started (to read their environment and sockets, and to stop them)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psutil

# a driver in a fresh interpreter: its one stdout line says whether it got in, and if not, why
# (the whole chain: ray.init wraps the GCS's refusal in a RuntimeError inside a ConnectionError)
CLIENT = r"""
import json, sys
import ray
try:
    ray.init(address=sys.argv[1], logging_level="ERROR")
    print(json.dumps({"connected": True, "resources": sorted(ray.cluster_resources())}))
except Exception as exc:
    chain = []
    while exc is not None:
        chain.append(f"{type(exc).__name__}: {exc}")
        exc = exc.__cause__ or exc.__context__
    print(json.dumps({"connected": False, "error": "\n".join(chain)}))
"""
REFUSED = "InvalidAuthToken"  # the GCS's answer to a missing or wrong token, in the error chain


def ray_client(address: str, home: Path, timeout: float, **auth: str) -> dict:
    """Runs CLIENT against `address` with only the Ray auth variables given in `auth` (none: no
    token at all) and HOME an empty folder (so ~/.ray/auth_token is not found either).
    RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as it is (Ray otherwise replaces it with
    the machine's outward address, where nothing listens); RAY_gcs_server_port_wait_time_s bounds
    the refused client's retries (Ray's default: 20 attempts a second apart)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH_") and k != "RAY_ADDRESS"}
    env.update(HOME=str(home), RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0", RAY_gcs_server_port_wait_time_s="3",
               **auth)
    done = subprocess.run([sys.executable, "-c", CLIENT, address], env=env, capture_output=True, text=True,
                          timeout=timeout)
    lines = done.stdout.strip().splitlines()
    assert lines, f"the Ray client printed nothing (exit {done.returncode}):\n{done.stderr[-3000:]}"
    return json.loads(lines[-1])


def family(*pids: int) -> list[psutil.Process]:
    """These processes and all their descendants, those still running."""
    found: dict[int, psutil.Process] = {}
    for pid in pids:
        try:
            root = psutil.Process(pid)
            for p in [root, *root.children(recursive=True)]:
                found[p.pid] = p
        except psutil.NoSuchProcess:
            pass
    return list(found.values())


def named(processes: list[psutil.Process], name: str) -> psutil.Process:
    """The one process of `processes` whose executable is `name` (gcs_server, raylet)."""

    def executable(p: psutil.Process) -> str:
        try:
            return Path((p.cmdline() or [""])[0]).name
        except psutil.Error:  # gone, or a zombie
            return ""

    [match] = [p for p in processes if executable(p) == name]
    return match


def listening(process: psutil.Process) -> list[tuple[str, int]]:
    """The (address, port) pairs a process listens on."""
    return [(c.laddr.ip, c.laddr.port) for c in process.net_connections(kind="tcp")
            if c.status == psutil.CONN_LISTEN]


def is_loopback(ip: str) -> bool:
    return ip.startswith("127.") or ip in ("::1", "::ffff:127.0.0.1") or ip.startswith("::ffff:127.")
