"""The row contract between stages.

Rows move through Ray Data as Arrow tables with explicit types (Ray's numpy conversion of ragged
or nullable columns is lossy). Two kinds of row travel together:

- `sample` rows, one per tar sample. A row that fails at any stage keeps flowing with `error` and
  `error_reason` set; later stages pass it through untouched, so nothing is dropped.
- one `shard_end` row per shard, emitted by the read stage after the shard's last sample, carrying
  how many samples the shard held and whether reading it failed. The driver uses it to know when a
  shard's output file is complete, whatever order rows arrive in.

Columns starting with `_` are internal and never written.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.images import DECODE_REASONS

RECORD = "_record"
SAMPLE = "sample"
SHARD_END = "shard_end"

INDEX = "_index"
IMAGE_BYTES = "_image_bytes"
SHARD_SAMPLES = "_shard_samples"
SHARD_STATUS = "_shard_status"
SHARD_ERROR = "_shard_error"

MODEL_INPUTS = "_model_inputs"
PROMPT_IDS = "_prompt_ids"
PROMPT_TASKS = "_prompt_tasks"
QUESTIONS = "_questions"
ANSWERS = "_answers"
# The embedding model's pixel inputs, made by the prepare stage from the image it decoded (`PixelBuilder`).
CLIP_PIXELS = "_clip_pixels"

# Which model actor answered a row and when that actor started (epoch seconds): the driver sums each actor's
# lifetime into the run's model-actor seconds, what the run held its GPUs for.
MODEL_ACTOR = "_model_actor"
MODEL_ACTOR_STARTED = "_model_actor_started"

_SECONDS_PREFIX = "_seconds_"


def seconds_column(stage: str) -> str:
    """Per-row share of a stage's busy time; summed by the driver into the run's per-stage time."""
    return f"{_SECONDS_PREFIX}{stage}"


def stages_timed(table: pa.Table) -> list[str]:
    """The stages whose busy time these rows carry, in the order they ran."""
    return [name[len(_SECONDS_PREFIX) :] for name in table.column_names if name.startswith(_SECONDS_PREFIX)]


SHARD_OK = "ok"
SHARD_PARTIAL = "partial"
SHARD_FAILED = "failed"

# Every error_reason a row can carry, with the stage that sets it.
REASONS: dict[str, tuple[str, str]] = {
    "no_image": ("read", "The sample has no member with one of `input.image_extensions`."),
    **{code: ("prepare", text) for code, text in DECODE_REASONS.items()},
    "bad_metadata": (
        "prepare",
        "The sample's JSON metadata is unreadable or its question field is not text; the job's own tasks still ran.",
    ),
    "too_many_questions": (
        "prepare",
        "The sample asks more than `tasks.vqa.max_questions_per_sample` questions; the first ones were answered.",
    ),
    "preprocess_failed": ("prepare", "The model's processor rejected the image or prompt."),
    "generation_failed": ("model", "The model raised while generating for this sample, even alone in its batch."),
    "out_of_memory": (
        "model",
        "The model ran out of memory for this sample even alone in its batch (CUDA OOM or host MemoryError).",
    ),
    "embed_failed": (
        "embed",
        "An embedding model raised for this sample even alone in its batch; the row keeps its other outputs "
        "and the embeddings that did not fail.",
    ),
}

READ_SCHEMA = pa.schema(
    [
        pa.field(RECORD, pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("key", pa.string()),
        pa.field(INDEX, pa.int64()),
        pa.field("members", pa.list_(pa.string())),
        pa.field("image_member", pa.string()),
        pa.field(IMAGE_BYTES, pa.binary()),
        pa.field("image_sha256", pa.string()),
        pa.field("metadata", pa.string()),
        pa.field("error", pa.string()),
        pa.field("error_reason", pa.string()),
        pa.field(SHARD_SAMPLES, pa.int64()),
        pa.field(SHARD_STATUS, pa.string()),
        pa.field(SHARD_ERROR, pa.string()),
        pa.field(seconds_column("read"), pa.float64()),
    ]
)


def pending_mask(table: pa.Table) -> pa.ChunkedArray:
    """Sample rows that no stage has failed yet: the only rows a stage works on."""
    return pc.and_(pc.equal(table.column(RECORD), SAMPLE), pc.is_null(table.column("error")))


def set_column(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    index = table.schema.get_field_index(name)
    if index == -1:
        return table.append_column(name, values)
    return table.set_column(index, name, values)


def add_seconds(table: pa.Table, stage: str, seconds: float) -> pa.Table:
    """Spread a batch's busy time over its rows, so the driver's sum equals the stage's time."""
    share = seconds / table.num_rows if table.num_rows else 0.0
    return set_column(table, seconds_column(stage), pa.array([share] * table.num_rows, pa.float64()))
