"""`llava-pipeline bench --index`: the search index at scale, on synthetic vectors.

Committed output files of `--shard-rows` rows each (image vectors of `--image-dim`, caption vectors of
`--caption-dim`, clustered like real embeddings: L2-normalised points around random centres) are written under a
local output prefix in `--increments` steps; after each step a fresh process (as a nightly update would be) runs
`pipeline.index.ingest` over the prefix, and reports its rows/s and its peak RSS: an incremental update holds one
shard at a time, so its memory should stay flat as the table grows. Then, on the full table, query latency p50/p95
for image-vector and caption-vector queries (noisy copies of stored vectors) through the IVF_PQ index with the
search settings `pipeline.search` uses, and recall@10 against exact search (a brute-force scan of every vector in
NumPy).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SEED = 0


@dataclass(frozen=True)
class IndexBenchOptions:
    rows: int = 200_000
    shard_rows: int = 2_000
    increments: int = 5
    image_dim: int = 512
    caption_dim: int = 384
    queries: int = 200
    vector_index_min_rows: int = 50_000
    workdir: Path = Path(".cache/bench/index")
    json_path: Path | None = None


def _vectors(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float = 0.35) -> np.ndarray:
    picks = rng.integers(0, len(centres), n)
    points = centres[picks] + noise * rng.standard_normal((n, centres.shape[1])).astype(np.float32) / np.sqrt(
        centres.shape[1]
    )
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float32)


def _centres(rng: np.random.Generator, dimension: int, count: int = 1_000) -> np.ndarray:
    centres = rng.standard_normal((count, dimension)).astype(np.float32)
    return centres / np.linalg.norm(centres, axis=1, keepdims=True)


def _shard_vectors(options: IndexBenchOptions, shard: int) -> tuple[np.ndarray, np.ndarray]:
    """Shard `shard`'s vectors, the same on every call (the query phase regenerates them for exact search)."""
    base = np.random.default_rng(SEED)
    image_centres, caption_centres = _centres(base, options.image_dim), _centres(base, options.caption_dim)
    rng = np.random.default_rng([SEED, shard])
    return _vectors(rng, image_centres, options.shard_rows), _vectors(rng, caption_centres, options.shard_rows)


def run_index_bench(options: IndexBenchOptions, echo=print) -> dict[str, object]:
    from pipeline.config import RetryConfig, StorageConfig
    from pipeline.embedders import EmbeddingSpace
    from pipeline.layout import OutputLayout
    from pipeline.testing.outputs import commit_file, enrichment_table
    from pipeline.tools.bench.machine import machine_facts

    workdir = options.workdir.resolve()
    shutil.rmtree(workdir, ignore_errors=True)
    output_url, index_url = str(workdir / "out"), str(workdir / "out" / "_index")
    layout = OutputLayout(output_url, StorageConfig(), RetryConfig())
    spaces = {
        "image_embedding": EmbeddingSpace("bench-image-model", options.image_dim),
        "caption_embedding": EmbeddingSpace("bench-caption-model", options.caption_dim),
    }
    shards = options.rows // options.shard_rows
    per_increment = -(-shards // options.increments)
    machine = machine_facts()
    echo(
        f"index bench: {shards * options.shard_rows} rows in {shards} shards of {options.shard_rows}, vectors of "
        f"{options.image_dim} and {options.caption_dim} dimensions, {options.increments} increments; "
        f"{machine['cpus']} CPUs, load average {os.getloadavg()[0]:.1f}"
    )
    increments = []
    for step in range(options.increments):
        first, last = step * per_increment, min(shards, (step + 1) * per_increment)
        for shard in range(first, last):
            image, caption = _shard_vectors(options, shard)
            keys = [f"{shard:05d}-{i:05d}" for i in range(options.shard_rows)]
            table = enrichment_table(
                shard=f"s3://bench/shards/shard-{shard:05d}.tar",
                keys=keys,
                captions=[f"shape {i % 97} colour {i % 13} in shard {shard}" for i in range(options.shard_rows)],
                tags=[["shape", f"colour-{i % 13}"] for i in range(options.shard_rows)],
                vectors={"image_embedding": image, "caption_embedding": caption},
                spaces=spaces,
            )
            commit_file(layout, f"shard-{shard:05d}", table)
        figures = _ingest_in_child(output_url, index_url, options.vector_index_min_rows)
        figures["load_average"] = round(os.getloadavg()[0], 2)
        increments.append(figures)
        echo(
            f"  increment {step + 1}: +{figures['rows_indexed']} rows in {figures['seconds']:.1f} s: merged in "
            f"{figures.get('merge_seconds', 0):.1f} s ({figures['rows_per_second']:.0f} rows/s), indexes and compaction "
            f"{figures.get('index_seconds', 0):.1f} s; table {figures['total_rows']} rows, peak RSS "
            f"{figures['peak_rss_mb']:.0f} MiB, indexes {', '.join(figures['indexes'])}"
        )
    queries = _query_figures(options, index_url, shards, echo)
    figures = {
        "machine": machine,
        "options": {k: str(v) if isinstance(v, Path) else v for k, v in options.__dict__.items()},
        "increments": increments,
        "build_rows_per_second": round(
            sum(i["rows_indexed"] for i in increments) / sum(i["seconds"] for i in increments), 1
        ),
        "merge_rows_per_second": round(
            sum(i["rows_indexed"] for i in increments) / sum(i.get("merge_seconds", 0) for i in increments), 1
        ),
        "queries": queries,
    }
    if options.json_path:
        options.json_path.parent.mkdir(parents=True, exist_ok=True)
        options.json_path.write_text(json.dumps(figures, indent=2) + "\n")
        echo(f"figures written to {options.json_path}")
    return figures


def _ingest_in_child(output_url: str, index_url: str, min_rows: int) -> dict[str, object]:
    completed = subprocess.run(
        [sys.executable, "-m", "pipeline.tools.bench.index_bench", "--ingest", output_url, index_url, str(min_rows)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


def _ingest_here(output_url: str, index_url: str, min_rows: int) -> None:
    from pipeline.config import RetryConfig, StorageConfig
    from pipeline.index import IndexLocation, ingest
    from pipeline.layout import OutputLayout

    report = ingest(
        OutputLayout(output_url, StorageConfig(), RetryConfig()),
        IndexLocation.of(index_url),
        vector_index_min_rows=min_rows,
        echo=lambda line: None,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        json.dumps(
            {
                "rows_indexed": report.rows_indexed,
                "total_rows": report.total_rows,
                "seconds": round(report.seconds, 2),
                "merge_seconds": round(report.merge_seconds, 2),
                "index_seconds": round(report.index_seconds, 2),
                "rows_per_second": round(report.rows_indexed / report.merge_seconds, 1)
                if report.merge_seconds
                else None,
                "peak_rss_mb": round(peak, 1),
                "indexes": report.indexes,
            }
        )
    )


def _query_figures(options: IndexBenchOptions, index_url: str, shards: int, echo) -> dict[str, object]:
    from pipeline.index import DISTANCE
    from pipeline.search import NPROBES, REFINE_FACTOR, open_index

    table = open_index(index_url).table
    stored = {"image_embedding": [], "caption_embedding": []}
    for shard in range(shards):
        image, caption = _shard_vectors(options, shard)
        stored["image_embedding"].append(image)
        stored["caption_embedding"].append(caption)
    keys = np.array([f"{s:05d}-{i:05d}" for s in range(shards) for i in range(options.shard_rows)])
    rng = np.random.default_rng([SEED, 1])
    results = {}
    for column, parts in stored.items():
        matrix = np.concatenate(parts)
        picks = rng.integers(0, len(matrix), options.queries)
        queries = matrix[picks] + 0.05 * rng.standard_normal((options.queries, matrix.shape[1])).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        latencies, recalls = [], []
        for query in queries:
            began = time.perf_counter()
            found = (
                table.search(query, vector_column_name=column)
                .distance_type(DISTANCE)
                .nprobes(NPROBES)
                .refine_factor(REFINE_FACTOR)
                .limit(10)
                .select(["key"])
                .to_arrow()
            )
            latencies.append(time.perf_counter() - began)
            exact = keys[np.argpartition(-(matrix @ query), 10)[:10]]
            recalls.append(len(set(found.column("key").to_pylist()) & set(exact.tolist())) / 10)
        results[column] = {
            "queries": options.queries,
            "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 2),
            "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 2),
            "recall_at_10": round(float(np.mean(recalls)), 4),
        }
        r = results[column]
        echo(
            f"  {column}: p50 {r['p50_ms']:.1f} ms, p95 {r['p95_ms']:.1f} ms, recall@10 {r['recall_at_10']:.3f} "
            f"({options.queries} queries, nprobes {NPROBES}, refine_factor {REFINE_FACTOR})"
        )
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="one incremental index update, for the index benchmark")
    parser.add_argument("--ingest", nargs=3, metavar=("OUTPUT", "INDEX", "MIN_ROWS"), required=True)
    args = parser.parse_args(argv)
    output_url, index_url, min_rows = args.ingest
    _ingest_here(output_url, index_url, int(min_rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
