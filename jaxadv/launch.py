"""Start N local processes of one command on JAX's distributed runtime, as `torchrun` does.

    python -m jaxadv.launch -n 2 -- jaxadv train --config fast --out runs/fast2

Each process gets `JAXADV_COORDINATOR` (a free port on localhost), `JAXADV_NUM_PROCESSES`
and `JAXADV_PROCESS_ID`, which `jaxadv.distributed.initialize` (called by the CLI) reads.
Every line a process prints is prefixed with its id. The launcher returns the exit code of
the first process that fails, and stops the others at once (naming the one that failed);
on Ctrl-C or SIGTERM it stops them all. No child outlives it: each runs in its own process
group, which is terminated, then killed after a grace period.

This only starts processes; the runtime (coordination, collectives over gloo on CPU) is
JAX's own. On a cluster, use its scheduler instead (README, "Many devices, many hosts").
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

GRACE_SECONDS = 5.0


def free_port() -> int:
    """A TCP port on localhost that nobody listens on now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(base: dict, *, port: int, n: int, i: int, devices: int | None, join_timeout: int | None) -> dict:
    env = dict(base)
    env.update(JAXADV_COORDINATOR=f"127.0.0.1:{port}", JAXADV_NUM_PROCESSES=str(n), JAXADV_PROCESS_ID=str(i),
               PYTHONUNBUFFERED="1")  # fmt: skip
    if join_timeout is not None:
        env["JAXADV_JOIN_TIMEOUT"] = str(join_timeout)
    if devices is not None:
        flags = " ".join(f for f in env.get("XLA_FLAGS", "").split() if "xla_force_host_platform_device_count" not in f)
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={devices}".strip()
    return env


def _pump(stream, out, prefix: str, lock: threading.Lock) -> None:
    for line in iter(stream.readline, b""):
        with lock:
            out.buffer.write(prefix.encode() + line if line.endswith(b"\n") else prefix.encode() + line + b"\n")
            out.flush()
    stream.close()


def _stop(procs: list[subprocess.Popen]) -> None:
    """SIGTERM every still-running process group, then SIGKILL what is left after the grace period."""
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
    deadline = time.monotonic() + GRACE_SECONDS
    for p in procs:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for p in procs:
        try:  # the whole group, so that grandchildren go too
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        p.wait()


def exit_code(returncode: int) -> int:
    """A child's return code as a shell would report it (killed by signal s -> 128 + s)."""
    return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


def launch(command: list[str], n: int, *, port: int | None = None, devices: int | None = None,
           join_timeout: int | None = None, env: dict | None = None, log=None) -> int:  # fmt: skip
    """Run `command` as `n` processes of one job; the first failing exit code, or 0."""
    log = log or (lambda s: print(f"jaxadv.launch: {s}", file=sys.stderr, flush=True))
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    lock = threading.Lock()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    stopping = {"signal": None}

    def on_signal(signum, frame):
        stopping["signal"] = signum

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for i in range(n):
            try:
                p = subprocess.Popen(command, env=child_env(base, port=port, n=n, i=i, devices=devices,
                                                            join_timeout=join_timeout),
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
            except OSError as e:
                log(f"cannot start {command[0]!r}: {e.strerror or e}")
                _stop(procs)
                return 127
            procs.append(p)
            width = len(str(n - 1))
            for stream, out in ((p.stdout, sys.stdout), (p.stderr, sys.stderr)):
                t = threading.Thread(target=_pump, args=(stream, out, f"[{i:>{width}}] ", lock), daemon=True)
                t.start()
                pumps.append(t)
        code = 0
        while True:
            if stopping["signal"] is not None:
                log(f"{signal.Signals(stopping['signal']).name}: stopping all {n} processes")
                _stop(procs)
                code = 130 if stopping["signal"] == signal.SIGINT else 143
                break
            failed = [(i, p.returncode) for i, p in enumerate(procs) if p.poll() not in (None, 0)]
            if failed:
                i, rc = failed[0]
                running = sum(p.poll() is None for p in procs)
                log(f"process {i} {describe(rc)}" + (f"; stopping the other {running}" if running else ""))
                _stop(procs)
                code = exit_code(rc)
                break
            if all(p.poll() == 0 for p in procs):
                break
            time.sleep(0.05)
        for t in pumps:
            t.join(timeout=2.0)
        return code
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        _stop(procs)  # nothing is left behind, whatever happened above


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if "--" not in argv:
        print("jaxadv.launch: error: give the command after --, e.g. python -m jaxadv.launch -n 2 -- jaxadv train ...",
              file=sys.stderr)
        return 2
    cut = argv.index("--")
    parser = argparse.ArgumentParser(prog="python -m jaxadv.launch",
                                     description="Run a command as N local processes of one JAX distributed job.")
    parser.add_argument("-n", "--num-processes", type=int, required=True, help="number of processes")
    parser.add_argument("--port", type=int, default=None, help="coordinator port on localhost (default: a free one)")
    parser.add_argument("--devices-per-process", type=int, default=None,
                        help="CPU devices per process (XLA's --xla_force_host_platform_device_count)")
    parser.add_argument("--join-timeout", type=int, default=None,
                        help="seconds a process waits for the others to join (default 300)")
    args = parser.parse_args(argv[:cut])
    command = argv[cut + 1:]
    if not command:
        parser.error("no command after --")
    if args.num_processes < 1:
        parser.error(f"-n must be at least 1, got {args.num_processes}")
    if args.devices_per_process is not None and args.devices_per_process < 1:
        parser.error(f"--devices-per-process must be at least 1, got {args.devices_per_process}")
    return launch(command, args.num_processes, port=args.port, devices=args.devices_per_process,
                  join_timeout=args.join_timeout)


if __name__ == "__main__":
    sys.exit(main())
