"""Fault injection for drills and tests: make a chosen point of a real run fail the way production does.

Off unless `LLAVA_PIPELINE_FAULTS` holds a JSON object (the driver forwards it to Ray workers):

    {"state_dir": "/tmp/faults",
     "rules": {"model.batch": {"action": "oom", "min_batch": 8},
               "driver.commit": {"action": "kill", "skip": 1}}}

Each rule (or list of rules, tried in order) names a point in the code (`POINTS`) and what happens there: `kill` (SIGKILL this process,
as the OOM killer or a preempted node would), `hang` (sleep far past any timeout), `delay` (sleep
`seconds`, then go on: a slow GPU, without spending CPU), `oom` (`MemoryError`) or `raise`
(`RuntimeError`). `skip` ignores that many hits in this process first;
`times` bounds how often the rule fires across every process of the run (claims are files under
`state_dir`, which survive an actor or driver being killed), -1 for always; `min_batch` fires only
on batches at least that large; `until_file` lifts the rule once that file exists, a `delay` under
way included (a drill that ends the fault when it has seen what it waited for).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

log = logging.getLogger(__name__)

ENV = "LLAVA_PIPELINE_FAULTS"

POINTS = {
    "model.load": "a model actor loading its checkpoint",
    "model.batch": "a model actor about to generate for one chunk of images (`batch` = images in it)",
    "embed.batch": "an embed actor about to run one embedding model over rows (`batch` = rows)",
    "driver.rows": "the driver receiving a batch of finished rows",
    "driver.commit": "the driver between writing a shard's staged file and moving it into place",
    "driver.committed": "the driver right after a shard's completion marker is written",
    "index.merged": "`llava-pipeline index` right after a shard's rows are merged into the index, before it is "
    "recorded as indexed",
}
ACTIONS = ("kill", "hang", "delay", "oom", "raise")


@dataclass
class _Rule:
    point: str
    action: str
    times: int = 1
    skip: int = 0
    min_batch: int = 0
    seconds: float = 0.0  # how long `delay` sleeps
    until_file: str | None = None
    hits: int = field(default=0, compare=False)


@dataclass
class FaultPlan:
    state_dir: Path
    rules: dict[str, list[_Rule]]


def parse(text: str) -> FaultPlan:
    document = json.loads(text)
    rules: dict[str, list[_Rule]] = {}
    for point, specs in document.get("rules", {}).items():
        if point not in POINTS:
            raise ValueError(f"{ENV}: unknown fault point {point!r} (known: {', '.join(POINTS)})")
        for number, spec in enumerate(specs if isinstance(specs, list) else [specs]):
            if spec.get("action") not in ACTIONS:
                raise ValueError(f"{ENV}: {point}.action must be one of {', '.join(ACTIONS)}")
            rules.setdefault(point, []).append(_Rule(point=f"{point}.{number}", **spec))
    return FaultPlan(state_dir=Path(document["state_dir"]), rules=rules)


@cache
def _parsed(text: str) -> FaultPlan:
    return parse(text)


def _plan() -> FaultPlan | None:
    text = os.environ.get(ENV)
    return _parsed(text) if text else None


def forwarded_environment() -> dict[str, str]:
    """What a Ray runtime_env must carry so workers see the driver's fault plan."""
    text = os.environ.get(ENV)
    return {ENV: text} if text else {}


def _claim(plan: FaultPlan, rule: _Rule) -> bool:
    if rule.times < 0:
        return True
    plan.state_dir.mkdir(parents=True, exist_ok=True)
    for n in range(rule.times):
        try:
            fd = os.open(plan.state_dir / f"{rule.point}.{n}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            continue
        os.write(fd, str(os.getpid()).encode())
        os.close(fd)
        return True
    return False


def fired(state_dir: str | Path, point: str, rule: int = 0) -> int:
    """How often a bounded rule has fired so far, across processes (for checking a drill happened)."""
    return len(list(Path(state_dir).glob(f"{point}.{rule}.*")))


def inject(point: str, *, batch: int = 0) -> None:
    """Fire the first due rule for `point`, if the run has one."""
    plan = _plan()
    if plan is None or point not in plan.rules:
        return
    for rule in plan.rules[point]:
        if batch < rule.min_batch or (rule.until_file and os.path.exists(rule.until_file)):
            continue
        rule.hits += 1
        if rule.hits > rule.skip and _claim(plan, rule):
            break
    else:
        return
    log.warning("fault injection: %s at %s (pid %d)", rule.action, point, os.getpid())
    if rule.action == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if rule.action == "hang":
        time.sleep(24 * 3600)
    if rule.action == "delay":
        _sleep(rule.seconds, rule.until_file)
        return
    if rule.action == "oom":
        raise MemoryError(f"injected out of memory at {point} (batch of {batch})")
    raise RuntimeError(f"injected failure at {point}")


def _sleep(seconds: float, until_file: str | None) -> None:
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        if until_file and os.path.exists(until_file):
            return
        time.sleep(min(left, 0.2))
