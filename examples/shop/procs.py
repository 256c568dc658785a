"""The shop's long-running workers as background processes: started with a pid file and a log
each in the run directory (``.stack/demo/`` unless ``$SHOP_RUN_DIR`` says otherwise), stopped
by exactly those pids.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from examples.shop.settings import REPO

WORKERS = ("relay", "billing", "ledger")
STOP_SECONDS = 20.0


def pid_file(run: Path, service: str) -> Path:
    return run / f"{service}.pid"


def log_file(run: Path, service: str) -> Path:
    return run / f"{service}.log"


def start(service: str, config_path: str, run: Path) -> int:
    """Start ``python -m examples.shop.<service>`` in the background; return its pid."""
    run.mkdir(parents=True, exist_ok=True)
    with log_file(run, service).open("a") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", f"examples.shop.{service}", "--config", config_path],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True, env={**os.environ, "TRUEUP_LOG_LEVEL": "info"})
    pid_file(run, service).write_text(f"{process.pid}\n")
    return process.pid


def pid_of(run: Path, service: str) -> int | None:
    """The pid in ``service``'s pid file, if that process is alive and is that service."""
    try:
        pid = int(pid_file(run, service).read_text().strip())
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (OSError, ValueError):
        return None
    # a reused pid belongs to someone else: never signal it
    if f"examples.shop.{service}".encode() not in cmdline:
        return None
    try:
        if Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return None  # a zombie waiting for its parent: already gone
    except OSError:
        return None
    return pid


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0]
    except OSError:
        return False
    return state != "Z"


def stop(run: Path, services: tuple[str, ...] = WORKERS, *,
         sig: signal.Signals = signal.SIGTERM) -> list[str]:
    """Stop the services started from ``run`` (SIGTERM, SIGKILL after STOP_SECONDS)."""
    stopped = []
    for service in services:
        pid = pid_of(run, service)
        if pid is not None:
            os.kill(pid, sig)
            deadline = time.monotonic() + STOP_SECONDS
            while alive(pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
            stopped.append(f"{service} (pid {pid})")
        pid_file(run, service).unlink(missing_ok=True)
    return stopped


def status(run: Path) -> dict[str, int | None]:
    return {service: pid_of(run, service) for service in WORKERS}
