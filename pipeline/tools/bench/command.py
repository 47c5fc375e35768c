"""`llava-pipeline bench`: its options and how they become a `BenchOptions` run.

`pipeline.cli` imports this module only when the chosen command is `bench`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline.testing.bench_model import SHAPES
from pipeline.tools.bench.options import QUESTIONS, WORKDIR, BenchOptions
from pipeline.tools.bench.run import run_bench

DESCRIPTION = (
    "Generate shards and a random-weight benchmark LLaVA, then measure (1) the bare loop: "
    "preprocessed images in memory fed batch after batch to the model, and (2) the full pipeline from a "
    "local S3 server to Parquet, with the same model and batch size. Prints images/s for both, their "
    "ratio, time to the first row, the model actors' busy fraction, per-stage time and peak memory."
)


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.description = DESCRIPTION
    bench.add_argument("--images", type=int, default=64, help="images through the pipeline (default 64)")
    bench.add_argument(
        "--batch-size", type=int, help="images per model call (default: 8 on CPU, sized to free memory on a GPU)"
    )
    bench.add_argument(
        "--tasks",
        choices=("caption", "all"),
        default="caption",
        help=f"caption only, or caption + tags + {len(QUESTIONS)} questions (default caption)",
    )
    bench.add_argument(
        "--model",
        choices=tuple(SHAPES),
        default="bench",
        help="tiny: the test model; bench: CPU stand-in for a 7B model (default); 7b: LLaVA-1.5-7B's shapes",
    )
    bench.add_argument("--new-tokens", type=int, default=16, help="tokens generated per prompt (default 16)")
    bench.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="model device")
    bench.add_argument("--shard-size", type=int, help="images per shard (default: two model batches)")
    bench.add_argument("--image-size", type=int, default=256, help="generated images' side in pixels (default 256)")
    bench.add_argument("--bare-images", type=int, help="images through the bare loop (default: --images; 0 skips it)")
    bench.add_argument(
        "--multitask-images",
        type=int,
        default=0,
        help="images for caption alone vs caption + tags + 3 questions in the bare loop (default 0: skipped)",
    )
    bench.add_argument("--model-cpus", type=float, help="CPUs the model actor reserves (default: all on CPU, 1 on GPU)")
    bench.add_argument("--prepare-actors", type=int, help="decode/preprocess actors (default: from spare cores)")
    bench.add_argument("--json", type=Path, dest="json_path", help="write the figures to this JSON file")
    bench.add_argument("--workdir", type=Path, help="where shards and models are generated (default .cache/bench)")


def run_command(args: argparse.Namespace) -> int:
    options = BenchOptions(
        images=args.images,
        batch_size=args.batch_size,
        tasks=args.tasks,
        model=args.model,
        new_tokens=args.new_tokens,
        device=args.device,
        shard_size=args.shard_size,
        image_size=args.image_size,
        bare_images=args.bare_images,
        multitask_images=args.multitask_images,
        model_cpus=args.model_cpus,
        prepare_actors=args.prepare_actors,
        json_path=args.json_path,
        workdir=args.workdir or WORKDIR,
    )
    run_bench(options)
    return 0
