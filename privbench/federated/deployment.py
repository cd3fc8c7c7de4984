"""Flower's deployment engine on loopback: a SuperLink, one SuperNode per client
and ``flwr run``, each a real process, all watched until the run ends.

Every process Flower starts (SuperExec, ServerApp, ClientApps) is tracked:
the orchestrating process becomes a child subreaper, so processes whose
parent dies are re-parented to it instead of escaping, and at the end every
one of them is killed, whatever happened. Flower's settings go to a
temporary FLWR_HOME (and HOME), and all ports are free ones picked per run, so
runs never share state or clash. A client that dies fails the run at once,
naming the client.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import psutil

from privbench.paths import REPO_ROOT

APP_DIR = Path(__file__).with_name("flower_app")
CONNECTION = "privbench"  # the SuperLink connection name written into FLWR_HOME/config.toml
_PR_SET_CHILD_SUBREAPER = 36
_POLL_S = 0.5
_STARTUP_TIMEOUT_S = 120


class FederationError(RuntimeError):
    """The federated run did not complete; the message names the process and why."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _set_subreaper(enabled: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_CHILD_SUBREAPER, int(enabled), 0, 0, 0)


def _exit_description(code: int) -> str:
    return f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return "\n".join(text[-lines:]) or "(empty log)"


class Federation:
    """The processes of one federated run; use as a context manager (cleanup on exit)."""

    def __init__(self, work_dir: Path, num_clients: int, progress: Callable[[str], None]):
        self.work_dir, self.num_clients, self.progress = Path(work_dir), num_clients, progress
        self.logs = self.work_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        home = self.work_dir / "home"
        bin_dir = str(Path(sys.executable).parent)  # flower-superlink spawns flower-superexec from PATH
        self.env = {**os.environ, "HOME": str(home), "FLWR_HOME": str(home / ".flwr"),
                    "PATH": bin_dir + os.pathsep + os.environ.get("PATH", ""),
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
                    "PYTHONUNBUFFERED": "1"}
        self.bin_dir = Path(bin_dir)
        self.superlink_port = free_port()
        self.nodes: list[subprocess.Popen] = []
        self.superlink: subprocess.Popen | None = None
        self._started: list[subprocess.Popen] = []
        self._seen: dict[int, psutil.Process] = {}
        self._children_before = {p.pid for p in psutil.Process().children(recursive=True)}

    # ------------------------------------------------------------------ processes

    def _start(self, name: str, command: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")
        proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=self.env, cwd=self.work_dir,
                                start_new_session=True)
        log.close()
        self._started.append(proc)
        return proc

    def __enter__(self) -> "Federation":
        _set_subreaper(True)
        try:
            self._start_processes()
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def _start_processes(self) -> None:
        flwr_home = Path(self.env["FLWR_HOME"])
        flwr_home.mkdir(parents=True, exist_ok=True)
        (flwr_home / "config.toml").write_text(
            f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "127.0.0.1:{self.superlink_port}"\ninsecure = true\n')
        self.superlink = self._start("superlink", [
            str(self.bin_dir / "flower-superlink"), "--insecure", "--host", "127.0.0.1",
            "--port", str(self.superlink_port), "--disable-runtime-dependency-installation"])
        self._wait_for_port(self.superlink_port, self.superlink, "superlink")
        for index in range(self.num_clients):
            self.nodes.append(self._start(f"supernode-{index}", [
                str(self.bin_dir / "flower-supernode"), "--insecure",
                "--superlink", f"127.0.0.1:{self.superlink_port}", "--host", "127.0.0.1", "--port", str(free_port()),
                "--node-config", f"partition-id={index} num-partitions={self.num_clients}"]))
        self.progress(f"federation up: SuperLink on 127.0.0.1:{self.superlink_port}, "
                      f"{self.num_clients} SuperNodes (logs in {self.logs})")

    def _wait_for_port(self, port: int, proc: subprocess.Popen, name: str) -> None:
        deadline = time.monotonic() + _STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive([(name, proc)])
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                return
            time.sleep(_POLL_S)
        raise FederationError(f"the {name} did not open port {port} in {_STARTUP_TIMEOUT_S} s:\n"
                              + _tail(self.logs / f"{name}.log"))

    def _check_alive(self, procs: list[tuple[str, subprocess.Popen]]) -> None:
        for name, proc in procs:
            code = proc.poll()
            if code is not None:
                role = (f"client {name.split('-')[-1]} (its SuperNode)" if name.startswith("supernode")
                        else f"the {name}")
                raise FederationError(f"{role} stopped during the run ({_exit_description(code)}), "
                                      "so the federation cannot complete\n"
                                      f"last lines of its log:\n{_tail(self.logs / f'{name}.log')}")

    def _track_descendants(self) -> None:
        """Remember every process started from here, so none can outlive the run."""
        for child in psutil.Process().children(recursive=True):
            if child.pid not in self._children_before:
                self._seen.setdefault(child.pid, child)

    def run_app(self, run_config: dict[str, str], timeout_s: float) -> None:
        """``flwr run`` the app with ``run_config``; return when it ends, raise if anything failed."""
        overrides = " ".join(f'{key}="{value}"' for key, value in run_config.items())
        runner = self._start("flwr-run", [str(self.bin_dir / "flwr"), "run", str(APP_DIR), CONNECTION,
                                          "--stream", "--run-config", overrides])
        watched = [("superlink", self.superlink), *((f"supernode-{i}", n) for i, n in enumerate(self.nodes))]
        deadline = time.monotonic() + timeout_s
        while runner.poll() is None:
            self._track_descendants()
            self._check_alive(watched)
            if time.monotonic() > deadline:
                raise FederationError(f"the federated run did not finish in {timeout_s:g} s")
            time.sleep(_POLL_S)
        self._check_alive(watched)
        if runner.returncode != 0:
            raise FederationError(f"flwr run failed ({_exit_description(runner.returncode)}):\n"
                                  + _tail(self.logs / "flwr-run.log"))

    def __exit__(self, exc_type, exc, tb) -> None:
        """Kill every process of the federation (whole process groups and all descendants)."""
        try:
            self._track_descendants()
            for proc in self._started:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)
            for proc in self._seen.values():
                with contextlib.suppress(psutil.Error):
                    proc.kill()
            for proc in self._started:
                proc.wait()
            psutil.wait_procs(list(self._seen.values()), timeout=10)  # reaps the re-parented ones too
        finally:
            _set_subreaper(False)

    def log_tails(self) -> str:
        return "\n".join(f"--- {path.name}\n{_tail(path, 8)}" for path in sorted(self.logs.glob("*.log")))
