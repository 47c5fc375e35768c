"""The chores every stage shares (`RowStage`) and the stage list, on literal batches."""

from __future__ import annotations

import pyarrow as pa

from pipeline import rows
from pipeline.config import ActorStageConfig, StagesConfig, TaskStageConfig
from pipeline.stages import STAGES
from pipeline.stages.base import Columns, RowStage, task_function

SHARD = "file:///data/s.tar"


class Shout(RowStage):
    """Upper-cases metadata; fails rows whose metadata says so."""

    name = "shout"
    output_fields = (pa.field("loud", pa.string()),)
    consumes = (rows.IMAGE_BYTES,)

    def __init__(self) -> None:
        self.seen: list[str] = []

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
