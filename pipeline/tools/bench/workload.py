"""The bench's inputs: its tasks, generated shards, in-memory model requests and batch sizes."""

from __future__ import annotations

import json
import math
import tarfile
from pathlib import Path

from pipeline.testing.bench_model import SHAPES
from pipeline.tools.bench.options import QUESTIONS, BenchOptions


def tasks_config(kind: str, new_tokens: int):
    """The benchmark's tasks; every task generates exactly `new_tokens` (the checkpoint's min_new_tokens)."""
    from pipeline.config import TasksConfig

    if kind == "caption":
        return TasksConfig(caption={"max_new_tokens": new_tokens})
    if kind == "all":
        return TasksConfig(
            caption={"max_new_tokens": new_tokens},
            tags={"max_new_tokens": new_tokens},
            vqa={"questions": QUESTIONS, "max_new_tokens": new_tokens},
        )
    raise ValueError(f"tasks must be caption or all, not {kind!r}")


def generate_shards(directory: Path, *, images: int, shard_size: int, image_size: int, seed: int) -> list[Path]:
    """JPEG scenes in WebDataset shards, reused when a previous run made the same set."""
    from pipeline.testing.shards import write_shards

    recipe = {"images": images, "shard_size": shard_size, "image_size": image_size, "seed": seed}
    marker = directory / "recipe.json"
    shards = math.ceil(images / shard_size)
    paths = [directory / f"shard-{i:05d}.tar" for i in range(shards)]
    if marker.is_file() and json.loads(marker.read_text()) == recipe and all(p.is_file() for p in paths):
        return paths
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    for old in directory.glob("shard-*.tar"):
        old.unlink()
    full, last = divmod(images, shard_size)
    paths = write_shards(
        directory, shards=full, samples_per_shard=shard_size, seed=seed, sizes=((image_size, image_size),)
    )
    if last:
        paths += write_shards(
            directory,
            shards=1,
            samples_per_shard=last,
            seed=seed + 1,
            name=f"shard-{full:05d}.tar",
            sizes=((image_size, image_size),),
        )
    marker.write_text(json.dumps(recipe))
    return paths


def shards_for(paths: list[Path], images: int, shard_size: int) -> list[Path]:
    """The pipeline's shards: the first ones of the generated set, holding `images` images (whole shards)."""
    return paths[: math.ceil(images / shard_size)]


def image_bytes(paths: list[Path], limit: int) -> list[bytes]:
    found: list[bytes] = []
    for path in paths:
        with tarfile.open(path) as archive:
            for member in archive:
                if member.name.endswith(".jpg"):
                    found.append(archive.extractfile(member).read())  # type: ignore[union-attr]
                    if len(found) == limit:
                        return found
    return found


def build_requests(processor, tasks, image_bytes: list[bytes]):
    """Model inputs exactly as the prepare stage builds them, kept in memory for the bare loop."""
    from pipeline.generator import ImagePrompts
    from pipeline.images import decode_image
    from pipeline.inputs import InputBuilder
    from pipeline.prompts import prompts_for

    builder = InputBuilder(processor)
    prompts = prompts_for(tasks, list(tasks.vqa.questions) if tasks.vqa else [])
    limits = {"caption": tasks.caption, "tags": tasks.tags, "vqa": tasks.vqa}
    instructions = [p.instruction for p in prompts]
    requests = []
    for data in image_bytes:
        inputs = builder.build(decode_image(data, max_pixels=64_000_000).image, instructions)
        requests.append(ImagePrompts(inputs.arrays, inputs.token_ids, [limits[p.task].max_new_tokens for p in prompts]))
    return requests


def gpu_batch_size(shape_name: str, prompts_per_image: int, new_tokens: int, free_bytes: int) -> int:
    """Images per model call that fit a GPU with `free_bytes` free after the weights are loaded.

    What grows with the batch is the KV cache (every prompt of every image holds its prefix, its own tokens
    and the generated ones, 2 bytes a value in bfloat16) and the prefill's transient activations (the widest
    is the MLP's, per prefix token). Half the free memory goes to them, leaving room for the allocator's
    fragmentation and for the halving retry of a chunk that still runs out of memory.
    """
    shape = SHAPES[shape_name]
    head_dim = shape.text_hidden // shape.text_heads
    prompt_tokens = shape.image_tokens + 64  # the chat template and an instruction
    kv_per_token = 2 * shape.text_layers * shape.text_kv_heads * head_dim * 2
    kv_per_image = kv_per_token * (prompt_tokens + new_tokens) * prompts_per_image
    prefill_per_image = prompt_tokens * (3 * shape.text_mlp + 4 * shape.text_hidden) * 2
    return max(1, int(0.5 * free_bytes) // (kv_per_image + prefill_per_image))


def default_batch_size(options: BenchOptions) -> int:
    import torch

    gpu = options.device == "cuda" or (options.device == "auto" and torch.cuda.is_available())
    if not gpu:
        return 8
    from pipeline.testing.bench_model import parameter_count

    free, _ = torch.cuda.mem_get_info()
    weights = 2 * parameter_count(options.model)  # bfloat16
    prompts = 1 if options.tasks == "caption" else 2 + len(QUESTIONS)
    return gpu_batch_size(options.model, prompts, options.new_tokens, free - weights)
