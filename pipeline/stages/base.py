"""What a stage is: one declared thing, and the chores every stage repeats done once.

A stage is declared once, in its own module, as a `MapStage`: its name, its callable class, which
section of `stages:` in the job holds its Ray resources, and what its constructor is given from the
plan. `pipeline.stages.STAGES` lists them in the order rows flow; the runner builds the dataset by
looping over that list. Adding a stage is its module, its config section and one entry in that list.

Every callable class derives from `RowStage`, which does what each stage would otherwise repeat:

- it hands `process` only the rows the stage works on (by default, samples that no stage has
  failed); every other row (error rows, `shard_end` rows) passes through untouched;
- it merges what `process` returns back in place: new columns are null on passed-through rows, and
  an error a stage reports is added to the row's `error` without losing an earlier one;
- it drops the internal columns the stage consumed, so they stop travelling;
- it stamps the batch's busy time on its rows (`_seconds_<stage>`), the counter the driver sums;
- it counts the batch in the live metrics (`pipeline.metrics`): samples in and out, failures by reason,
  latency, and the actor as alive.

Stages that run a model over a whole batch isolate a failing sample with `isolate_failures`.

A stage may run inside the next stage's actors instead of a pool of its own (`MapStage.in_next_stage`, a
job setting such as `stages.prepare.in_model_actors`): `placed` joins it to that stage as one Ray Data
operator, whose actors build both (`StagesInOneActor`) and call them in turn on each batch.
"""

from __future__ import annotations

import logging
import time
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, ClassVar, Sequence, TypeVar

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import faults, rows
from pipeline.config import ActorStageConfig, JobConfig, TaskStageConfig
from pipeline.metrics import StageMetrics

if TYPE_CHECKING:
    from pipeline.plan import Plan

log = logging.getLogger(__name__)
Item = TypeVar("Item")
Result = TypeVar("Result")

# What `process` returns: one list per column, one value per row it was given. "error" and
# "error_reason" values, where not None, fail the row (or add to its error).
Columns = dict[str, list[object]]


class RowStage:
    """Base of every stage's callable class (see the module docstring)."""

    name: ClassVar[str]
    # Columns this stage adds, with their Arrow types; null on rows it passes through.
    output_fields: ClassVar[tuple[pa.Field, ...]] = ()
    # Internal columns no later stage needs once this one ran.
    consumes: ClassVar[tuple[str, ...]] = ()

    def __call__(self, table: pa.Table) -> pa.Table:
        started = time.perf_counter()
        self.metrics.received(table)
        selected = self.select(table)
        positions = pc.indices_nonzero(selected) if table.num_rows else pa.array([], pa.uint64())
        work = table.take(positions)
        columns = self.process(work) if work.num_rows else {}
        table = self._merge(table, positions.to_pylist(), columns)
        table = table.drop_columns([c for c in self.consumes if c in table.column_names])
        table = self.annotate(table)
        seconds = time.perf_counter() - started
        self.metrics.handed_on(table, columns.get("error_reason", ()), seconds)
        return rows.add_seconds(table, self.name, seconds)

    @property
    def metrics(self) -> StageMetrics:
        """This instance's live metrics, labelled on first use (subclasses' constructors need not call ours)."""
        found = self.__dict__.get("_metrics")
        if found is None:
            found = self.__dict__["_metrics"] = StageMetrics.current(self.name)
            found.actor_alive()
        return found

    def __del__(self) -> None:
        # Ray Data drops an actor's stage when the pool lets the actor go: its last counts must reach the export.
        found = self.__dict__.get("_metrics")
        if found is not None:
            found.settle()

    def select(self, table: pa.Table) -> pa.Array | pa.ChunkedArray:
        """Rows this stage works on: by default, samples that no stage has failed."""
        return rows.pending_mask(table)

    def process(self, work: pa.Table) -> Columns:
        """The stage's own work over the rows it selected."""
        raise NotImplementedError

    def annotate(self, table: pa.Table) -> pa.Table:
        """Columns set on every row of the batch, after the merge; none by default."""
        return table

    def _merge(self, table: pa.Table, positions: list[int], columns: Columns) -> pa.Table:
        count = table.num_rows
        for field in self.output_fields:
            values: list[object] = [None] * count
            for position, value in zip(positions, columns.get(field.name, ())):
                values[position] = value
            table = rows.set_column(table, field.name, pa.array(values, field.type))
        errors = columns.get("error")
        if errors is not None and any(e is not None for e in errors):
            merged_errors = table.column("error").to_pylist()
            reasons = table.column("error_reason").to_pylist()
            for position, error, reason in zip(positions, errors, columns["error_reason"]):
                if error is None:
                    continue
                earlier = merged_errors[position]
                merged_errors[position] = f"{earlier}; {error}" if earlier else error
                reasons[position] = reason  # the latest reason: it explains the outputs that are missing
            table = rows.set_column(table, "error", pa.array(merged_errors, pa.string()))
            table = rows.set_column(table, "error_reason", pa.array(reasons, pa.string()))
        return table


StageSection = ActorStageConfig | TaskStageConfig


@dataclass(frozen=True)
class MapStage:
    """A stage of the dataset: its callable class, its section of `stages:` and its constructor arguments.

    Actor stages (a pool of `fn` instances, each keeping what it loaded) get their pool from the
    section's `concurrency`; task stages run `fn` in short-lived Ray tasks over whole blocks.
    """

    fn: type[RowStage] | type[StagesInOneActor]
    section: Callable[[JobConfig], StageSection]
    constructor_kwargs: Callable[["Plan"], dict[str, object]]
    # Whether a job runs this stage at all (the embed stage only with an `embed` section).
    enabled: Callable[[JobConfig], bool] = lambda job: True
    # Whether a job runs this stage inside the next stage's actors instead of a pool of its own.
    in_next_stage: Callable[[JobConfig], bool] = lambda job: False
    # The declared stages this one runs, in order: itself, or the stages joined into one actor.
    parts: tuple["MapStage", ...] = ()

    @property
    def name(self) -> str:
        return self.fn.name

    @property
    def stages(self) -> tuple["MapStage", ...]:
        return self.parts or (self,)

    def after(self, before: Sequence["MapStage"]) -> "MapStage":
        """This stage with `before` run in its actors, ahead of it on each batch: one Ray Data operator,
        with this stage's section (resources, pool, batch size)."""
        parts = (*before, self)
        fn = type(
            "+".join(part.fn.__name__ for part in parts),  # Ray Data names the operator (and its actors) by it
            (StagesInOneActor,),
            {"name": "+".join(part.name for part in parts)},
        )
        return MapStage(
            fn=fn,
            section=self.section,
            constructor_kwargs=lambda plan: {"parts": [(part.fn, part.constructor_kwargs(plan)) for part in parts]},
            enabled=self.enabled,
            parts=parts,
        )

    def add_to(self, dataset, plan: "Plan"):
        """The dataset with this stage applied: Arrow batches in and out, one row out per row in."""
        section = self.section(plan.job)
        kwargs = self.constructor_kwargs(plan)
        arguments: dict[str, object] = {"num_cpus": section.num_cpus}
        if isinstance(section, ActorStageConfig):
            fn: object = self.fn
            arguments.update(
                fn_constructor_kwargs=kwargs,
                compute=actor_pool(section.concurrency, section.max_tasks_in_flight_per_actor),
                batch_size=section.batch_size,
                num_gpus=section.num_gpus or None,
                **section.ray_remote_args(),
            )
        else:
            # Ray Data runs a class only in actors; a task stage is a function that builds its (cheap) class.
            fn = task_function(self.fn, kwargs)
            arguments.update(concurrency=section.concurrency, batch_size=None)
        drill = faults.forwarded_environment()
        if drill:  # per stage, so a fault drill reaches workers of a cluster this driver only joined
            arguments["runtime_env"] = {"env_vars": drill}
        with warnings.catch_warnings():
            # Ray 2.60 has named parameters for resources but none yet for actor restarts and task retries,
            # which still travel as ray_remote_args (and warn that this will change in 2.64).
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
            return dataset.map_batches(
                fn,
                batch_format="pyarrow",
                udf_modifying_row_count=False,
                **arguments,
            )


class StagesInOneActor:
    """Several stages' callables built in one actor and called in turn on each batch (`MapStage.after`).

    Each keeps what makes it a stage: its own busy time, metrics and pass-through of failed rows."""

    name: ClassVar[str]

    def __init__(self, parts: list[tuple[type[RowStage], dict[str, object]]]):
        # The last stage, whose section the actor runs under, is built first: the actor is its, so its clock
        # (a model actor's cost runs from its start, imports and load included) starts with the actor.
        built_last_first = [fn(**kwargs) for fn, kwargs in reversed(parts)]
        self.stages = built_last_first[::-1]

    def __call__(self, table: pa.Table) -> pa.Table:
        for stage in self.stages:
            table = stage(table)
        return table


def placed(stages: Sequence, job: JobConfig) -> list:
    """The stages a job runs, as Ray Data operators: a stage that runs in the next one's actors is joined to it."""
    operators: list = []
    waiting: list[MapStage] = []
    for stage in stages:
        if not stage.enabled(job):
            continue
        if isinstance(stage, MapStage) and stage.in_next_stage(job):
            waiting.append(stage)
            continue
        if waiting:
            stage, waiting = stage.after(waiting), []
        operators.append(stage)
    if waiting:
        raise ValueError(f"{waiting[-1].name} runs in the next stage's actors, but no stage follows it")
    return operators


def actor_pool(concurrency: int | tuple[int, int], max_tasks_in_flight: int | None = None):
    from ray.data import ActorPoolStrategy

    if isinstance(concurrency, int):
        return ActorPoolStrategy(size=concurrency, max_tasks_in_flight_per_actor=max_tasks_in_flight)
    low, high = concurrency
    return ActorPoolStrategy(min_size=low, max_size=high, max_tasks_in_flight_per_actor=max_tasks_in_flight)


def task_function(stage: type[RowStage], kwargs: dict[str, object]) -> Callable[[pa.Table], pa.Table]:
    """A function running `stage` over one block, named after it (Ray Data names the operator by it)."""

    def run(table: pa.Table) -> pa.Table:
        return stage(**kwargs)(table)

    run.__name__ = run.__qualname__ = stage.__name__
    return run


def isolate_failures(
    call: Callable[[list[Item]], Sequence[Result]],
    items: list[Item],
    *,
    fault_point: str,
    what: str,
    before_halves: Callable[[], None] | None = None,
) -> list[Result | BaseException]:
    """`call` over all `items` at once, one result per item. When it raises (out of memory included: halves need
    less), the items are tried again in halves, recursively, until a failing item is alone: its result is then
    its exception, and its neighbours keep theirs. `before_halves` runs before each retry (to free memory)."""
    if not items:
        return []
    try:
        faults.inject(fault_point, batch=len(items))
        return list(call(items))
    except Exception as exc:
        if len(items) == 1:
            log.warning("%s failed for one sample: %s: %s", what, type(exc).__name__, exc)
            return [exc]
        log.info("%s of a chunk of %d failed (%s); retrying it in halves", what, len(items), type(exc).__name__)
        if before_halves is not None:
            before_halves()
        half = len(items) // 2
        return isolate_failures(
            call, items[:half], fault_point=fault_point, what=what, before_halves=before_halves
        ) + isolate_failures(call, items[half:], fault_point=fault_point, what=what, before_halves=before_halves)
