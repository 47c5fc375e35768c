"""1. The bare loop: images already decoded and preprocessed in memory, fed batch after batch to the model;
and the several-tasks comparison on the same loop."""

from __future__ import annotations

import time
from pathlib import Path

from pipeline.tools.bench.options import QUESTIONS, BenchOptions
from pipeline.tools.bench.workload import build_requests, image_bytes, tasks_config


def timed_loop(generator, requests, batch_size: int) -> dict[str, object]:
    """Every batch through the model; a first batch before the clock starts (allocator, kernels, caches)."""
    import torch

    chunks = [requests[i : i + batch_size] for i in range(0, len(requests), batch_size)]
    generator.generate_for_images(chunks[0])
    _synchronize(torch)
    started = time.perf_counter()
    for chunk in chunks:
        generator.generate_for_images(chunk)
    _synchronize(torch)
    seconds = time.perf_counter() - started
    return {
        "images": len(requests),
        "seconds": round(seconds, 3),
        "images_per_second": round(len(requests) / seconds, 3),
    }


def _synchronize(torch) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def load_generator(model_dir: Path, options: BenchOptions):
    from pipeline.config import GenerationConfig, ModelConfig
    from pipeline.generator import Generator
    from pipeline.inputs import load_processor

    config = ModelConfig(source=str(model_dir), device=options.device)
    processor = load_processor(str(model_dir), config)
    return Generator(str(model_dir), config, GenerationConfig(), processor), processor


def bare_loop(model_dir: Path, shards: list[Path], options: BenchOptions, echo) -> dict[str, object]:
    import torch

    count = options.images if options.bare_images is None else options.bare_images
    generator, processor = load_generator(model_dir, options)
    requests = build_requests(processor, tasks_config(options.tasks, options.new_tokens), image_bytes(shards, count))
    echo(f"bare loop: {len(requests)} images in batches of {options.batch_size} ({options.tasks})")
    figures = timed_loop(generator, requests, options.batch_size)
    figures["device"] = str(generator.device)
    figures["dtype"] = str(generator.dtype).removeprefix("torch.")
    figures["torch_threads"] = torch.get_num_threads()
    return figures


def multitask(model_dir: Path, shards: list[Path], options: BenchOptions, echo) -> dict[str, object]:
    """Caption alone, against caption + tags + 3 questions with and without sharing the image's prefix."""
    generator, processor = load_generator(model_dir, options)
    images = image_bytes(shards, options.multitask_images)
    echo(f"several tasks: {len(images)} images, caption alone vs caption + tags + {len(QUESTIONS)} questions")
    caption = timed_loop(
        generator, build_requests(processor, tasks_config("caption", options.new_tokens), images), options.batch_size
    )
    every = build_requests(processor, tasks_config("all", options.new_tokens), images)
    shared = timed_loop(generator, every, options.batch_size)
    generator.shares_prefix = False
    whole = timed_loop(generator, every, options.batch_size)
    return {
        "prompts_per_image": len(every[0].token_ids),
        "caption": caption,
        "all_tasks_shared_prefix": shared,
        "all_tasks_whole_prompts": whole,
        "shared_cost_vs_caption": round(float(shared["seconds"]) / float(caption["seconds"]), 3),
        "whole_prompts_cost_vs_caption": round(float(whole["seconds"]) / float(caption["seconds"]), 3),
    }
