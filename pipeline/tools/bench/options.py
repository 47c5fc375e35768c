"""What a bench run is asked to do (`BenchOptions`) and what it measured (`Figures`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
WORKDIR = REPO / ".cache" / "bench"
BUCKET = "bench"
QUESTIONS = ["What shape is in the image?", "What colour is the shape?", "What colour is the background?"]


@dataclass(frozen=True)
class BenchOptions:
    images: int = 64
    batch_size: int | None = None  # None: 8 on CPU, sized from free memory on a GPU (gpu_batch_size)
    tasks: str = "caption"  # "caption", or "all": caption + tags + 3 questions
    model: str = "bench"  # a shape in pipeline.testing.bench_model.SHAPES
    new_tokens: int = 16
    device: str = "auto"
    # None: two model batches. Ray Data hands a stage one task per input block and emits a task's output as
    # one block, and a read task's blocks are coalesced up to DataContext.target_max_block_size (128 MiB), so
    # results reach the driver about a shard at a time: small shards give the steady-state window many points.
    shard_size: int | None = None
    image_size: int = 256  # generated images are this square size, larger than every model's input
    bare_images: int | None = None  # None: as many as the pipeline run; 0 skips the bare loop
    multitask_images: int = 0  # 0 skips the caption vs several-tasks comparison
    model_cpus: float | None = None  # None: every core on CPU (torch uses as many threads), 1 with a GPU
    prepare_actors: int | None = None  # None: sized from the cores left over
    max_tasks_in_flight: int = 2
    json_path: Path | None = None
    workdir: Path = WORKDIR
    seed: int = 0


@dataclass
class Figures:
    """Everything one bench run measured; written as JSON."""

    machine: dict[str, object]
    options: dict[str, object]
    model: dict[str, object]
    bare: dict[str, object] | None = None
    multitask: dict[str, object] | None = None
    pipeline: dict[str, object] = field(default_factory=dict)
    ratio: dict[str, object] = field(default_factory=dict)
