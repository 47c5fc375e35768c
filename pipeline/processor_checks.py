"""The plan's processor checks, run in a process of their own while the driver starts Ray, and remembered
once passed.

`start(checks, memory)` launches `python -m pipeline.processor_checks`, hands it the checks (picklable
`functools.partial`s, such as `functools.partial(pipeline.inputs.render_every_prompt, ...)`) on stdin, and
returns at once; `RunningChecks.result()` waits and raises the first check's error, a ConfigError naming the
field.

The process runs the checks with torch marked absent (`pipeline.environment.torch_marked_absent`): loading a
processor and rendering its chat template need tokenizers, jinja2 and Pillow, but transformers imports torch
whenever it is installed, 3.5 of a check's 5 CPU-seconds. Where the checks fail that way, a second process runs
them with torch, and its verdict is the answer: a processor that needs torch still passes, and a bad prompt fails
with the error a model actor would meet.

A plain subprocess rather than `multiprocessing`: its "spawn" and "forkserver" start methods import the
caller's `__main__` again in the child, which re-runs any script that calls `run_job` without a
`__name__ == "__main__"` guard; and "fork" is unsafe in a driver that runs threads and Ray.

`CheckMemory`: a check that passed is not run again on this node for the same check. Its key is the checking
function and the contents of everything it is given, including every file (weights aside) of a checkpoint
directory it reads, and the versions of the libraries that load processors and render chat templates; so a
changed template, prompt, processor file or library runs it again. Failures are never remembered. A nightly
job that runs the same checkpoint and prompts saves the check's imports (transformers, 1.5 CPU-seconds) and the
wait for them at every start.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from pipeline.environment import torch_marked_absent, variables_set
from pipeline.errors import PipelineError
from pipeline.model_source import is_weight_file

log = logging.getLogger(__name__)

# What loads a processor and renders its chat template: a new version of any of them checks again.
_CHECKING_LIBRARIES = ("llava-pipeline", "transformers", "tokenizers", "jinja2", "huggingface-hub")

# This module as `python -m` runs it (where its __name__ is "__main__"), and the flag of the second try, after the
# checks failed without torch: torch importable from the start.
_MODULE = "pipeline.processor_checks"
_WITH_TORCH = "--with-torch"


@dataclass(frozen=True)
class CheckMemory:
    """The checks that passed on this node, one file each under `directory`, named by the check's key."""

    directory: Path

    @classmethod
    def under(cls, cache_dir: str) -> "CheckMemory":
        return cls(Path(cache_dir).expanduser() / "checks")

    def key(self, check: Callable[[], object]) -> str | None:
        """The check's key, or None where what it is given cannot be described (it is then always run)."""
        if not isinstance(check, functools.partial):
            return None
        owner = getattr(check.func, "__self__", None)
        if owner is not None and not isinstance(owner, types.ModuleType):
            return None  # a bound method: what its object holds is not described
        try:
            given = [_describe(value) for value in (*check.args, *sorted(check.keywords.items()))]
        except _Undescribable:
            return None
        described = {
            "check": f"{check.func.__module__}.{check.func.__qualname__}",
            "code": _source_digest(check.func),
            "given": given,
            "libraries": _library_versions(),
            "python": list(sys.version_info[:2]),
        }
        return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()

    def passed(self, key: str) -> bool:
        return (self.directory / f"{key}.passed").is_file()

    def remember(self, key: str, check: Callable[[], object]) -> None:
        """Keep `key` as passed; a cache that cannot be written only means the check runs again next time."""
        record = {"check": getattr(getattr(check, "func", check), "__qualname__", repr(check)), "at": time.time()}
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=self.directory, suffix=".tmp", delete=False) as handle:
                json.dump(record, handle)
            os.replace(handle.name, self.directory / f"{key}.passed")
        except OSError as exc:
            log.warning("could not remember a passed processor check under %s: %s", self.directory, exc)


@dataclass
class RunningChecks:
    """Checks under way (`process`), or none left to run; `ran` and `remembered` count them for the summary."""

    process: subprocess.Popen | None
    ran: int
    remembered: int
    memory: CheckMemory | None = None
    # the key of each check the process runs, remembered once all of them passed
    pending: list[tuple[str, Callable[[], object]]] = field(default_factory=list)

    error: BaseException | None = None

    def result(self) -> None:
        """Wait for the checks; raise the first one's error, if any (again at every call)."""
        if self.process is not None:
            process, self.process = self.process, None
            assert process.stdout is not None
            answer = process.stdout.read()
            process.wait()
            self.error = _answer(process.args, process.returncode, answer)
        if self.error is not None:
            raise self.error
        self._remember_passed()

    def abandon(self) -> None:
        """Stop checks still under way: the run ended before it confirmed them (no cluster, interrupted), so their
        answer has no reader. Nothing is remembered; after `result`, there is nothing to stop."""
        if self.process is not None:
            process, self.process = self.process, None
            process.kill()
            process.wait()
            if process.stdout is not None:
                process.stdout.close()

    def _remember_passed(self) -> None:
        if self.memory is not None:
            for key, check in self.pending:
                self.memory.remember(key, check)
        self.pending = []

    def as_summary(self) -> dict[str, int]:
        return {"ran": self.ran, "remembered": self.remembered}


def start(checks: Sequence[Callable[[], object]], memory: CheckMemory | None = None) -> RunningChecks:
    """The checks `memory` does not vouch for, started in a process of their own."""
    running, to_run = _not_remembered(checks, memory)
    if to_run:
        package_root = str(Path(__file__).resolve().parents[1])
        paths = [package_root, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
        running.process = subprocess.Popen(
            [sys.executable, "-m", _MODULE],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(paths)},
        )
        assert running.process.stdin is not None
        running.process.stdin.write(pickle.dumps(to_run))
        running.process.stdin.close()
    return running


def run_here(checks: Sequence[Callable[[], object]], memory: CheckMemory | None = None) -> RunningChecks:
    """The same checks run in this process (a plan made without background checks), already confirmed."""
    running, to_run = _not_remembered(checks, memory)
    for check in to_run:
        check()
    running.result()
    return running


def _not_remembered(
    checks: Sequence[Callable[[], object]], memory: CheckMemory | None
) -> tuple[RunningChecks, list[Callable[[], object]]]:
    """The checks not yet started, counted, and those of them that `memory` does not vouch for."""
    to_run: list[Callable[[], object]] = []
    keyed: list[tuple[str, Callable[[], object]]] = []
    for check in checks:
        key = memory.key(check) if memory is not None else None
        if key is not None and memory.passed(key):  # a key comes only from a memory
            continue
        to_run.append(check)
        if key is not None:
            keyed.append((key, check))
    running = RunningChecks(
        process=None, ran=len(to_run), remembered=len(checks) - len(to_run), memory=memory, pending=keyed
    )
    return running, to_run


class _Undescribable(Exception):
    pass


def _describe(value: object) -> object:
    """A JSON-able description of what a check is given; a directory stands for its files' contents."""
    if isinstance(value, str) and os.path.isdir(value):
        return {"directory": _directory_digest(Path(value))}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if isinstance(value, (list, tuple)):
        return [_describe(item) for item in value]
    model_dump_json = getattr(value, "model_dump_json", None)  # a pydantic config section
    if callable(model_dump_json):
        return {type(value).__qualname__: model_dump_json()}
    raise _Undescribable(type(value).__qualname__)


def _directory_digest(root: Path) -> str:
    """Every file's name and bytes under `root`, weights and hidden files (a `.git` beside a checkpoint) aside."""
    digest = hashlib.sha256()
    for directory, subdirectories, files in os.walk(root):
        subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
        for name in sorted(files):
            if name.startswith(".") or is_weight_file(name):
                continue
            path = Path(directory, name)
            digest.update(str(path.relative_to(root)).encode() + b"\0")
            digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _source_digest(function: Callable) -> str:
    module = sys.modules.get(function.__module__)
    source = getattr(module, "__file__", None)
    return hashlib.sha256(Path(source).read_bytes()).hexdigest() if source else function.__module__


@functools.lru_cache(maxsize=1)
def _library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for name in _CHECKING_LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _verdict(payload: bytes) -> BaseException | None:
    """The first check's error, or None: the pickled checks unpickled and run here."""
    try:
        for check in pickle.loads(payload):
            check()
    except PipelineError as exc:
        return exc
    except Exception as exc:
        return PipelineError(f"the processor checks failed: {type(exc).__name__}: {exc}")
    return None


def _verdict_with_torch(payload: bytes) -> BaseException | None:
    """The checks run again in a process where torch is importable; its verdict, or why there is none."""
    done = subprocess.run([sys.executable, "-m", _MODULE, _WITH_TORCH], input=payload, stdout=subprocess.PIPE)
    return _answer(done.args, done.returncode, done.stdout)


def _answer(command: list[str], returncode: int, answer: bytes) -> BaseException | None:
    """A checks process's verdict from what it wrote, or why there is none."""
    if returncode != 0 or not answer:
        return PipelineError(
            f"the processor checks' process ({' '.join(['python', *command[1:]])}) exited with code "
            f"{returncode} before it answered; its messages are above"
        )
    return pickle.loads(answer)


def _main() -> None:
    # The answer travels on the original stdout; whatever a library prints goes to stderr instead.
    answer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    payload = sys.stdin.buffer.read()
    if _WITH_TORCH in sys.argv[1:]:
        error = _verdict(payload)
    else:
        # A processor check loads tokenizers, chat templates and image processors, none of which needs torch; but
        # transformers imports torch whenever it is installed (3.5 of a check's 5 CPU-seconds, while the driver
        # starts Ray beside it). So the checks run first with torch marked absent. A failure may be torch's
        # absence alone (a processor that needs it), so a failure is only the verdict of a run with torch.
        # transformers warns, twice, that it found no PyTorch: true here only, and not the user's concern (a model
        # actor's transformers is quiet too).
        with torch_marked_absent(), variables_set({"TRANSFORMERS_VERBOSITY": "error"}):
            error = _verdict(payload)
        if error is not None:
            error = _verdict_with_torch(payload)
    pickle.dump(error, answer)
    answer.close()


if __name__ == "__main__":
    _main()
