"""The process that `webhook-server serve` becomes once the configuration is valid.

`serve` validates the settings (which imports nearly every dependency) and then replaces itself
(`os.execv`, same pid) with `python -m webhook_server.ops.supervisor WEB_ARGS... -- WORKER_ARGS...`,
so the process that only waits on its two children holds the standard library and nothing else.
Import nothing here beyond the standard library: every module costs memory for the life of the
server.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from types import FrameType


def say(message: str) -> None:
    sys.stderr.write(f"webhook-server: {message}\n")
    sys.stderr.flush()


class Supervisor:
    """Runs the web server and the worker as children; restarts the worker if it dies."""

    def __init__(self, web_command: list[str], worker_command: list[str]) -> None:
        self.web_command = web_command
        self.worker_command = worker_command
        self.stopping = False

    def run(self) -> int:
        web = subprocess.Popen(self.web_command)
        worker = subprocess.Popen(self.worker_command)
        children = [web, worker]

        def _forward(signum: int, frame: FrameType | None) -> None:
            self.stopping = True
            for child in children:
                if child.poll() is None:
                    child.send_signal(signum)

        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, _forward)
        while web.poll() is None:
            if worker.poll() is not None and not self.stopping:
                say(f"worker exited ({worker.returncode}); restarting")
                time.sleep(1)
                worker = subprocess.Popen(self.worker_command)
                children[1] = worker
            time.sleep(0.2)
        self.stopping = True
        if worker.poll() is None:
            worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:  # it had its chance to finish the delivery it was sending
            say("worker did not stop within 30 s; killing it")
            worker.kill()
            worker.wait()
        return web.returncode or 0


def command(web_command: list[str], worker_command: list[str]) -> list[str]:
    """The argv that runs `Supervisor(web_command, worker_command)` in a fresh interpreter."""
    return [sys.executable, "-m", "webhook_server.ops.supervisor", *web_command, "--", *worker_command]


def main(argv: list[str]) -> int:
    if "--" not in argv:
        say("usage: python -m webhook_server.ops.supervisor WEB_COMMAND... -- WORKER_COMMAND...")
        return 2
    split = argv.index("--")
    return Supervisor(argv[:split], argv[split + 1 :]).run()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
