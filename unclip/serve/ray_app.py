"""The Ray Serve front end: replicas behind one endpoint, each one loaded model and one Engine.

A replica is `create_app(state)` from server.py, the routes of api.py, around its own Engine
(queue, batching, metrics): Ray's HTTP proxy routes each request to a replica, and a replica
answers exactly as `unclip serve` does. Ray adds what one process cannot: replicas on many
machines, restarts of dead ones, autoscaling, and load shedding in front of the replicas
(`max_queued_requests`). The replica's identity in headers, logs and metric labels is Ray's
replica id. docs/ray.md has the cluster files; `build_app` is what a Ray Serve config imports.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import threading
from collections.abc import Mapping
from pathlib import Path

from ray import serve
from ray.serve import Application

from unclip.errors import UnclipError
from unclip.options import ReplicaOptions

log = logging.getLogger("unclip.serve")
APP = "unclip"  # the application's name in Ray Serve (serve status, logs, metrics)
# Ray's token authentication (Ray >= 2.52): the mode, and where each Ray process finds the token
# (the variable first, then the file it names, then ~/.ray/auth_token)
AUTH_MODE, AUTH_TOKEN, AUTH_TOKEN_PATH = "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"


# What a replica loads, how its engine batches, the caps and limits it enforces, its API-key
# digests: the `args:` of a Ray Serve config, with the meaning of `unclip serve`'s options of the
# same names (unclip.options, declared once for both). max_wait_ms left out: 50 ms behind the proxy.
UnclipArgs = ReplicaOptions


# Defaults for `serve run` without a config; deploy/ray/*.yaml set each of these per cluster.
@serve.deployment(
    name="unclip",
    ray_actor_options={"num_cpus": 1},
    max_ongoing_requests=16,  # two batches of 8: one running, one filling; the engine holds them
    max_queued_requests=64,  # requests waiting for a replica at each proxy; beyond: 429 at once
    backpressure_config={"status_code": 429, "retry_after_s": 1},  # as `unclip serve`'s full queue
    graceful_shutdown_timeout_s=30,  # a stopping replica finishes what it holds, as --drain-s
    health_check_period_s=5,
)
@serve.ingress()
class UnclipReplica:
    def __init__(self, args: dict | None = None):
        import torch

        import unclip
        from unclip.serve.api import ServeState
        from unclip.serve.cli import RAY_MAX_WAIT_MS, engine_for, limits_for, log_to_stderr
        from unclip.serve.engine import output_size
        from unclip.serve.metrics import Metrics
        from unclip.serve.server import warm_up

        a = ReplicaOptions.model_validate(args or {})
        replica = serve.get_replica_context().replica_tag
        log_to_stderr()
        torch.set_num_threads(a.torch_threads or _omp_threads())
        load = {**a.load_kwargs(), "model": model_for_this_gpu(a.model, a.device)}
        engine = engine_for(a, lambda: unclip.load(**load, limits=limits_for(a)),
                            Metrics(labels={"replica": replica}), RAY_MAX_WAIT_MS)
        pipe = engine.wait_loaded()
        self.state = ServeState.from_options(engine, a, output_size(pipe), replica)
        # Ray routes to a replica once __init__ returns: warm up first, so no request waits on it
        # (a failure raises: Ray replaces a replica whose constructor fails)
        warm_up(self.state)
        log.info("replica %s ready: model %s, pid %d, torch threads %d", replica, self.state.model,
                 os.getpid(), torch.get_num_threads())

    def __serve_build_asgi_app__(self):
        from unclip.serve.server import create_app

        return create_app(self.state, warmup=False)

    def __del__(self):
        # Ray waited graceful_shutdown_timeout_s for requests in flight; whatever is left is cancelled
        state = getattr(self, "state", None)
        if state is not None:
            state.engine.shutdown(0)


def model_for_this_gpu(model: str, device: str) -> str:
    """`{gpu}` in a model path becomes this replica's GPU, named as TensorRT engine files name it
    (`nvidia-a100-sxm4-80gb-sm80`): one deployment over several GPU types, one folder each."""
    if "{gpu}" not in model:
        return model
    if not device.startswith("cuda"):
        raise UnclipError(f"model {model!r} names a folder per GPU type ({{gpu}}) but the device is "
                          f"{device!r}; use device cuda or a plain folder")
    import torch

    from unclip.export.tensorrt_cache import _slug

    index = torch.device(device).index or 0
    major, minor = torch.cuda.get_device_capability(index)
    return model.replace("{gpu}", f"{_slug(torch.cuda.get_device_name(index))}-sm{major}{minor}")


def _omp_threads() -> int:
    """OMP_NUM_THREADS: Ray sets it to the replica's whole CPUs (at least one) unless the
    environment of `ray start` (or of `unclip serve --ray`) has it already."""
    return max(1, int(os.environ.get("OMP_NUM_THREADS") or 1))


def build_app(args: dict) -> Application:
    """The application a Ray Serve config imports (`import_path: unclip.serve.ray_app:build_app`);
    `args` are checked here, so that a misspelt one fails the deploy, not each replica."""
    return UnclipReplica.bind(ReplicaOptions.model_validate(args).model_dump(mode="json"))


def ray_auth_environment(environ: Mapping[str, str], *,
                         allow_unauthenticated: bool = False) -> dict[str, str]:
    """The variables that start a local Ray instance with token authentication: without it, anyone
    who reaches one of Ray's ports can run code as this user (Ray's security guide). The user's own
    token (variable, file, or Ray's default file) is kept; otherwise a random one for this instance,
    in the environment only, so nothing is written to the home folder. RAY_AUTH_MODE set to anything
    but `token` is refused unless `allow_unauthenticated`; then nothing is changed."""
    mode = environ.get(AUTH_MODE, "").strip().lower()
    if mode and mode != "token":
        if not allow_unauthenticated:
            raise UnclipError(f"Ray's token authentication is off ({AUTH_MODE}={environ[AUTH_MODE]}): anyone "
                              "who reaches Ray's ports could run code here; unset it (unclip then starts Ray "
                              "with a token) or pass --allow-ray-unauthenticated")
        return {}
    env = {AUTH_MODE: "token"}
    if environ.get(AUTH_TOKEN):
        return env
    path = environ.get(AUTH_TOKEN_PATH)
    if path:  # Ray aborts on an unreadable or empty token file: say so before it starts
        try:
            if Path(path).read_text().strip():
                return env
        except OSError:
            pass
        raise UnclipError(f"{AUTH_TOKEN_PATH}={path} is not a readable file holding the Ray token; "
                          "fix the path or unset it (unclip then makes a token for this Ray instance)")
    home = environ.get("HOME")
    default = (Path(home) if home else Path.home()) / ".ray" / "auth_token"
    try:
        if default.read_text().strip():
            return env  # `ray get-auth-token --generate`'s token: Ray's own tools can reach this instance
    except OSError:
        pass
    return {**env, AUTH_TOKEN: secrets.token_hex(32)}  # 256 bits, as Ray's own generator


def _start_ray_authenticated(allow_unauthenticated: bool) -> None:
    """Puts ray_auth_environment's variables in this process's environment, which every process
    Ray starts inherits, and makes the `ray` already imported here read them again (it reads
    RAY_AUTH_MODE once, at import; Ray's own ray.init does the same when it turns the mode on)."""
    env = ray_auth_environment(os.environ, allow_unauthenticated=allow_unauthenticated)
    if not env:
        log.warning("Ray runs WITHOUT token authentication (%s=%s): anyone who reaches its ports "
                    "can run code on this machine", AUTH_MODE, os.environ.get(AUTH_MODE))
        return
    os.environ.update(env)
    import ray
    from ray._raylet import AuthenticationMode, AuthenticationTokenLoader, Config, get_authentication_mode

    Config.initialize("")
    AuthenticationTokenLoader.instance().reset_cache()
    if get_authentication_mode() != AuthenticationMode.TOKEN:  # a Ray that ignores the variable
        raise UnclipError(f"Ray {ray.__version__} did not turn on token authentication; "
                          "install ray[serve]>=2.60 or pass --allow-ray-unauthenticated")


def run_local(args: ReplicaOptions, *, host: str, port: int, replicas: int, max_ongoing_requests: int,
              max_queued_requests: int, drain_s: float, allow_unauthenticated: bool = False) -> None:
    """`unclip serve --ray`: a local Ray instance, `replicas` replicas behind HOST:PORT, until
    SIGTERM or Ctrl-C; then each replica finishes what it holds (up to `drain_s`) and Ray stops.
    The environment is set before `ray` is first imported (unclip.serve.cli); Ray runs with token
    authentication, and refuses to start without it unless `allow_unauthenticated`."""
    import click
    import ray

    _start_ray_authenticated(allow_unauthenticated)
    cpus = os.cpu_count() or 1
    # CPU: the cores shared out, one torch thread per whole core; GPU: one device per replica
    cuda = args.device.startswith("cuda")
    actor = {"num_cpus": 1, "num_gpus": 1} if cuda else {"num_cpus": cpus / replicas}
    app = UnclipReplica.options(num_replicas=replicas, ray_actor_options=actor,
                                max_ongoing_requests=max_ongoing_requests,
                                max_queued_requests=max_queued_requests,
                                graceful_shutdown_timeout_s=drain_s).bind(args.model_dump(mode="json"))
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level=logging.WARNING,
             _node_ip_address="127.0.0.1")
    stop = threading.Event()  # set by SIGTERM or Ctrl-C, from here on (ray.init put in its own handler)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        try:
            serve.run(app, name=APP, route_prefix="/", blocking=False)
        except RuntimeError as exc:  # a replica failed to start: its error is in the log above
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            raise UnclipError(f"the Ray Serve replicas did not start ({first}); see the replica log above, "
                              "fix the model or options and retry") from None
        click.echo(f"unclip: serving {args.model} on http://{host}:{port} through Ray Serve "
                   f"({replicas} replica{'s' if replicas > 1 else ''})", err=True)
        while not stop.wait(1):
            pass
        log.info("stopping: replicas finish what they hold for up to %.0f s", drain_s)
        serve.delete(APP)  # Ray stops routing to the replicas and waits for their requests
        serve.shutdown()
    finally:
        ray.shutdown()
