"""The plan's processor checks, run in a process of their own while the driver starts Ray.

`start(checks)` launches `python -m pipeline.processor_checks`, hands it the checks (picklable callables,
such as `functools.partial(pipeline.inputs.render_every_prompt, ...)`) on stdin, and returns at once;
`RunningChecks.result()` waits and raises the first check's error, a ConfigError naming the field.

A plain subprocess rather than `multiprocessing`: its "spawn" and "forkserver" start methods import the
caller's `__main__` again in the child, which re-runs any script that calls `run_job` without a
`__name__ == "__main__"` guard; and "fork" is unsafe in a driver that runs threads and Ray.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pipeline.errors import PipelineError


@dataclass
class RunningChecks:
    process: subprocess.Popen

    def result(self) -> None:
        """Wait for the checks; raise the first one's error, if any."""
        assert self.process.stdout is not None
        answer = self.process.stdout.read()
        self.process.wait()
        if self.process.returncode != 0 or not answer:
            raise PipelineError(
                f"the processor checks' process (python -m {__name__}) exited with code {self.process.returncode} "
                "before it answered; its messages are above"
            )
        error = pickle.loads(answer)
        if error is not None:
            raise error


def start(checks: Sequence[Callable[[], object]]) -> RunningChecks:
    package_root = str(Path(__file__).resolve().parents[1])
    paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    process = subprocess.Popen(
        [sys.executable, "-m", __name__],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
    )
    assert process.stdin is not None
    process.stdin.write(pickle.dumps(list(checks)))
    process.stdin.close()
    return RunningChecks(process)


def _main() -> None:
    # The answer travels on the original stdout; whatever a library prints goes to stderr instead.
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    checks = pickle.load(sys.stdin.buffer)
    error: BaseException | None = None
    try:
        for check in checks:
            check()
    except PipelineError as exc:
        error = exc
    except Exception as exc:
        error = PipelineError(f"the processor checks failed: {type(exc).__name__}: {exc}")
    pickle.dump(error, answer)
    answer.close()


if __name__ == "__main__":
    _main()
