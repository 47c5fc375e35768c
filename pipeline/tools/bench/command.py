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
    "ratio, time to the first row, the model actors' busy fraction, per-stage time and peak memory. "
    "With --model none, the capacity benchmark instead: photo-like JPEGs of 640x480 to 2048x1536 through the "
    "CPU stages of LLaVA-1.5 (336 px) and LLaVA-NeXT (tiles) and a model stage that answers without a forward "
    "pass; prints images/s per core for each stage, bytes per image between stages, the time to the first "
    "committed shard and the rows/s one driver commits."
)


def add_arguments(bench: argparse.ArgumentParser) -> None:
    bench.description = DESCRIPTION
    bench.add_argument(
        "--images", type=int, help="images through the pipeline (default 64; 384 photos with --model none)"
    )
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
        choices=(*SHAPES, "none"),
        default="bench",
        help="tiny: the test model; bench: CPU stand-in for a 7B model (default); 7b: LLaVA-1.5-7B's shapes; "
        "none: the capacity benchmark (no forward pass)",
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
    bench.add_argument(
        "--photos-per-size",
        type=int,
        default=24,
        help="--model none: photos of each size for the per-core figures (default 24)",
    )
    bench.add_argument(
        "--families",
        default="llava-1.5,llava-next",
        help="--model none: processors to measure, comma-separated (default llava-1.5,llava-next)",
    )
    bench.add_argument(
        "--against-plain",
        action="store_true",
        help="time `llava-pipeline run` against a plain Ray Data script (read_webdataset -> map_batches -> "
        "write_parquet) on the same shards and model, as whole processes, alternated (see --repeats)",
    )
    bench.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="--against-plain: runs of each (default 3); prints the medians, and the median of each repeat's "
        "pipeline-over-plain ratio (neighbours in time, so the machine's drift cancels)",
    )
    bench.add_argument(
        "--prepare-in-model-actors",
        action="store_true",
        help="--against-plain: the job prepares inside the model actor (stages.prepare.in_model_actors), as the "
        "plain script does, instead of in a prepare pool",
    )
    bench.add_argument("--json", type=Path, dest="json_path", help="write the figures to this JSON file")
    bench.add_argument("--workdir", type=Path, help="where shards and models are generated (default .cache/bench)")
    bench.add_argument(
        "--index",
        action="store_true",
        help="the search index benchmark instead: synthetic vectors (--images rows, default 200000) ingested "
        "incrementally into a LanceDB index; build rows/s and peak RSS per increment, query latency p50/p95 and "
        "recall@10 against exact search",
    )


def run_command(args: argparse.Namespace) -> int:
    if args.index:
        return _run_index(args)
    if args.model == "none":
        return _run_capacity(args)
    if args.against_plain:
        return _run_against_plain(args)
    options = BenchOptions(
        images=args.images or 64,
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


def _run_capacity(args: argparse.Namespace) -> int:
    from pipeline.testing.bench_model import PROCESSOR_FAMILIES
    from pipeline.tools.bench.capacity import CapacityOptions, run_capacity

    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    unknown = [f for f in families if f not in PROCESSOR_FAMILIES]
    if unknown or not families:
        raise SystemExit(f"--families: choose from {', '.join(PROCESSOR_FAMILIES)} (got {args.families!r})")
    options = CapacityOptions(
        families=families,
        per_size_images=args.photos_per_size,
        images=args.images or 384,
        shard_size=args.shard_size or 128,
        prepare_actors=args.prepare_actors,
        pipeline_family=families[0],
        json_path=args.json_path,
        workdir=args.workdir or WORKDIR,
    )
    run_capacity(options)
    return 0


def _run_against_plain(args: argparse.Namespace) -> int:
    import json

    from pipeline.testing.bench_model import build_bench_llava
    from pipeline.tools.bench.machine import machine_facts
    from pipeline.tools.bench.plain import compare_with_plain
    from pipeline.tools.bench.workload import generate_shards

    workdir = args.workdir or WORKDIR
    images, batch_size = args.images or 96, args.batch_size or 8
    shard_size = args.shard_size or 2 * batch_size
    model_dir = build_bench_llava(workdir / "models" / args.model, shape=args.model, new_tokens=args.new_tokens)
    shards = generate_shards(
        workdir / "shards" / f"{images}x{args.image_size}-{shard_size}",
        images=images,
        shard_size=shard_size,
        image_size=args.image_size,
        seed=0,
    )
    machine = machine_facts()
    print(
        f"{images} images ({args.image_size} px, {len(shards)} shards), {args.model} model, batch {batch_size}, "
        f"{args.new_tokens} tokens; {machine['cpus']} CPUs ({machine['cpu_model']}); the pipeline prepares "
        f"{'in the model actor' if args.prepare_in_model_actors else 'in a prepare actor pool'}"
    )
    figures = compare_with_plain(
        model_dir=model_dir,
        shards=shards,
        repeats=args.repeats,
        batch_size=batch_size,
        new_tokens=args.new_tokens,
        workdir=workdir,
        echo=print,
        prepare_in_model_actors=args.prepare_in_model_actors,
    )
    median = figures["median_seconds"]
    print(
        f"median: llava-pipeline run {median['pipeline']:.1f} s, plain Ray Data script {median['plain']:.1f} s "
        f"(ratio {figures['pipeline_over_plain']:.3f}); each repeat's pipeline run over its plain run: "
        f"{', '.join(f'{r:.3f}' for r in figures['paired_ratios'])} (median {figures['median_paired_ratio']:.3f})"
    )
    if args.json_path:
        args.json_path.parent.mkdir(parents=True, exist_ok=True)
        args.json_path.write_text(json.dumps({"machine": machine, **figures}, indent=2) + "\n")
    return 0


def _run_index(args: argparse.Namespace) -> int:
    from pipeline.tools.bench.index_bench import IndexBenchOptions, run_index_bench

    defaults = IndexBenchOptions()
    options = IndexBenchOptions(
        rows=args.images or defaults.rows,
        shard_rows=args.shard_size or defaults.shard_rows,
        json_path=args.json_path,
        workdir=(args.workdir / "index") if args.workdir else defaults.workdir,
    )
    run_index_bench(options)
    return 0
