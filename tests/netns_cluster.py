"""A cluster in a box: a real multi-node Ray cluster on this machine, for the tests and the benchmark.

The head and each worker node run in their own network namespace, with their own address on a bridge made for the
box, and in their own mount namespace, with a private ``/tmp`` (a folder of the box bound there, so the logs outlive
the node; a checkout or Python environment under ``/tmp`` is bound into it at its own path) and ``/dev/shm``. On the
worker nodes the project's source folders are hidden by empty mounts (the Python environment stays visible): the
code reaches them only through a job's ``working_dir``. An S3 server (moto) and an ``mlflow server`` listen on the
head's address; clients in this process reach everything through the bridge. Token authentication is on, as in the
shipped KubeRay manifests. All processes, namespaces and links are removed by :meth:`NetnsCluster.stop`, also after
a failure, and a box left by a killed test run is removed by the next one.

Traffic goes only to the box's addresses (no route leaves the namespaces).
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
PREFIX = "oftsrbox"  # namespaces PREFIX-<pid>-<node>; links ob<id>* (interface names have 15 characters at most)
BUCKET = "box"


class BoxUnavailable(RuntimeError):
    """Namespaces, bridges or mounts cannot be made here (not root, no ``ip``/``unshare``): the caller skips."""


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if check and out.returncode:
        raise RuntimeError(f"{' '.join(cmd)}: {out.stderr.strip() or out.stdout.strip()}")
    return out


def source_folders() -> list[Path]:
    """The folders the project is imported from: the checkout's, and the editable install's if it points elsewhere."""
    folders = {ROOT / "oftsr", ROOT / "pipelines"}
    site = Path(sys.executable).parent.parent / "lib"
    for finder in site.glob("python3*/site-packages/__editable__*finder.py"):
        for path in re.findall(r"'(/[^']+)'", finder.read_text()):
            if Path(path).name in ("oftsr", "pipelines") and Path(path).is_dir():
                folders.add(Path(path))
    return sorted(folders)


def kept_under_tmp() -> list[Path]:
    """The checkout and the Python environment, where they live under ``/tmp`` (outermost folders only)."""
    tmp = Path("/tmp").resolve()
    paths = {ROOT.resolve(), Path(sys.executable).parent.parent.resolve(), *(f.resolve() for f in source_folders())}
    under = sorted(p for p in paths if p != tmp and p.is_relative_to(tmp))
    return [p for p in under if not any(p != q and p.is_relative_to(q) for q in under)]


def remove_stale_boxes() -> None:
    """Namespaces and bridges of boxes whose test process is gone (a run killed before its teardown)."""
    listed = _run("ip", "netns", "list", check=False).stdout.split()
    for name in {n for n in listed if n.startswith(PREFIX + "-")}:
        pid = int(name.split("-")[1])
        if not Path(f"/proc/{pid}").exists():
            _kill_netns(name)
            _run("ip", "netns", "del", name, check=False)
    for line in _run("ip", "-o", "link", "show", "type", "bridge", check=False).stdout.splitlines():
        m = re.match(r"\d+: (ob\d+)p(\d+):", line)
        if m and not Path(f"/proc/{m.group(2)}").exists():
            _run("ip", "link", "del", m.group(1) + "p" + m.group(2), check=False)


def _kill_netns(ns: str) -> None:
    """SIGKILL every process in network namespace ``ns`` (what `ip netns pids` lists; never `ray stop`, which would
    look for Ray processes of the whole machine)."""
    for _ in range(5):
        pids = [int(p) for p in _run("ip", "netns", "pids", ns, check=False).stdout.split()]
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)


@dataclass
class Node:
    name: str
    ns: str
    ip: str
    proc: subprocess.Popen | None = None
    log: Path | None = None


@dataclass
class NetnsCluster:
    """``with NetnsCluster(folder) as box:`` a head (drivers only: 0 CPUs, as in the shipped configs) and
    ``workers`` worker nodes of ``cpus_per_worker`` CPUs each."""

    folder: Path
    workers: int = 2
    cpus_per_worker: float = 2
    nodes: list[Node] = field(default_factory=list)
    services: list[subprocess.Popen] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.folder = Path(self.folder)
        self.id = f"{os.getpid() % 100000}"
        self.bridge = f"ob{self.id}p{os.getpid()}"  # at most 2 + 5 + 1 + 7 characters
        net = 100 + os.getpid() % 150
        self.subnet = f"10.213.{net}"
        self.token = secrets.token_hex(16)
        self.head_ip = f"{self.subnet}.2"
        self.address = f"http://{self.head_ip}:8265"
        self.tracking_uri = f"http://{self.head_ip}:5000"
        self.s3_endpoint = f"http://{self.head_ip}:9000"

    # -- the parts a test uses ----------------------------------------------------------------------------------
    @property
    def aws_env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_ENDPOINT_URL": self.s3_endpoint,
        }

    @property
    def client_env(self) -> dict[str, str]:
        """The environment of a client in this process's namespace (`oftsr submit`, MLflow, boto3)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_"))}
        return {**env, **self.aws_env, "RAY_AUTH_TOKEN": self.token, "PATH": f"{VENV_BIN}:{env['PATH']}"}

    def node(self, name: str) -> Node:
        return next(n for n in self.nodes if n.name == name)

    def worker_ips(self) -> list[str]:
        return [n.ip for n in self.nodes if n.name != "head"]

    def in_node(self, name: str, *cmd: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run ``cmd`` inside node ``name``'s network and mount namespaces (what its Ray processes see)."""
        node = self.node(name)
        pid = str(node.proc.pid)
        children = _run("pgrep", "-P", pid, check=False).stdout.split()  # ip netns exec -> unshare -> ray start
        leaf = children[-1] if children else pid
        grandchildren = _run("pgrep", "-P", leaf, check=False).stdout.split()
        target = grandchildren[0] if grandchildren else leaf
        return subprocess.run(
            ["nsenter", "-t", target, "-n", "-m", *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=self.client_env,
        )

    def kill_node(self, name: str) -> None:
        """Kill every process of node ``name`` at once (its raylet, workers, object store): a node that dies."""
        _kill_netns(self.node(name).ns)

    # -- life cycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> NetnsCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, timeout_s: float = 240) -> None:
        if os.geteuid() != 0 or not all(shutil.which(t) for t in ("ip", "unshare", "nsenter")):
            raise BoxUnavailable("a cluster in a box needs root and the ip, unshare and nsenter commands")
        remove_stale_boxes()
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            _run("ip", "link", "add", self.bridge, "type", "bridge")
        except RuntimeError as err:
            raise BoxUnavailable(f"cannot create a bridge here: {err}") from None
        _run("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
        _run("ip", "link", "set", self.bridge, "up")
        names = ["head", *(f"w{k}" for k in range(1, self.workers + 1))]
        for k, name in enumerate(names):
            node = Node(name, f"{PREFIX}-{os.getpid()}-{name}", f"{self.subnet}.{k + 2}")
            self.nodes.append(node)
            veth, peer = f"ob{self.id}v{k}", f"ob{self.id}n{k}"
            _run("ip", "netns", "add", node.ns)
            _run("ip", "link", "add", veth, "type", "veth", "peer", "name", peer)
            _run("ip", "link", "set", peer, "netns", node.ns)
            _run("ip", "link", "set", veth, "master", self.bridge, "up")
            _run("ip", "-n", node.ns, "link", "set", peer, "name", "eth0")
            _run("ip", "-n", node.ns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
            _run("ip", "-n", node.ns, "link", "set", "eth0", "up")
            _run("ip", "-n", node.ns, "link", "set", "lo", "up")
        self._start_services()
        self._start_node(self.nodes[0], head=True)
        for node in self.nodes[1:]:
            self._start_node(node, head=False)
        self._wait_until_up(timeout_s)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AWS_", "MLFLOW_", "PYTEST"))}
        return {
            **env,
            **self.aws_env,
            "PATH": f"{VENV_BIN}:{env['PATH']}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
            "RAY_USAGE_STATS_ENABLED": "0",
            # torch.distributed's Gloo finds its own address from the host name, which resolves to 127.0.0.1 on
            # this machine: name the interface, as on any cluster whose host names do not resolve to the node
            "GLOO_SOCKET_IFNAME": "eth0",
        }

    def _start_services(self) -> None:
        head_ns = self.nodes[0].ns
        for name, cmd in (
            ("moto", [str(VENV_BIN / "moto_server"), "-H", self.head_ip, "-p", "9000"]),
            (
                "mlflow",
                [
                    str(VENV_BIN / "mlflow"),
                    "server",
                    "--host",
                    self.head_ip,
                    "--port",
                    "5000",
                    "--workers",
                    "1",
                    "--backend-store-uri",
                    f"sqlite:///{self.folder / 'mlflow.db'}",
                    # artifacts go through the server (mlflow-artifacts:/), never to a client's own disk
                    "--artifacts-destination",
                    str(self.folder / "mlartifacts"),
                ],
            ),
        ):
            log = open(self.folder / f"{name}.log", "w")  # noqa: SIM115 - the process holds it until stop()
            self.services.append(
                subprocess.Popen(
                    ["ip", "netns", "exec", head_ns, *cmd],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env=self._env(),
                    start_new_session=True,
                )
            )

    def _start_node(self, node: Node, *, head: bool) -> None:
        tmp = self.folder / "nodes" / node.name / "tmp"
        tmp.mkdir(parents=True, exist_ok=True)
        # The node's own /tmp hides the host's; a checkout or Python environment that lives under /tmp is bound
        # into it at the same path first, so that every node still finds it (the source folders are then masked
        # on the worker nodes as anywhere else).
        keep = []
        for path in kept_under_tmp():
            inside = tmp / path.relative_to("/tmp")
            inside.mkdir(parents=True, exist_ok=True)
            keep.append(f"mount --bind {path} {inside}")
        mounts = [*keep, f"mount --rbind {tmp} /tmp", "mount -t tmpfs tmpfs /dev/shm"]
        if not head:  # the project reaches worker nodes only as a job's working_dir
            mounts += [f"mount -t tmpfs -o size=1m tmpfs {folder}" for folder in source_folders()]
        if head:
            start = (
                f"ray start --head --block --node-ip-address={node.ip} --port=6379 --dashboard-host={node.ip} "
                "--dashboard-port=8265 --num-cpus=0 --include-dashboard=true --disable-usage-stats"
            )
        else:
            start = (
                f"ray start --block --address={self.head_ip}:6379 --node-ip-address={node.ip} "
                f"--num-cpus={self.cpus_per_worker:g} --disable-usage-stats"
            )
        script = " && ".join([*mounts, "cd /tmp", f"exec {start}"])
        node.log = self.folder / f"{node.name}.log"
        node.proc = subprocess.Popen(
            ["ip", "netns", "exec", node.ns, "unshare", "--mount", "--propagation", "private", "sh", "-c", script],
            stdout=open(node.log, "w"),  # noqa: SIM115 - the process holds it until stop()
            stderr=subprocess.STDOUT,
            env=self._env(),
            start_new_session=True,
        )

    def _wait_until_up(self, timeout_s: float) -> None:
        import urllib.request

        from ray.job_submission import JobSubmissionClient

        deadline = time.time() + timeout_s
        last = None
        while time.time() < deadline:
            dead = [n.name for n in self.nodes if n.proc.poll() is not None]
            if dead:
                raise RuntimeError(f"box nodes {dead} exited: {self.logs()}")
            try:
                urllib.request.urlopen(f"{self.tracking_uri}/health", timeout=5).read()
                urllib.request.urlopen(f"{self.s3_endpoint}/", timeout=5).read()
                client = JobSubmissionClient(self.address, headers={"Authorization": f"Bearer {self.token}"})
                alive = [n for n in client._do_request("GET", "/nodes?view=summary").json()["data"]["summary"]]
                if len([n for n in alive if n["raylet"]["state"] == "ALIVE"]) == len(self.nodes):
                    return
                last = f"{len(alive)} of {len(self.nodes)} nodes joined"
            except Exception as err:
                last = f"{type(err).__name__}: {err}"
            time.sleep(2)
        raise RuntimeError(f"the box did not come up in {timeout_s:.0f} s ({last}): {self.logs()}")

    def logs(self, tail: int = 1500) -> dict[str, str]:
        out = {}
        for path in sorted(self.folder.glob("*.log")):
            out[path.name] = path.read_text(errors="replace")[-tail:]
        return out

    def stop(self) -> None:
        for node in self.nodes:
            _kill_netns(node.ns)
        for proc in [*self.services, *(n.proc for n in self.nodes if n.proc)]:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
        for node in self.nodes:
            _run("ip", "netns", "del", node.ns, check=False)
        _run("ip", "link", "del", self.bridge, check=False)
        self.nodes, self.services = [], []
