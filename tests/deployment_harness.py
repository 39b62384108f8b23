"""A real Flower deployment on 127.0.0.1 for tests: SuperLink, SuperNodes and the flwr CLI.

Every process starts in a session of its own, so that stopping it also stops
the children it spawned in its process group (SuperExec, ClientApp and
ServerApp processes). Flower's SuperLink starts its SuperExec in another
session, so `stop` also kills every descendant found through /proc before
the parent goes. The flwr CLI gets a temporary HOME and FLWR_HOME, so tests
never read or write ~/.flwr.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pocketfl.server.credentials import create_certificates, create_node_keys

REPO_ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
CONNECTION = "pocketfl-test"


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def descendants(pid: int) -> list[int]:
    """Return the ids of all processes below `pid`, found through /proc (Linux)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name in brackets may contain spaces; fields follow the last ')'.
        parent = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(parent, []).append(int(entry.name))

    found, pending = [], [pid]
    while pending:
        for child in children.get(pending.pop(), []):
            found.append(child)
            pending.append(child)
    return found


@dataclass
class ManagedProcess:
    """A started process, its log file and how to stop it with everything it spawned."""

    name: str
    process: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        """Return what the process wrote to stdout and stderr so far."""
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the process, its process group and every descendant."""
        targets = [self.process.pid, *descendants(self.process.pid)]
        for pid in targets:
            for send in (os.killpg, os.kill):
                try:
                    send(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def stop(self, grace: float = 5.0) -> None:
        """Terminate the process tree, then kill what is left after `grace` seconds."""
        if self.process.poll() is None:
            survivors = [self.process.pid, *descendants(self.process.pid)]
            self.kill(signal.SIGTERM)
            try:
                self.process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                pass
            for pid in survivors:
                _kill_quietly(pid)
        self.kill(signal.SIGKILL)
        self.process.wait(timeout=grace)


def _kill_quietly(pid: int) -> None:
    for send in (os.killpg, os.kill):
        try:
            send(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


@dataclass
class Deployment:
    """Certificates, node keys, one SuperLink and its SuperNodes, all under `root`."""

    root: Path
    port: int = field(default_factory=free_port)
    processes: list[ManagedProcess] = field(default_factory=list)
    superlink: ManagedProcess | None = None

    def __post_init__(self) -> None:
        self.certificates = create_certificates(self.root / "certificates", "127.0.0.1")
        node_keys = create_node_keys(self.root / "keys", ["n1", "n2", "n3", "n4", "rogue"])
        self.keys = {files.name: files for files in node_keys}
        self.flwr_home = self.root / "flwr-home"
        self.flwr_home.mkdir()
        (self.root / "home").mkdir()
        (self.flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n'
            f"[superlink.{CONNECTION}]\n"
            f'address = "127.0.0.1:{self.port}"\n'
            f'root-certificates = "{self.certificates.ca_certificate}"\n'
        )
        self.env = {
            **os.environ,
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "HOME": str(self.root / "home"),
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_TELEMETRY_ENABLED": "0",
            # Without it the SuperLink would build a new environment with uv
            # and download the CUDA build of torch.
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }

    def start(self, name: str, command: list[str], cwd: Path | None = None) -> ManagedProcess:
        """Start `command` in a new session with its output in `<root>/<name>.log`."""
        log_path = self.root / f"{name}.log"
        with log_path.open("ab") as log_file:
            process = subprocess.Popen(
                command,
                cwd=cwd or self.root,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        managed = ManagedProcess(name, process, log_path)
        self.processes.append(managed)
        return managed

    def start_superlink(self) -> ManagedProcess:
        """Start the SuperLink with TLS and SuperNode authentication, and wait until it accepts requests."""
        command = [
            str(VENV_BIN / "flower-superlink"),
            "--ssl-ca-certfile", str(self.certificates.ca_certificate),
            "--ssl-certfile", str(self.certificates.server_certificate),
            "--ssl-keyfile", str(self.certificates.server_key),
            "--enable-supernode-auth",
            "--host", "127.0.0.1",
            "--port", str(self.port),
            # On disk, so that node registrations survive a SuperLink restart.
            "--database", str(self.root / "superlink.db"),
        ]  # fmt: skip
        self.superlink = self.start("superlink", command)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.superlink.process.poll() is not None:
                raise RuntimeError(f"the SuperLink exited:\n{self.superlink.log()}")
            if self._list_nodes() is not None:
                return self.superlink
            time.sleep(0.5)
        raise TimeoutError(f"the SuperLink did not answer within 60 s:\n{self.superlink.log()}")

    def register(self, name: str) -> None:
        """Add node `name`'s public key to the keys the SuperLink accepts."""
        self.flwr(["supernode", "register", str(self.keys[name].public_key), CONNECTION])

    def start_supernode(
        self, name: str, node_config: str, insecure: bool = False, max_retries: int | None = None
    ) -> ManagedProcess:
        """Start a SuperNode with `name`'s key and `node_config`; with `insecure`, without TLS."""
        command = [
            str(VENV_BIN / "flower-supernode"),
            "--superlink", f"127.0.0.1:{self.port}",
            "--port", str(free_port()),
            "--node-config", node_config,
        ]  # fmt: skip
        if insecure:
            command.append("--insecure")
        else:
            command += [
                "--root-certificates", str(self.certificates.ca_certificate),
                "--auth-supernode-private-key", str(self.keys[name].private_key),
            ]  # fmt: skip
        if max_retries is not None:
            command += ["--max-retries", str(max_retries)]
        return self.start(f"supernode-{name}", command)

    def online_nodes(self) -> int:
        """Return how many SuperNodes the SuperLink lists as online."""
        nodes = self._list_nodes() or []
        return sum(node.get("status") == "online" for node in nodes)

    def _list_nodes(self) -> list[dict] | None:
        # `flwr supernode ls --format json` exits 0 even when the SuperLink is
        # unreachable and reports it in "success" instead.
        listing = self.flwr(["supernode", "ls", CONNECTION, "--format", "json"], check=False)
        try:
            document = json.loads(listing.stdout)
        except json.JSONDecodeError:
            return None
        if not document.get("success"):
            return None
        return document.get("nodes", [])

    def wait_for_nodes(self, count: int, timeout: float = 90) -> None:
        """Wait until at least `count` SuperNodes are online."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.online_nodes() >= count:
                return
            time.sleep(1)
        logs = "\n".join(process.log()[-2000:] for process in self.processes)
        raise TimeoutError(f"fewer than {count} SuperNodes online after {timeout} s:\n{logs}")

    def flwr(self, arguments: list[str], check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run the flwr CLI in the repository root with the test's Flower config."""
        completed = subprocess.run(
            [str(VENV_BIN / "flwr"), *arguments],
            cwd=REPO_ROOT,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and completed.returncode != 0:
            raise RuntimeError(f"flwr {' '.join(arguments)} failed:\n{completed.stdout}\n{completed.stderr}")
        return completed

    def run_command(self, run_config: str) -> list[str]:
        """Return the `flwr run` command that runs the app with `run_config` and streams its logs."""
        return [str(VENV_BIN / "flwr"), "run", str(REPO_ROOT), CONNECTION, "--stream", "--run-config", run_config]

    def stop_all(self) -> None:
        """Stop every process this deployment started, newest first."""
        for managed in reversed(self.processes):
            managed.stop()
