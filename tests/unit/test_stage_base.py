"""The chores every stage shares (`RowStage`) and the stage list, on literal batches."""

from __future__ import annotations

import time

import pyarrow as pa
import pytest

from jobs import minimal_job
from pipeline import rows
from pipeline.config import ActorStageConfig, StagesConfig, TaskStageConfig
from pipeline.stages import STAGES
from pipeline.stages.base import Columns, MapStage, RowStage, placed, task_function

SHARD = "file:///data/s.tar"


class Shout(RowStage):
    """Upper-cases metadata; fails rows whose metadata says so."""

    name = "shout"
    output_fields = (pa.field("loud", pa.string()),)
    consumes = (rows.IMAGE_BYTES,)

    def __init__(self) -> None:
        self.seen: list[str] = []
        self.built_at = time.perf_counter_ns()

    def process(self, work: pa.Table) -> Columns:
        texts = work.column("metadata").to_pylist()
        self.seen.extend(work.column("key").to_pylist())
        failing = [t == "fail" for t in texts]
        return {
            "loud": [None if f else t.upper() for t, f in zip(texts, failing)],
            "error": ["refused" if f else None for f in failing],
            "error_reason": ["shout_failed" if f else None for f in failing],
        }


def batch() -> pa.Table:
    def sample(index: int, metadata: str, error: str | None = None) -> dict[str, object]:
        return {
            rows.RECORD: rows.SAMPLE,
            "shard": SHARD,
            "key": f"k{index}",
            rows.INDEX: index,
            rows.IMAGE_BYTES: b"x",
            "metadata": metadata,
            "error": error,
            "error_reason": "no_image" if error else None,
        }

    end = {rows.RECORD: rows.SHARD_END, "shard": SHARD, rows.SHARD_SAMPLES: 4, rows.SHARD_STATUS: "ok"}
    return pa.Table.from_pylist(
        [sample(0, "hi"), sample(1, "x", error="no image"), sample(2, "fail"), sample(3, "yo"), end],
        schema=rows.READ_SCHEMA,
    )


def test_only_pending_samples_reach_the_stage_and_the_rest_pass_through_untouched() -> None:
    stage = Shout()
    out = stage(batch()).to_pylist()
    assert stage.seen == ["k0", "k2", "k3"]
    assert [r["loud"] for r in out] == ["HI", None, None, "YO", None]
    assert (out[1]["error"], out[1]["error_reason"]) == ("no image", "no_image")
    assert (out[4][rows.RECORD], out[4][rows.SHARD_SAMPLES]) == (rows.SHARD_END, 4)


def test_a_stage_error_fails_its_row_and_keeps_an_earlier_one() -> None:
    out = Shout()(batch()).to_pylist()
    assert (out[2]["error"], out[2]["error_reason"]) == ("refused", "shout_failed")
    assert out[0]["error"] is None and out[3]["error"] is None


def test_consumed_columns_are_dropped_and_busy_time_is_stamped_on_every_row() -> None:
    out = Shout()(batch())
    assert rows.IMAGE_BYTES not in out.column_names
    seconds = out.column(rows.seconds_column("shout")).to_pylist()
    assert len(seconds) == 5 and all(s > 0 for s in seconds)
    assert rows.stages_timed(out) == ["read", "shout"]


def test_an_empty_batch_passes_through() -> None:
    out = Shout()(batch().slice(0, 0))
    assert out.num_rows == 0 and "loud" in out.column_names


def test_a_task_stage_runs_as_a_function_named_after_its_class() -> None:
    run = task_function(Shout, {})
    assert run.__name__ == "Shout"
    assert [r["loud"] for r in run(batch()).to_pylist()][:1] == ["HI"]


def test_every_stage_has_its_section_of_stages_in_the_order_rows_flow() -> None:
    assert [stage.name for stage in STAGES] == list(StagesConfig.model_fields)
    sections = StagesConfig()
    for stage in STAGES[1:]:
        section = getattr(sections, stage.name)
        assert isinstance(section, (ActorStageConfig, TaskStageConfig)), stage.name


class Whisper(RowStage):
    """Lower-cases what `Shout` wrote; records the order it was called in."""

    name = "whisper"
    output_fields = (pa.field("soft", pa.string()),)

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix
        self.built_at = time.perf_counter_ns()

    def process(self, work: pa.Table) -> Columns:
        return {"soft": [loud.lower() + self.suffix for loud in work.column("loud").to_pylist()]}


def test_stages_joined_in_one_actor_run_in_turn_and_each_keeps_its_own_chores() -> None:
    shout = MapStage(fn=Shout, section=lambda job: job.stages.prepare, constructor_kwargs=lambda plan: {})
    whisper = MapStage(
        fn=Whisper, section=lambda job: job.stages.model, constructor_kwargs=lambda plan: {"suffix": "!"}
    )
    joined = whisper.after([shout])
    assert joined.fn.__name__ == "Shout+Whisper" and joined.name == "shout+whisper"
    assert joined.stages == (shout, whisper)
    actor = joined.fn(**joined.constructor_kwargs(None))
    shout_stage, whisper_stage = actor.stages
    # The actor is the last stage's (its section, its clock): built first, so its start is the actor's.
    assert whisper_stage.built_at < shout_stage.built_at
    out = actor(batch())
    # The failed row `Shout` made is passed through `Whisper` untouched; both stamp their busy time.
    assert out.column("soft").to_pylist() == ["hi!", None, None, "yo!", None]
    assert out.column("error").to_pylist()[2] == "refused"
    assert rows.stages_timed(out) == ["read", "shout", "whisper"]
    assert rows.IMAGE_BYTES not in out.column_names


def test_prepare_joins_the_model_actors_only_when_the_job_says_so() -> None:
    assert [stage.name for stage in placed(STAGES, minimal_job())] == ["read", "prepare", "model", "parse"]
    joined = placed(STAGES, minimal_job(prepare={"in_model_actors": True}))
    assert [stage.name for stage in joined] == ["read", "prepare+model", "parse"]
    assert joined[1].fn.__name__ == "PrepareStage+GenerateStage"
    assert joined[1].section(minimal_job()) is not None and joined[1].stages[1].name == "model"


def test_a_stage_that_runs_in_the_next_ones_actors_needs_a_next_one() -> None:
    last = MapStage(
        fn=Shout,
        section=lambda job: job.stages.prepare,
        constructor_kwargs=lambda plan: {},
        in_next_stage=lambda j: True,
    )
    with pytest.raises(ValueError, match="shout runs in the next stage's actors"):
        placed([last], minimal_job())
