"""The job spec as strict pydantic models (reading YAML and explaining errors: `pipeline.jobfile`).

Every field has a default that is safe for an unattended nightly run, and a description that
`llava-pipeline docs` renders into the README's configuration reference. Unknown keys are errors,
so a misspelt field stops the run instead of being silently ignored.
"""

from __future__ import annotations

import re
import typing
from typing import Annotated, Literal, Union

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    SecretStr,
    field_validator,
    model_validator,
)

from pipeline.urls import check_url

# Stdlib string.Formatter would accept "{0}" or "{question.attr}"; only the one named slot is allowed.
_QUESTION_SLOT = "{question}"


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


def _check_concurrency(value: object) -> int | tuple[int, int]:
    shape = "an integer (a fixed pool) or a [min, max] pair (an autoscaling pool)"
    if isinstance(value, (list, tuple)) and len(value) == 2:
        low, high = value
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (low, high)):
            raise ValueError(f"must be {shape}")
        if low < 1:
            raise ValueError("the min of [min, max] must be at least 1")
        if high < low:
            raise ValueError(f"[min, max] = [{low}, {high}]: max is below min")
        return (low, high)
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1:
            raise ValueError("must be at least 1")
        return value
    raise ValueError(f"must be {shape}")


Concurrency = Annotated[
    Union[int, tuple[int, int]],
    PlainValidator(_check_concurrency),
    PlainSerializer(lambda value: list(value) if isinstance(value, tuple) else value),
]


class StorageConfig(StrictModel):
    """Connection settings for an object store; unset fields fall back to the standard AWS environment."""

    endpoint_url: str | None = Field(
        None,
        description="S3-compatible endpoint, e.g. `http://minio:9000`. Unset: `AWS_ENDPOINT_URL_S3`, then "
        "`AWS_ENDPOINT_URL`, then AWS itself.",
    )
    region: str | None = Field(None, description="Region name. Unset: `AWS_REGION` / `AWS_DEFAULT_REGION`.")
    profile: str | None = Field(None, description="Named profile from the AWS config files.")
    anon: bool = Field(False, description="Access public buckets without credentials.")
    access_key_id: SecretStr | None = Field(
        None,
        description="Access key. Prefer the environment, an instance role or a profile; a key written here is "
        "never printed or written to outputs.",
    )
    secret_access_key: SecretStr | None = Field(None, description="Secret key, paired with `access_key_id`.")
    session_token: SecretStr | None = Field(None, description="Session token for temporary credentials.")
    request_attempts: int | None = Field(
        None,
        ge=1,
        description="Tries per HTTP request inside the S3 client (botocore's standard retry mode: throttling, 5xx "
        "and dropped connections, with jittered waits of up to a second, then two, ...) before the error reaches "
        "the job's `retries` policy. Unset: `AWS_MAX_ATTEMPTS` / `AWS_RETRY_MODE` where set, else 3. `1` leaves "
        "every retry to `retries`, with its allow-list and its backoff.",
    )
    options: dict[str, Union[str, int, float, bool]] = Field(
        default_factory=dict,
        description="Extra keyword arguments for the fsspec filesystem (for other stores, e.g. gcsfs's `project`).",
    )

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_is_http(cls, value: str | None) -> str | None:
        if value is not None and not re.match(r"^https?://[^/\s]+", value):
            raise ValueError(f"must be an http:// or https:// URL, got {value!r}")
        return value

    @model_validator(mode="after")
    def _keys_come_in_pairs(self) -> "StorageConfig":
        if (self.access_key_id is None) != (self.secret_access_key is None):
            raise ValueError("access_key_id and secret_access_key must be set together")
        return self


class InputConfig(StrictModel):
    """Where the WebDataset shards are and how a sample's members are read."""

    urls: list[Annotated[str, AfterValidator(check_url)]] = Field(
        ...,
        min_length=1,
        description="Shard URLs or patterns: local paths, `file://`, `s3://` and other fsspec URLs. Brace ranges "
        "(`shards-{00000..00999}.tar`) and globs (`*`, `**`) expand to a sorted list; a pattern that matches "
        "nothing is an error.",
    )
    image_extensions: list[str] = Field(
        ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"],
        min_length=1,
        description="Member extensions that hold the image, in order of preference when a sample has several.",
    )
    metadata_extension: str | None = Field(
        "json",
        description="Member extension holding the sample's JSON metadata (kept in the `metadata` column and "
        "read for per-sample questions). `null` to ignore metadata.",
    )
    storage: StorageConfig | None = Field(None, description="Overrides the top-level `storage` for input shards.")

    @field_validator("image_extensions")
    @classmethod
    def _normalize_extensions(cls, value: list[str]) -> list[str]:
        normalized = [ext.lower().lstrip(".") for ext in value]
        if any(not ext for ext in normalized):
            raise ValueError("extensions must be non-empty")
        if len(set(normalized)) != len(normalized):
            raise ValueError(f"duplicate extensions in {value}")
        return normalized


class LeaseConfig(StrictModel):
    """The lease a run holds on its output prefix (`_lease.json`) so that only one run writes there at a time.
    A second run on the prefix stops (exit code 2) naming the holder; a killed run's lease lapses by itself."""

    expiry_s: float = Field(
        180.0,
        ge=1,
        description="Seconds a lease lasts unless renewed: how long a killed run's lease blocks the next run. "
        "Hosts' clocks must agree to well within it.",
    )
    heartbeat_s: float = Field(
        30.0,
        gt=0,
        description="Seconds between renewals. At most a third of `expiry_s`, so a renewal that meets a slow or "
        "briefly unreachable store is retried before the lease runs out.",
    )

    @model_validator(mode="after")
    def _heartbeat_well_inside_expiry(self) -> "LeaseConfig":
        if self.heartbeat_s * 3 > self.expiry_s:
            raise ValueError(
                f"heartbeat_s ({self.heartbeat_s:g}) must be at most a third of expiry_s ({self.expiry_s:g})"
            )
        return self


class OutputConfig(StrictModel):
    """Where the Parquet outputs and the run summary go."""

    url: str = Field(
        ...,
        description="Output prefix (local path, `file://`, `s3://`, ...). One Parquet file per input shard is "
        "written under it, named after the shard; the run summary goes to `_runs/<run_id>.json`.",
    )
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet compression codec.")
    commit_threads: int = Field(
        4,
        ge=1,
        le=64,
        description="Shards the driver commits at once, on threads, while it goes on receiving rows. A commit is a "
        "few object-store requests (stage, copy, marker), mostly waiting; one shard's steps stay in order.",
    )
    mode: Literal["resume", "overwrite"] = Field(
        "resume",
        description="`resume`: shards with a completion marker (`_done/<name>.json`) are skipped, so a rerun "
        "finishes what a killed run left and a nightly run over a growing prefix processes only new shards. "
        "`overwrite`: every shard is processed again and its file and marker replaced.",
    )
    lease: LeaseConfig = Field(
        default_factory=LeaseConfig, description="The run's lease on the prefix: one writer at a time."
    )
    storage: StorageConfig | None = Field(None, description="Overrides the top-level `storage` for outputs.")

    @field_validator("url")
    @classmethod
    def _url_writable(cls, value: str) -> str:
        return check_url(value, writable=True)


class CheckpointConfig(StrictModel):
    """Where a checkpoint lives and where each node keeps its copy: the fields every model section shares."""

    source: str = Field(
        ...,
        min_length=1,
        description="A Hugging Face hub id, a local directory, or an `s3://` prefix holding a `save_pretrained` "
        "checkpoint. Remote checkpoints are fetched once per node into `cache_dir`.",
    )
    revision: str | None = Field(None, description="Hub revision (branch, tag or commit) for hub ids.")
    cache_dir: str | None = Field(
        None,
        description="Node-local directory for fetched checkpoints (under `model.cache_dir` also the processor "
        "checks that passed, in `checks/`). Unset: `$LLAVA_PIPELINE_CACHE`, else `~/.cache/llava-pipeline`.",
    )
    storage: StorageConfig | None = Field(None, description="Overrides the top-level `storage` for `s3://` models.")

    @field_validator("source")
    @classmethod
    def _source_supported(cls, value: str) -> str:
        return check_url(value) if "://" in value else value


class ModelConfig(CheckpointConfig):
    """The LLaVA-family checkpoint and how each model actor loads it."""

    source: str = Field(
        ...,
        min_length=1,
        description="A Hugging Face hub id (`llava-hf/llava-1.5-7b-hf`), a local directory, or an `s3://` prefix "
        "holding a `save_pretrained` checkpoint. Remote checkpoints are fetched once per node into `cache_dir`.",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Weights dtype. `auto`: bfloat16 on GPUs that support it, else float16; float32 on CPU."
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="`auto`: CUDA when the actor was given a GPU, else CPU."
    )
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flash_attention_3"] | None = Field(
        "sdpa", description="Attention kernel passed to transformers; `null` lets transformers choose."
    )
    trust_remote_code: bool = Field(
        False, description="Allow code shipped with the checkpoint to run. Off unless you trust the checkpoint."
    )
    chat_template: str | None = Field(
        None,
        description="Jinja chat template replacing the processor's own, for checkpoints that ship none.",
    )


class EmbedModelConfig(CheckpointConfig):
    """An embedding checkpoint and how each embed actor loads it (the fields `model` has, where they apply)."""

    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="Weights dtype. `auto`: float16 on a GPU, float32 on CPU. Embeddings are written as float32 "
        "whatever the weights.",
    )
    device: Literal["auto", "cuda", "cpu"] = Field(
        "auto", description="`auto`: CUDA when the embed actor was given a GPU (`stages.embed.num_gpus`), else CPU."
    )


class EmbedConfig(StrictModel):
    """Embeddings written next to the captions, for search and for auditing captions (schema version 3).
    Each model adds its columns; leave a model out and its columns are not written."""

    image_text_model: EmbedModelConfig | None = Field(
        None,
        description="A CLIP-family checkpoint (`CLIPModel`, SigLIP; loaded through the transformers Auto classes): "
        "writes `image_embedding` and, with `tasks.caption`, `clip_score` (how well the caption matches its "
        "image). Its pixel inputs are made by the prepare stage from the image it decoded for the model.",
    )
    text_model: EmbedModelConfig | None = Field(
        None,
        description="A sentence-transformers checkpoint (e.g. `sentence-transformers/all-MiniLM-L6-v2`): writes "
        "`caption_embedding`. Needs `tasks.caption`.",
    )

    @model_validator(mode="after")
    def _at_least_one_model(self) -> "EmbedConfig":
        if self.image_text_model is None and self.text_model is None:
            raise ValueError("set image_text_model, text_model, or both (or leave out the embed section)")
        return self


class CaptionTask(StrictModel):
    prompt: str = Field(
        "Write a one-sentence caption for this image.", min_length=1, description="Instruction sent with the image."
    )
    max_new_tokens: int = Field(64, ge=1, le=4096, description="Upper bound on generated tokens.")


class TagsTask(StrictModel):
    prompt: str = Field(
        "List the objects, attributes and setting visible in this image as short comma-separated tags.",
        min_length=1,
        description="Instruction sent with the image; the answer is split on commas, semicolons and new lines.",
    )
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Upper bound on generated tokens.")
    max_tags: int = Field(32, ge=1, description="Keep at most this many tags per image, in the model's order.")
    vocabulary: str | None = Field(
        None,
        description="Path or URL of a text file, one tag per line: tags outside it are dropped. Read once, by the "
        "driver, before the run starts.",
    )

    @field_validator("vocabulary")
    @classmethod
    def _vocabulary_supported(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value)


class VqaTask(StrictModel):
    questions: list[str] = Field(default_factory=list, description="Questions asked of every image.")
    sample_field: str | None = Field(
        None,
        description="Key in the sample's JSON metadata holding a question or a list of questions for that sample "
        "only; asked after `questions`.",
    )
    prompt: str = Field(
        _QUESTION_SLOT,
        description="Template wrapping each question; must contain `{question}`, e.g. "
        '`"{question} Answer in one word."`.',
    )
    max_new_tokens: int = Field(32, ge=1, le=4096, description="Upper bound on generated tokens per answer.")
    max_questions_per_sample: int = Field(
        16, ge=1, description="Per-sample questions beyond this count are not asked (the row records why)."
    )

    @field_validator("questions")
    @classmethod
    def _questions_not_blank(cls, value: list[str]) -> list[str]:
        if any(not q.strip() for q in value):
            raise ValueError("questions must not be blank")
        return value

    @field_validator("prompt")
    @classmethod
    def _prompt_has_slot(cls, value: str) -> str:
        if _QUESTION_SLOT not in value:
            raise ValueError(f"must contain {_QUESTION_SLOT}")
        return value

    @model_validator(mode="after")
    def _has_a_question_source(self) -> "VqaTask":
        if not self.questions and self.sample_field is None:
            raise ValueError("set `questions`, `sample_field`, or both")
        return self


class TasksConfig(StrictModel):
    """Which outputs to produce. All tasks for an image run in the same model actor call."""

    caption: CaptionTask | None = Field(None, description="Produce the `caption` column.")
    tags: TagsTask | None = Field(None, description="Produce the `tags` column.")
    vqa: VqaTask | None = Field(None, description="Produce the `vqa` column.")

    @model_validator(mode="after")
    def _at_least_one(self) -> "TasksConfig":
        if self.caption is None and self.tags is None and self.vqa is None:
            raise ValueError("enable at least one of caption, tags, vqa")
        return self


class GenerationConfig(StrictModel):
    """Decoding settings shared by every task; greedy unless `do_sample` is on."""

    do_sample: bool = Field(False, description="Sample instead of greedy decoding.")
    num_beams: int = Field(1, ge=1, description="Beam search width.")
    temperature: float | None = Field(None, gt=0, description="Sampling temperature (with `do_sample`).")
    top_p: float | None = Field(None, gt=0, le=1, description="Nucleus sampling mass (with `do_sample`).")
    top_k: int | None = Field(None, ge=1, description="Top-k sampling (with `do_sample`).")
    repetition_penalty: float | None = Field(None, gt=0, description="Penalty for repeated tokens; 1.0 is none.")

    @model_validator(mode="after")
    def _sampling_knobs_need_sampling(self) -> "GenerationConfig":
        if not self.do_sample:
            knobs = [k for k in ("temperature", "top_p", "top_k") if getattr(self, k) is not None]
            if knobs:
                raise ValueError(f"{', '.join(knobs)} only apply with do_sample: true")
        return self


class DecodeConfig(StrictModel):
    """Image decoding on the CPU stage."""

    max_image_pixels: int = Field(
        64_000_000,
        ge=1,
        description="Images whose header declares more pixels are error rows (`too_many_pixels`), checked before "
        "decoding, so a decompression bomb costs nothing.",
    )
    reduced_scale: bool = Field(
        True,
        description="Decode a JPEG at 1/2, 1/4 or 1/8 scale (Pillow's draft mode) when that is still at least the "
        "size the model's processor resizes to: a 1024x768 photo for a 336-pixel model decodes at 512x384, about "
        "twice as fast, and differs from a full decode by under one grey level on average after resizing. "
        "Processors that tile at several resolutions (LLaVA-NeXT) always get the full image. false: always decode "
        "at full size.",
    )


class ReadStageConfig(StrictModel):
    """The source stage: one Ray task per shard."""

    concurrency: int | None = Field(None, ge=1, description="Most shards read at once. Unset: Ray Data decides.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per read task.")
    rows_per_block: int = Field(
        64,
        ge=1,
        description="Most samples a read task gathers before handing them to Ray Data. Ray Data joins what a read "
        "task hands on into blocks of up to `ray.target_max_block_mb`, so a shard of small images travels as one "
        "block whatever this says; it bounds the read task's own batches.",
    )

    @property
    def min_cpus(self) -> float:
        """CPUs the stage holds while the run makes progress: one read task."""
        return self.num_cpus


class ActorStageConfig(StrictModel):
    """A stage run by a pool of actors: each keeps its state (a loaded processor or model) across batches."""

    concurrency: Concurrency = Field(1, description="Actors: a fixed count, or `[min, max]` for an autoscaling pool.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor.")
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per actor.")
    batch_size: int = Field(16, ge=1, description="Rows per call.")
    max_tasks_in_flight_per_actor: int | None = Field(
        None,
        ge=1,
        description="Batches queued per actor so the next one is ready when the actor is. Unset: Ray's default.",
    )

    @property
    def min_cpus(self) -> float:
        """CPUs the stage holds before it can run at all: its minimum pool."""
        low = self.concurrency if isinstance(self.concurrency, int) else self.concurrency[0]
        return low * self.num_cpus

    def ray_remote_args(self) -> dict[str, object]:
        """Actor options beyond resources (restarts, task retries); none by default."""
        return {}


class TaskStageConfig(StrictModel):
    """A stateless stage run as Ray tasks over whole blocks."""

    concurrency: int | None = Field(None, ge=1, description="Most tasks at once. Unset: Ray Data decides.")
    num_cpus: float = Field(0.25, gt=0, description="CPUs reserved per task.")

    @property
    def min_cpus(self) -> float:
        return self.num_cpus


class PrepareStageConfig(ActorStageConfig):
    """Decoding images and building model inputs (CPU actors)."""

    concurrency: Concurrency = Field(
        (1, 8), description="Decode/preprocess actors: a fixed count, or `[min, max]` for an autoscaling pool."
    )
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs reserved per actor (preprocessing runs on CPU).")
    batch_size: int = Field(16, ge=1, description="Samples per call.")
    in_model_actors: bool = Field(
        False,
        description="Decode and preprocess inside the model actors, each batch just before its model call, instead "
        "of in a pool of their own. One process start instead of two and no copy of the model inputs between "
        "actors: for small jobs and CPU-only runs. Off on GPU nodes, where a pool of CPU actors keeps the GPUs fed. "
        "With it on, this section's pool settings do not apply and may not be set.",
    )

    @model_validator(mode="after")
    def _no_pool_settings_in_model_actors(self) -> "PrepareStageConfig":
        if self.in_model_actors:
            pool = [name for name in sorted(self.model_fields_set) if name != "in_model_actors"]
            if pool:
                raise ValueError(
                    f"{', '.join(pool)} cannot be set with in_model_actors: true (the model actors prepare their own "
                    "batches, with stages.model's resources and batch size); remove it or turn in_model_actors off"
                )
        return self

    @property
    def min_cpus(self) -> float:
        """CPUs the stage holds of its own: none when it runs in the model actors."""
        return 0.0 if self.in_model_actors else super().min_cpus


class ModelStageConfig(ActorStageConfig):
    """Generation (GPU actors)."""

    concurrency: Concurrency = Field(
        1, description="Model actors: a fixed count, or `[min, max]` for an autoscaling pool."
    )
    num_gpus: float = Field(1.0, ge=0, description="GPUs per model actor; 0 runs the model on CPU.")
    num_cpus: float = Field(
        1.0,
        ge=0,
        description="CPUs reserved per model actor. On CPU it is also torch's thread count: Ray sets a worker's "
        "`OMP_NUM_THREADS` to the CPUs it reserved (at least 1), unless the environment sets it.",
    )
    batch_size: int = Field(8, ge=1, description="Images per generate call (each image asks every task).")
    batch_timeout_s: float | None = Field(
        900.0,
        gt=0,
        description="A model call running longer than this is taken as hung: the actor is killed and Ray retries "
        "the batch on a fresh one. Unset: no limit.",
    )
    max_batch_retries: int = Field(
        3,
        ge=0,
        description="Times a batch is retried after its model actor died (killed, preempted, timed out) before "
        "the run fails.",
    )

    def ray_remote_args(self) -> dict[str, object]:
        # A dead model actor (killed, preempted, timed out) is restarted and its batch retried, a bounded
        # number of times: a batch that kills every actor it touches must end the run, not loop forever.
        return {"max_restarts": -1, "max_task_retries": self.max_batch_retries}


class ParseStageConfig(TaskStageConfig):
    """Turning the model's raw answers into captions, tags and question-answer pairs (Ray tasks)."""


class EmbedStageConfig(ActorStageConfig):
    """Embedding (actors; only with an `embed` section)."""

    concurrency: Concurrency = Field(
        1, description="Embed actors: a fixed count, or `[min, max]` for an autoscaling pool."
    )
    num_gpus: float = Field(
        0.0,
        ge=0,
        description="GPUs per embed actor; 0 runs the embedding models on CPU. A CLIP-sized model needs a "
        "fraction of a GPU: on a GPU cluster `0.25` lets it share one with other embed actors.",
    )
    num_cpus: float = Field(1.0, ge=0, description="CPUs reserved per embed actor.")
    batch_size: int = Field(32, ge=1, description="Rows per call.")


class StagesConfig(StrictModel):
    """Ray Data resources per stage, in the order rows flow through them. Each stage scales on its own."""

    read: ReadStageConfig = Field(default_factory=ReadStageConfig, description="Reading tar shards (Ray tasks).")
    prepare: PrepareStageConfig = Field(
        default_factory=PrepareStageConfig, description="Decoding images and building model inputs (CPU actors)."
    )
    model: ModelStageConfig = Field(default_factory=ModelStageConfig, description="Generation (GPU actors).")
    parse: ParseStageConfig = Field(
        default_factory=ParseStageConfig,
        description="Parsing answers into the `caption`, `tags` and `vqa` columns (Ray tasks).",
    )
    embed: EmbedStageConfig = Field(
        default_factory=EmbedStageConfig,
        description="Image and caption embeddings (actors); runs only when the job has an `embed` section.",
    )


class FailuresConfig(StrictModel):
    """When a run that completed still counts as failed (exit code 1). Failures below these limits are
    reported in the summary and the output rows, and the run exits 0."""

    max_failed_shards: int | None = Field(
        0,
        ge=0,
        description="Most shards that may fail to read (missing, not a tar, unreadable) or end early "
        "(truncated). Unset: no limit.",
    )
    max_failed_sample_fraction: float | None = Field(
        0.05,
        ge=0,
        le=1,
        description="Largest fraction of samples that may end as error rows. Unset: no limit.",
    )


class RetryConfig(StrictModel):
    """Retries at the object-store boundary (reading shards, writing and committing outputs). Only transient
    errors are retried: throttling (503 SlowDown), 500/502/504, dropped connections and timeouts. Denied
    access, missing objects and bad credentials fail at once."""

    attempts: int = Field(6, ge=1, description="Tries per operation, the first included.")
    initial_backoff_s: float = Field(0.5, gt=0, description="Wait before the first retry; doubles each time.")
    max_backoff_s: float = Field(20.0, gt=0, description="Longest wait between tries (full jitter below it).")
    stream_restarts: int = Field(
        3,
        ge=0,
        description="Times a run restarts its stream over the shards not yet committed after Ray lost part of the "
        "cluster under it (a node died, an actor or the objects it held were lost). Committed shards are kept; "
        "rows delivered again are dropped.",
    )


class CostConfig(StrictModel):
    """What the run summary prices the model's time at (token counts and model-actor seconds are always reported)."""

    gpu_hour_usd: float | None = Field(
        None,
        ge=0,
        description="Price of one GPU-hour in USD: the summary gives the run's cost and the cost per million "
        "images from the model actors' GPU-seconds (their lifetime, model load included, times "
        "`stages.model.num_gpus`). On a CPU-only model stage the price is read per model-actor-hour. "
        "`--gpu-hour-price` overrides it. Unset: no cost lines.",
    )


class RayConfig(StrictModel):
    address: str | None = Field(
        None,
        description="Cluster to join (`auto`, `ray://host:10001`, ...). Unset: `RAY_ADDRESS`, else a local Ray "
        "started for this run.",
    )
    num_cpus: int | None = Field(None, ge=1, description="Local Ray only: logical CPUs. Unset: the machine's count.")
    num_gpus: int | None = Field(None, ge=0, description="Local Ray only: GPUs. Unset: detected.")
    object_store_memory_mb: int | None = Field(None, ge=64, description="Local Ray only: object store size.")
    progress_bars: bool = Field(True, description="Show Ray Data's per-stage progress bars.")
    target_max_block_mb: float = Field(
        8.0,
        gt=0,
        description="Largest block Ray Data builds between stages, in MiB (the job dataset's "
        "`target_max_block_size`). A task's output is held back until a block is full, so Ray's default of 128 MiB "
        "keeps a shard's first rows from the model until 128 MiB of them are read or prepared; 8 MiB is about 50 "
        "photos of 1024x768 as JPEG bytes, or 24 prepared 336-pixel images.",
    )


class IndexConfig(StrictModel):
    """The search index over the committed outputs (`llava-pipeline index`, `llava-pipeline search`): a LanceDB
    database with one row per successful sample (caption, tags, embeddings), vector indexes on the embeddings and a
    full-text index on captions and tags. It takes committed shards only, each once; a shard whose file changed
    since (`retry-failed`, `--overwrite`) has its rows replaced."""

    url: str | None = Field(
        None,
        description="Where the index lives: a local path or an `s3://` prefix. Unset: `<output.url>/_index`, next "
        "to the outputs (readers of the outputs skip `_` paths).",
    )
    update_after_run: bool = Field(
        False,
        description="Update the index at the end of every `run` and `retry-failed` that committed a shard, as "
        "`llava-pipeline index` would. A failed update is reported and leaves the run's exit code as it was: the "
        "next update takes the shards it missed.",
    )
    vector_index_min_rows: int = Field(
        50_000,
        ge=256,
        description="Rows with an embedding before a vector column gets an approximate (IVF_PQ) index; below it a "
        "search compares the query with every vector, exactly, which is fast enough at that size.",
    )
    storage: StorageConfig | None = Field(
        None, description="Overrides the output's storage settings (`output.storage`, else `storage`) for the index."
    )

    @field_validator("url")
    @classmethod
    def _url_writable(cls, value: str | None) -> str | None:
        return None if value is None else check_url(value, writable=True)


class JobConfig(StrictModel):
    """A whole job: what to read, which model, which tasks, where to write."""

    name: str = Field(
        ..., pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="Job name, used in logs and the run summary."
    )
    input: InputConfig = Field(..., description="Input shards.")
    output: OutputConfig = Field(..., description="Parquet outputs.")
    model: ModelConfig = Field(..., description="The model.")
    tasks: TasksConfig = Field(..., description="What to ask of each image.")
    embed: EmbedConfig | None = Field(
        None, description="Embedding models (schema version 3 columns). Unset: no embedding stage."
    )
    generation: GenerationConfig = Field(default_factory=GenerationConfig, description="Decoding settings.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="Image decoding.")
    stages: StagesConfig = Field(default_factory=StagesConfig, description="Per-stage Ray resources.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Which Ray cluster runs the job.")
    failures: FailuresConfig = Field(
        default_factory=FailuresConfig, description="Failure limits that decide the exit code."
    )
    retries: RetryConfig = Field(default_factory=RetryConfig, description="Object-store retries.")
    cost: CostConfig = Field(default_factory=CostConfig, description="Pricing for the run summary's cost lines.")
    storage: StorageConfig = Field(
        default_factory=StorageConfig,
        description="Object-store settings used for every URL unless a section overrides them.",
    )
    index: IndexConfig = Field(
        default_factory=IndexConfig, description="The search index over the outputs (`llava-pipeline index`)."
    )

    @model_validator(mode="after")
    def _cuda_needs_a_gpu(self) -> "JobConfig":
        if self.model.device == "cuda" and self.stages.model.num_gpus == 0:
            raise ValueError("model.device is cuda but stages.model.num_gpus is 0, so model actors get no GPU")
        return self

    @model_validator(mode="after")
    def _embeddings_have_what_they_embed(self) -> "JobConfig":
        if self.embed is None:
            return self
        if self.embed.text_model is not None and self.tasks.caption is None:
            raise ValueError("embed.text_model embeds captions, but tasks.caption is off; enable it")
        for name in ("image_text_model", "text_model"):
            model = getattr(self.embed, name)
            if model is not None and model.device == "cuda" and self.stages.embed.num_gpus == 0:
                raise ValueError(
                    f"embed.{name}.device is cuda but stages.embed.num_gpus is 0, so embed actors get no GPU"
                )
        return self

    def stage_sections(self) -> dict[str, "ReadStageConfig | ActorStageConfig | TaskStageConfig"]:
        """`stages:` sections of the stages this job runs, in order (the embed stage only with `embed`)."""
        sections = {name: getattr(self.stages, name) for name in type(self.stages).model_fields}
        if self.embed is None:
            del sections["embed"]
        return sections

    def storage_for(self, section: Literal["input", "output", "model"]) -> StorageConfig:
        return getattr(self, section).storage or self.storage


def nested_model(annotation: object) -> type[BaseModel] | None:
    """The config model inside an annotation such as `StorageConfig | None`, if any."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None
