"""A real Ray cluster with token authentication, as docs/ray.md sets one up, on one machine: a head
(`ray start --head`, custom resource node_a) and a second node (`ray start --address`, node_b),
each a raylet of its own, every node given the same token (RAY_AUTH_MODE=token, RAY_AUTH_TOKEN).
The unclip application (tiny model) runs two replicas, one per node; requests through the head's
proxy are answered by both. A driver, a node and a gRPC caller without the token are refused.

Everything listens on 127.0.0.1 but the replicas' inter-deployment gRPC port, which Ray 2.60
binds on all interfaces (checked below, with the token it wants). Sized for a 2-core machine
without a GPU: one CPU per node, half a CPU and one torch thread per replica, 2 steps per stage.
"""

from __future__ import annotations

import base64
import io
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import psutil
import pytest
from PIL import Image

from tests.ray_helpers import REFUSED, family, is_loopback, listening, named, ray_client
from tests.serve_helpers import free_port

REPO = Path(__file__).resolve().parent.parent
GEN = "/v1/images/generations"
STEPS = dict(prior_steps=2, decoder_steps=2, super_res_steps=2)
START = 300  # seconds for a node, or the application, to start on a loaded 2-core machine (bounds only)
WAIT = 120  # seconds for one answer or one client (bounds only)

# `ray start` for the second node. On Linux, Ray replaces a loopback --address (and node address)
# with this machine's outward address, so that other machines could reach the node; here the head
# listens on 127.0.0.1 only, so the address is kept as given. Everything else is Ray's CLI.
RAY_START_LOOPBACK = r"""
import sys
import ray._private.services as services
services.resolve_ip_for_localhost = lambda host: host
from ray.scripts.scripts import main
sys.argv[0] = "ray"
main()
"""

# the driver that deploys the application (it holds the token), then reports from the GCS's
# actor table which node each replica runs on: {replica id: {"node": [its node_* resource], "pid"}}
DEPLOY = r"""
import json, sys, time
import ray
from ray import serve
from unclip.serve.ray_app import APP, UnclipArgs, UnclipReplica

address, http_port = sys.argv[1], int(sys.argv[2])
ray.init(address=address, logging_level="ERROR")
end = time.monotonic() + 120
while sum(n["Alive"] for n in ray.nodes()) < 2:
    assert time.monotonic() < end, ray.nodes()
    time.sleep(0.2)
# one proxy, on the head: both nodes are on 127.0.0.1 here, and each node's proxy would want the port
serve.start(http_options={"host": "127.0.0.1", "port": http_port}, proxy_location="HeadOnly")
app = UnclipReplica.options(num_replicas=2, max_replicas_per_node=1, ray_actor_options={"num_cpus": 0.5})
serve.run(app.bind(UnclipArgs(model="tiny").model_dump()), name=APP, route_prefix="/", blocking=False)
nodes = {n["NodeID"]: sorted(r for r in n["Resources"] if r.startswith("node_")) for n in ray.nodes()}
print(json.dumps({a["Name"].rsplit("#", 1)[1]: {"node": nodes[a["Address"]["NodeID"]], "pid": a["Pid"]}
                  for a in ray._private.state.actors().values()
                  if a["State"] == "ALIVE" and a["ActorClassName"].startswith("ServeReplica:")}))
"""


class RayNode:
    """`ray start ... --block` in its own session (process group), its output in a file."""

    def __init__(self, log: Path, argv: list[str], env: dict[str, str]):
        self.log = log
        with open(log, "w") as out:
            self.proc = subprocess.Popen(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_started(self) -> None:
        end = time.monotonic() + START
        while "Ray runtime started" not in self.text():
            if self.proc.poll() is not None or time.monotonic() > end:
                raise AssertionError(f"ray start did not start:\n{self.text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> list[psutil.Process]:
        """SIGKILL to the node's process group and every descendant, as `ray stop --force` does, but
        to this node's processes only (`ray stop` ends every Ray on the machine): those left alive."""
        processes = family(self.proc.pid)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in processes:  # any that left the group
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        _, alive = psutil.wait_procs(processes, timeout=30)
        self.proc.wait(30)
        return alive


@dataclass
class Cluster:
    address: str
    token: str
    url: str
    env: dict[str, str]  # a node's environment, token included
    nodes: list[RayNode]
    replicas: dict[str, dict]  # replica id -> {"node": ["node_a"], "pid": ...}
    tmp: Path


def node_environment(token: str) -> dict[str, str]:
    """What every node of the cluster starts with (docs/ray.md): the token and its mode, unclip's
    proxy middleware; for the test: this checkout first on the path, no memory monitor (it counts
    the whole shared machine), one torch thread per replica, a proxy that spreads over the nodes
    (by default it prefers replicas on its own node, where the load balancer sent the request)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("RAY_AUTH_") and k not in ("RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    path = os.pathsep.join([str(REPO), *([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])])
    return {**env, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "PYTHONPATH": path,
            "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH": "unclip.serve.ray_proxy:middlewares",
            "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0", "RAY_memory_monitor_refresh_ms": "0",
            "OMP_NUM_THREADS": "1", "RAY_DEDUP_LOGS": "0", "RAY_USAGE_STATS_ENABLED": "0",
            "PYTHONUNBUFFERED": "1"}


def node_flags(resource: str) -> list[str]:
    """Each node: one CPU, a small object store, its own ports where Ray's defaults are fixed
    numbers (two nodes on one machine), workers on ports the system picks."""
    return ["--block", "--num-cpus", "1", "--num-gpus", "0", "--resources", json.dumps({resource: 1}),
            "--object-store-memory", str(100 * 2**20), "--dashboard-agent-listen-port", str(free_port()),
            "--min-worker-port", "0", "--max-worker-port", "0", "--disable-usage-stats"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cluster")
    ray_tmp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # Ray's socket paths must stay short
    token, gcs, http = secrets.token_hex(32), free_port(), free_port()
    env = node_environment(token)
    # the head: RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 keeps 127.0.0.1 as the node's address, and a
    # node on 127.0.0.1 binds its ports there; the autoscaler's and dashboard's metrics ports too
    head_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "AUTOSCALER_METRIC_PORT": str(free_port()),
                "DASHBOARD_METRIC_PORT": str(free_port())}
    nodes: list[RayNode] = []
    left: list[psutil.Process] = []
    try:
        nodes.append(RayNode(tmp / "head.log", [
            sys.executable, "-m", "ray.scripts.scripts", "start", "--head", "--node-ip-address", "127.0.0.1",
            "--port", str(gcs), "--ray-client-server-port", str(free_port()), "--include-dashboard", "false",
            "--temp-dir", str(ray_tmp), *node_flags("node_a")], head_env))
        nodes[0].wait_started()
        nodes.append(RayNode(tmp / "node_b.log", [
            sys.executable, "-c", RAY_START_LOOPBACK, "start", "--address", f"127.0.0.1:{gcs}",
            *node_flags("node_b")], env))
        nodes[1].wait_started()
        deploy = subprocess.run([sys.executable, "-c", DEPLOY, f"127.0.0.1:{gcs}", str(http)], cwd=REPO,
                                env={**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}, capture_output=True,
                                text=True, timeout=START)
        assert deploy.returncode == 0, deploy.stderr[-3000:] + nodes[0].text()[-2000:]
        replicas = json.loads(deploy.stdout.strip().splitlines()[-1])
        yield Cluster(f"127.0.0.1:{gcs}", token, f"http://127.0.0.1:{http}", env, nodes, replicas, tmp)
    finally:
        for node in reversed(nodes):
            left += node.stop()
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert not left, left


@pytest.mark.slow
def test_two_replicas_one_per_node_both_answer(cluster):
    # the GCS's record: one replica on each node
    assert sorted(r["node"] for r in cluster.replicas.values()) == [["node_a"], ["node_b"]], cluster.replicas
    answered: dict[str, int] = {}
    with httpx.Client(timeout=WAIT) as client:
        for k in range(30):  # the proxy picks a replica at random: until both have answered
            r = client.post(cluster.url + GEN, json={"prompt": f"a red circle {k}", **STEPS})
            assert r.status_code == 200, r.text
            [item] = r.json()["data"]
            assert Image.open(io.BytesIO(base64.b64decode(item["b64_json"]))).format == "PNG"
            replica = r.headers["x-unclip-replica"]
            answered[replica] = answered.get(replica, 0) + 1
            if len(answered) == 2:
                break
    assert set(answered) == set(cluster.replicas), (answered, cluster.replicas)


@pytest.mark.slow
def test_without_the_token_a_driver_or_a_node_is_refused(cluster):
    home = cluster.tmp / "empty-home"
    home.mkdir(exist_ok=True)
    # a node that has the token but not RAY_AUTH_MODE=token does not send it
    no_mode = {k: v for k, v in cluster.env.items() if k != "RAY_AUTH_MODE"}
    no_mode["RAY_gcs_server_port_wait_time_s"] = "3"  # its retries, bounded
    joiner = RayNode(cluster.tmp / "no_mode.log", [
        sys.executable, "-c", RAY_START_LOOPBACK, "start", "--address", cluster.address,
        *[f for f in node_flags("node_c") if f != "--block"]], no_mode)
    try:
        with ThreadPoolExecutor(3) as pool:
            no_token = pool.submit(ray_client, cluster.address, home, WAIT)
            wrong = pool.submit(ray_client, cluster.address, home, WAIT, RAY_AUTH_MODE="token",
                                RAY_AUTH_TOKEN=secrets.token_hex(32))
            right = pool.submit(ray_client, cluster.address, home, WAIT, RAY_AUTH_MODE="token",
                                RAY_AUTH_TOKEN=cluster.token)
            joined = joiner.proc.wait(WAIT)
        for refused in (no_token.result(), wrong.result()):
            assert not refused["connected"] and REFUSED in refused["error"], refused
        said = joiner.text()
        assert joined != 0 and "AuthenticationError" in said and REFUSED in said, said
        with_token = right.result()
        assert with_token["connected"], with_token
        nodes = {r for r in with_token["resources"] if r.startswith("node_")}
        assert nodes == {"node_a", "node_b"}, with_token  # and node_c never joined
    finally:
        assert not joiner.stop()


@pytest.mark.slow
def test_ray_listens_on_loopback_but_the_replica_port_which_wants_the_token(cluster):
    processes = family(*(node.proc.pid for node in cluster.nodes))
    named(processes, "gcs_server")  # the cluster's own processes, not some other Ray on the machine
    assert len([p for p in processes if p.name() == "raylet"]) == 2
    replica_pids = {r["pid"] for r in cluster.replicas.values()}
    assert replica_pids <= {p.pid for p in processes}
    open_ports = []
    for p in processes:
        try:
            sockets = listening(p)
        except psutil.NoSuchProcess:  # an idle worker Ray ended meanwhile
            continue
        for ip, port in sockets:
            if not is_loopback(ip):
                assert p.pid in replica_pids and ip in ("::", "0.0.0.0"), (p.name(), ip, port)
                open_ports.append(port)
    assert len(open_ports) == len(replica_pids)  # one per replica: Serve's inter-deployment gRPC server

    for port in open_ports:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            call = channel.unary_unary("/ray.serve.ASGIService/HandleRequest")
            with pytest.raises(grpc.RpcError) as refused:
                call(b"", timeout=WAIT)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
            # with the token the call gets past the check to the replica's unpickling of the
            # request (an empty one: "Ran out of input"): what the token keeps others from
            with pytest.raises(grpc.RpcError) as unpickled:
                call(b"", timeout=WAIT, metadata=[("authorization", f"Bearer {cluster.token}")])
            assert unpickled.value.code() != grpc.StatusCode.UNAUTHENTICATED, unpickled.value
            assert "Ran out of input" in (unpickled.value.details() or ""), unpickled.value


# `unclip serve --ray` (run_local): its own Ray instance, with token authentication


def test_a_token_is_made_for_the_local_instance_only_where_the_user_has_none(tmp_path):
    from unclip.errors import UnclipError
    from unclip.serve.ray_app import ray_auth_environment

    home = tmp_path / "home"
    home.mkdir()
    made = [ray_auth_environment({"HOME": str(home)}) for _ in range(2)]
    for env in made:
        assert env["RAY_AUTH_MODE"] == "token" and len(bytes.fromhex(env["RAY_AUTH_TOKEN"])) == 32
    assert made[0]["RAY_AUTH_TOKEN"] != made[1]["RAY_AUTH_TOKEN"]  # random, one per instance
    assert ray_auth_environment({"HOME": str(home), "RAY_AUTH_MODE": "Token"})["RAY_AUTH_TOKEN"]
    # the user's token, wherever Ray would read it from, is kept: only the mode is set
    mode = {"RAY_AUTH_MODE": "token"}
    assert ray_auth_environment({"HOME": str(home), "RAY_AUTH_TOKEN": "theirs"}) == mode
    (tmp_path / "token").write_text("theirs\n")
    assert ray_auth_environment({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": str(tmp_path / "token")}) == mode
    (home / ".ray").mkdir()
    (home / ".ray" / "auth_token").write_text("theirs")  # `ray get-auth-token --generate`
    assert ray_auth_environment({"HOME": str(home)}) == mode
    # a token file named but missing: Ray would abort at start; unclip says which before
    with pytest.raises(UnclipError, match="RAY_AUTH_TOKEN_PATH=/no/such/file") as missing:
        ray_auth_environment({"HOME": str(home), "RAY_AUTH_TOKEN_PATH": "/no/such/file"})
    assert "\n" not in str(missing.value)


@pytest.mark.parametrize("mode", ["disabled", "DISABLED", "none"])
def test_authentication_turned_off_is_refused_unless_allowed(tmp_path, monkeypatch, mode):
    import ray

    from unclip.errors import UnclipError
    from unclip.serve.ray_app import UnclipArgs, _start_ray_authenticated, ray_auth_environment, run_local

    environ = {"HOME": str(tmp_path), "RAY_AUTH_MODE": mode}
    with pytest.raises(UnclipError) as refused:
        ray_auth_environment(environ)
    message = str(refused.value)
    assert f"RAY_AUTH_MODE={mode}" in message and "--allow-ray-unauthenticated" in message
    assert "\n" not in message
    assert ray_auth_environment(environ, allow_unauthenticated=True) == {}  # left as the user set it

    # run_local refuses before Ray starts; allowed, the environment is left alone
    monkeypatch.setenv("RAY_AUTH_MODE", mode)
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    with pytest.raises(UnclipError, match="--allow-ray-unauthenticated"):
        run_local(UnclipArgs(model="tiny"), host="127.0.0.1", port=free_port(), replicas=1,
                  max_ongoing_requests=2, max_queued_requests=4, drain_s=1)
    assert not ray.is_initialized()
    _start_ray_authenticated(allow_unauthenticated=True)
    assert os.environ["RAY_AUTH_MODE"] == mode and "RAY_AUTH_TOKEN" not in os.environ
