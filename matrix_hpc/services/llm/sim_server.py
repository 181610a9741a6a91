"""A simulated OpenAI-compatible LLM endpoint for dry runs, capacity planning and scale tests.

Serves ``POST /v1/chat/completions``, ``GET /v1/models``, ``GET /health`` and
``GET /sim/stats``. Latency model: a request waits for one of ``capacity``
slots (further requests queue, like sequences beyond a vLLM batch), then
takes ``ttft_s + output_tokens * time_per_output_token_s``. Structured
outputs are honoured so workflows progress: ``structured_outputs.choice``
returns an allowed value, ``structured_outputs.json`` / ``response_format``
return schema-valid JSON, and offered ``tools`` may be answered with a tool
call whose arguments fit the tool's parameter schema. Faults (500/429, 400
context-length, hangs, connection resets) are injected at configured rates,
drawn from a generator seeded with ``seed``; answer content is a function
of the seed and the request body.

Every path but ``/health`` (which answers an empty 200 and nothing else)
needs ``Authorization: Bearer <key>``; without it the answer is 401. Run
standalone with the key in the environment, never on the command line::

    MATRIX_SIM_API_KEY=$(python -c 'import secrets; print(secrets.token_urlsafe(32))') \
        python -m matrix_hpc.services.llm.sim_server --port 8000 --capacity 512 --ttft-s 0.2
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from matrix_hpc.procs import stop_group
from matrix_hpc.services.llm.config import SimConf
from matrix_hpc.services.llm.contract import Secret
from matrix_hpc.services.llm.sim_endpoint import API_KEY_ENV, SimEndpoint

log = logging.getLogger(__name__)


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's loop when installed (about half the CPU per request), else asyncio's."""
    try:
        import uvloop
    except ImportError:
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


def raise_fd_limit() -> int:
    """Lift the soft open-files limit to the hard one (10k connections need 10k fds)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


LISTEN_BACKLOG = 65535  # the kernel caps it at net.core.somaxconn


def listen_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(LISTEN_BACKLOG)
    sock.setblocking(False)
    return sock


async def serve(conf: SimConf, sock: socket.socket, capacity: int | None = None,
                api_key: Secret | None = None) -> tuple[web.AppRunner, SimEndpoint]:
    """Serve the sim on an already bound, listening socket; returns the runner to clean up."""
    endpoint = SimEndpoint(conf, capacity, api_key)
    # handler_cancellation: a client that gives up frees its capacity slot, as in vLLM.
    runner = web.AppRunner(endpoint.app(), access_log=None, handler_cancellation=True, shutdown_timeout=1.0)
    await runner.setup()
    # The backlog again: asyncio re-listens with it (aiohttp's default of 128 drops
    # SYNs when thousands of clients connect at once, stalling them for seconds).
    await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
    return runner, endpoint


class SimServerThread:
    """A sim replica served by an event loop in a background thread (in-process or inside a Ray actor).

    Example::

        server = SimServerThread(SimConf(ttft_s=0.01), api_key=Secret("k3y"))
        print(server.url)   # http://127.0.0.1:<port>; clients send "Authorization: Bearer k3y"
        server.stop()
    """

    def __init__(self, conf: SimConf, advertise_host: str | None = None, api_key: Secret | None = None):
        raise_fd_limit()
        self.conf = conf
        self.api_key = api_key
        self.advertise_host = advertise_host or conf.host
        self._sock = listen_socket(conf.host, conf.port)
        self.port = self._sock.getsockname()[1]
        self._loop = new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"sim-server-{self.port}", daemon=True)
        self._thread.start()
        self._started.wait()

    @property
    def url(self) -> str:
        host = self.advertise_host
        if host in ("0.0.0.0", "::", ""):
            host = socket.gethostbyname(socket.gethostname())
        return f"http://{host}:{self.port}"

    def stats(self) -> dict[str, Any]:
        return self._endpoint.stats.as_dict()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._runner, self._endpoint = self._loop.run_until_complete(serve(self.conf, self._sock,
                                                                           api_key=self.api_key))
        self._started.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._runner.cleanup())
        self._loop.close()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10)


class SimServerProcess:
    """A sim server in a child process (``python -m matrix_hpc.services.llm.sim_server``).

    It asks for ``api_key`` (a new random one if not given), handed to the
    child through its environment, never its command line.

    Example::

        with SimServerProcess(SimConf(capacity=10_000), workers=2) as server:
            client = LLMClient(StaticEndpoints([server.url]), ClientConf(), api_key=server.api_key)
    """

    def __init__(self, conf: SimConf, workers: int = 1, log_path: Path | None = None, start_timeout_s: float = 30.0,
                 api_key: Secret | None = None):
        self.conf = conf
        self.api_key = api_key or new_api_key()
        self.workers = workers
        self.log_path = log_path
        self.start_timeout_s = start_timeout_s
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self) -> SimServerProcess:
        import tempfile

        port_file = Path(tempfile.mkdtemp(prefix="matrix-sim-")) / "port"
        args = [sys.executable, "-m", "matrix_hpc.services.llm.sim_server", "--port-file", str(port_file)]
        args += ["--workers", str(self.workers), "--conf-json", json.dumps(dataclasses.asdict(self.conf))]
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        # The child imports this package from wherever it is, whatever the working directory.
        package_root = str(Path(__file__).resolve().parents[3])
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])),
               API_KEY_ENV: self.api_key.get() or ""}
        self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        deadline = time.monotonic() + self.start_timeout_s
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"sim server did not start (exit code {self.proc.returncode}); see {self.log_path}")
            time.sleep(0.05)
        self.port = int(port_file.read_text())
        return self

    @property
    def url(self) -> str:
        return f"http://{self.conf.host}:{self.port}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc, grace_s=10)  # its own session: the workers go too

    def __enter__(self) -> SimServerProcess:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def new_api_key() -> Secret:
    """A fresh random key for one service (256 bits)."""
    import secrets

    return Secret(secrets.token_urlsafe(32))


def _serve_forever(conf: SimConf, sock: socket.socket, capacity: int, api_key: Secret | None) -> None:
    async def run() -> None:
        runner, _ = await serve(conf, sock, capacity, api_key)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()

    with asyncio.Runner(loop_factory=new_event_loop) as runner:
        runner.run(run())


def _parse_args(argv: list[str] | None) -> tuple[SimConf, int, Path | None, bool]:
    parser = argparse.ArgumentParser(description="Simulated OpenAI-compatible LLM endpoint")
    for f in dataclasses.fields(SimConf):
        if f.type in ("int", "float", "str"):
            parser.add_argument("--" + f.name.replace("_", "-"), type={"int": int, "float": float, "str": str}[f.type])
    parser.add_argument("--conf-json", help="a whole SimConf as JSON (flags given as well win)")
    parser.add_argument("--workers", type=int, default=1, help="server processes sharing the port")
    parser.add_argument("--port-file", type=Path, help="write the bound port here once listening")
    parser.add_argument("--no-auth", action="store_true",
                        help=f"serve without a key (anyone who reaches the port may use it); default: the key "
                             f"in ${API_KEY_ENV}")
    args = parser.parse_args(argv)
    values = json.loads(args.conf_json) if args.conf_json else {}
    for f in dataclasses.fields(SimConf):
        if getattr(args, f.name, None) is not None:
            values[f.name] = getattr(args, f.name)
    return SimConf(**values), args.workers, args.port_file, args.no_auth


def _api_key_from_env(no_auth: bool) -> Secret | None:
    """The key from $MATRIX_SIM_API_KEY (then dropped from the environment), or None with --no-auth."""
    key = os.environ.pop(API_KEY_ENV, "")
    if key or no_auth:
        return Secret(key) if key else None
    sys.exit(f"sim_server: set {API_KEY_ENV} to the API key clients will send as 'Authorization: Bearer <key>' "
             "(a key on the command line would be visible to every user in /proc), or pass --no-auth for a "
             "server no one else can reach")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    conf, workers, port_file, no_auth = _parse_args(argv)
    api_key = _api_key_from_env(no_auth)
    raise_fd_limit()
    sock = listen_socket(conf.host, conf.port)
    port = sock.getsockname()[1]
    capacity = -(-conf.capacity // workers)  # each process serves its share of the slots
    children = [_fork_worker(conf, sock, capacity, i, api_key) for i in range(1, workers)]
    if port_file is not None:
        tmp = port_file.with_suffix(".tmp")
        tmp.write_text(str(port))
        tmp.rename(port_file)
    log.info("sim server on %s:%d (%d process(es), capacity %d each, %s)", conf.host, port, workers, capacity,
             "API key required" if api_key else "NO API KEY (--no-auth)")
    try:
        _serve_forever(conf, sock, capacity, api_key)
    finally:
        for pid in children:
            os.kill(pid, signal.SIGTERM)
        for pid in children:
            os.waitpid(pid, 0)


def _fork_worker(conf: SimConf, sock: socket.socket, capacity: int, index: int, api_key: Secret | None) -> int:
    pid = os.fork()
    if pid == 0:  # child: accept on the shared socket until told to stop
        try:
            _serve_forever(dataclasses.replace(conf, seed=conf.seed + 1000 * index), sock, capacity, api_key)
        finally:
            os._exit(0)
    return pid


if __name__ == "__main__":
    main()
