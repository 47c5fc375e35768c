"""The `llava-pipeline` command: wiring only. The core commands (run, retry-failed, validate, verify, schema) are
defined here; the tool commands (demo, bench, eval) come from `TOOLS` and are imported only when they run."""

from __future__ import annotations

import argparse
import importlib
import logging
import math
import sys

from pipeline import __version__
from pipeline.errors import ConfigError, PipelineError

EPILOG = """\
exit codes: 0 the run completed within its failure limits (failed samples are rows with `error`
              set; see the summary), or there was nothing left to do,
            1 the run failed, or breached failures.max_failed_shards / max_failed_sample_fraction,
            2 the job spec or its inputs are invalid, or another run holds the output's lease
              (nothing was started),
            130 interrupted.
"""

VERIFY_DESCRIPTION = """\
Audit an output prefix without changing it. Checked:
  - every completion marker has its data file, with the size, SHA-256, row count and key set
    the marker recorded;
  - each file's rows belong to its marker's shard, and no sample (shard, key) is in two rows,
    within a file or across files;
  - every file matches the output schema of the version it declares in its Parquet metadata;
  - no data file lacks a marker, and nothing is left under _staging/.
Reads every data file once; writes nothing.
"""

VERIFY_EPILOG = """\
exit codes: 0 the prefix is intact,
            1 something is wrong (each finding is listed),
            2 the prefix cannot be read.

Storage settings come from --job (its output storage and retries), --endpoint-url, else the AWS
environment (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, credentials, profiles).
"""


# Tool commands: name -> (module, one-line help). A tool's module is imported, and its full parser built, only
# when it is the chosen command, so `run`, `retry-failed`, `validate` and `schema` never load pipeline.tools.
# Each module has add_arguments(parser) (its description and options) and run_command(args) -> exit code.
TOOLS: dict[str, tuple[str, str]] = {
    "demo": (
        "pipeline.tools.demo",
        "run the demo job on a local S3 server with generated shards and a bundled tiny model",
    ),
    "bench": (
        "pipeline.tools.bench.command",
        "measure the pipeline against the bare model loop on generated shards",
    ),
    "eval": (
        "pipeline.tools.evaluate",
        "score a model on generated shapes through the pipeline (accuracy per task)",
    ),
}


def _add_force_unlock(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--force-unlock",
        action="store_true",
        help="take the output's lease (OUTPUT/_lease.json) even from a run that still holds it: for an operator "
        "who knows that run is dead and cannot wait for its lease to expire (output.lease.expiry_s). A holder "
        "that is in fact alive stops at its next heartbeat, without committing again",
    )


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("job", metavar="JOB.yaml", help="job spec (see jobs/ for examples)")
    parser.add_argument(
        "--input",
        metavar="URL",
        nargs="+",
        action="extend",
        help="replace input.urls: one or more shard URLs or patterns (brace ranges and globs, quoted), e.g. "
        "'s3://bucket/shards/shard-{00000..00999}.tar'; repeatable. Put JOB.yaml before it.",
    )
    parser.add_argument("--output", metavar="URL", help="replace output.url, e.g. s3://bucket/captions/2026-11-22/")
    parser.add_argument(
        "--model", metavar="PATH_OR_ID", help="replace model.source: a hub id, a local directory or an s3:// prefix"
    )


def _add_price(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--gpu-hour-price",
        metavar="USD",
        type=float,
        help="replace cost.gpu_hour_usd: price one GPU-hour (a model-actor-hour on CPU) for the summary's cost lines",
    )


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser. Tool commands get their full options only when `command` names them; otherwise
    they are listed (name and help line) but not imported."""
    parser = argparse.ArgumentParser(
        prog="llava-pipeline",
        description="Caption, tag and question images in WebDataset shards with LLaVA-family models on Ray Data, "
        "writing one Parquet file per shard.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"llava-pipeline {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser(
        "run",
        help="run a job",
        description="Run a job: read shards, generate captions/tags/answers, write Parquet and a run summary "
        "(OUTPUT/_runs/RUN_ID.json). Uses RAY_ADDRESS or ray.address when set, else starts a local Ray.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_overrides(run)
    run.add_argument("--no-progress-bars", action="store_true", help="hide Ray Data's progress bars")
    _add_price(run)
    run.add_argument(
        "--overwrite",
        action="store_true",
        help="process every shard again, replacing committed files (output.mode: overwrite); by default shards "
        "with a completion marker are skipped, so a rerun resumes and a nightly run takes only new shards "
        "(and redoes any whose committed file is missing or changed)",
    )
    _add_force_unlock(run)

    retry = commands.add_parser(
        "retry-failed",
        help="run again only the samples committed as error rows, replacing their rows in place",
        description="Find the committed rows with an error (optionally only some reasons), read just those "
        "samples again from their shards, run them through the job's model and settings (change them in the "
        "job or with --model), and replace those rows in each shard's Parquet file. Every other row is kept "
        "as it was; each sample still appears exactly once.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_overrides(retry)
    retry.add_argument(
        "--reason",
        metavar="REASON",
        nargs="+",
        action="extend",
        help="retry only rows with these error_reason codes (see `llava-pipeline schema`); default: every error row",
    )
    retry.add_argument("--no-progress-bars", action="store_true", help="hide Ray Data's progress bars")
    _add_force_unlock(retry)
    _add_price(retry)

    validate = commands.add_parser(
        "validate",
        help="check a job without running it",
        description="Check a job spec, list its shards, check the output location and the model's processor and "
        "chat template. Writes nothing and starts no Ray.",
    )
    _add_overrides(validate)
    validate.add_argument(
        "--offline", action="store_true", help="check the spec's fields only; reach no storage and no model"
    )

    verify = commands.add_parser(
        "verify",
        help="audit an output prefix: every committed file present, complete, unchanged and on schema",
        description=VERIFY_DESCRIPTION,
        epilog=VERIFY_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verify.add_argument(
        "output",
        metavar="OUTPUT_URL",
        nargs="?",
        help="the output prefix, e.g. s3://bucket/captions/ (default: the --job's output.url)",
    )
    verify.add_argument(
        "--job", metavar="JOB.yaml", help="take the storage settings (and, without OUTPUT_URL, the prefix) from a job"
    )
    verify.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint, e.g. http://minio:9000")
    verify.add_argument("--json", action="store_true", help="print the findings as JSON instead of a report")

    index = commands.add_parser(
        "index",
        help="bring the job's search index up to date with its committed shards",
        description="Ingest the committed shards of a job's output prefix into its search index (LanceDB, at "
        "index.url, default OUTPUT/_index): shards already in it at the same checksum are skipped, shards whose "
        "file changed since (retry-failed, --overwrite) have their rows replaced. Failed samples are left out; "
        "shards without embeddings are indexed for full-text search only. Builds the full-text index on captions "
        "and tags, and vector indexes once index.vector_index_min_rows vectors are in.",
        epilog="exit codes: 0 the index holds every committed shard (a shard a run is rewriting right now waits for "
        "the next update), 1 some shards were refused (their embedding model or dimension differs from the "
        "index's), 2 the job or a store cannot be used.",
    )
    index.add_argument("job", metavar="JOB.yaml", help="the job whose outputs to index")
    index.add_argument("--output", metavar="URL", help="replace output.url")
    index.add_argument("--index-url", metavar="URL", help="replace index.url (default OUTPUT/_index)")
    index.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint for the outputs and the index")
    index.add_argument("--json", action="store_true", help="print the update's figures as JSON")

    search = commands.add_parser(
        "search",
        help="search an index by text or by image",
        description="Search an index built by `llava-pipeline index`. Modes: image (text -> images through CLIP's "
        "text tower; the default where the index has image embeddings), caption (text -> captions through the "
        "caption model), text (full text over captions and tags), hybrid (full text and image vectors, fused by "
        "reciprocal rank). --image FILE finds similar images. The query models are the ones recorded in the index.",
        epilog="exit codes: 0 answered, 2 no index there, a query image that cannot be decoded, or a mode the index "
        "cannot serve.",
    )
    search.add_argument("index", metavar="INDEX_URL", help="the index, e.g. s3://bucket/captions/_index")
    search.add_argument("query", nargs="?", help='the text query, e.g. "a red star on a blue background"')
    search.add_argument("--image", metavar="FILE", help="find images similar to this image file")
    search.add_argument("--mode", choices=("image", "caption", "text", "hybrid"), help="what to search (see above)")
    search.add_argument("-k", type=int, default=10, help="hits to return (default 10)")
    search.add_argument("--json", action="store_true", help="print the hits as JSON")
    search.add_argument("--endpoint-url", metavar="URL", help="S3-compatible endpoint, e.g. http://minio:9000")

    _add_tool(commands, "demo", command)

    schema = commands.add_parser("schema", help="print the output schema, column by column")
    schema.add_argument("--json", action="store_true", help="print the schema file itself")

    _add_tool(commands, "bench", command)
    _add_tool(commands, "eval", command)
    return parser


def _add_tool(commands, name: str, chosen: str | None) -> None:
    module, help_line = TOOLS[name]
    parser = commands.add_parser(name, help=help_line)
    if name == chosen:
        importlib.import_module(module).add_arguments(parser)


def _chosen_command(argv: list[str]) -> str | None:
    """The subcommand in `argv`: its first word that is not an option (the top-level options take no value)."""
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(_chosen_command(argv)).parse_args(argv)
    # Libraries log at INFO about routine things (where credentials came from); only ours speak at INFO.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    logging.getLogger("pipeline").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "retry-failed":
            return _retry_failed(args)
        if args.command == "validate":
            return _validate(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "schema":
            return _schema(args)
        if args.command == "index":
            from pipeline.index import index_command

            return index_command(args)
        if args.command == "search":
            from pipeline.search import search_command

            return search_command(args)
        if args.command in TOOLS:
            return importlib.import_module(TOOLS[args.command][0]).run_command(args)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except PipelineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    raise AssertionError(f"unhandled command {args.command}")


def _load(args: argparse.Namespace):
    from pipeline.jobfile import load_job

    job = load_job(args.job, inputs=args.input, output=args.output, model=args.model)
    price = getattr(args, "gpu_hour_price", None)
    if price is not None:
        if not math.isfinite(price) or price < 0:
            raise ConfigError(f"--gpu-hour-price: must be at least 0, got {price:g}")
        job = job.model_copy(update={"cost": job.cost.model_copy(update={"gpu_hour_usd": price})})
    return job


def _run(args: argparse.Namespace) -> int:
    from pipeline.lease import output_lease
    from pipeline.plan import new_run_id, plan_job

    job = _load(args)
    if args.no_progress_bars:
        job = job.model_copy(update={"ray": job.ray.model_copy(update={"progress_bars": False})})
    if args.overwrite:
        job = job.model_copy(update={"output": job.output.model_copy(update={"mode": "overwrite"})})
    # The lease first, so the plan sees the prefix as no other run is changing it.
    with output_lease(job, run_id=new_run_id(), command="run", force_unlock=args.force_unlock) as lease:
        # Every check that needs no Ray: a bad job is answered before Ray. The processor checks go on on a thread
        # while Ray starts, and the run confirms them before any work.
        plan = plan_job(job, run_id=lease.run_id, background_checks=True)
        from pipeline.runner import run_plan

        return run_plan(plan, lease=lease).exit_code


def _retry_failed(args: argparse.Namespace) -> int:
    from pipeline.plan import plan_retry_failed
    from pipeline.rows import REASONS

    unknown = sorted(set(args.reason or ()) - set(REASONS))
    if unknown:
        raise ConfigError(f"--reason: unknown error_reason {', '.join(unknown)} (known: {', '.join(REASONS)})")
    from pipeline.lease import output_lease
    from pipeline.plan import new_run_id

    job = _load(args)
    if args.no_progress_bars:
        job = job.model_copy(update={"ray": job.ray.model_copy(update={"progress_bars": False})})
    with output_lease(job, run_id=new_run_id(), command="retry-failed", force_unlock=args.force_unlock) as lease:
        reasons = frozenset(args.reason) if args.reason else None
        plan = plan_retry_failed(job, reasons, run_id=lease.run_id, background_checks=True)
        from pipeline.runner import run_plan

        return run_plan(plan, command="retry-failed", lease=lease).exit_code


def _validate(args: argparse.Namespace) -> int:
    job = _load(args)
    if args.offline:
        print(f"ok: {args.job} is a valid job spec (storage and model not checked)")
        return 0
    from pipeline.plan import plan_job

    plan = plan_job(job, read_only=True)
    print(f"ok: {args.job}")
    if plan.shards:
        first, last = plan.shards[0].url, plan.shards[-1].url
        print(f"  shards  {len(plan.shards)} to run: {first}" + (f" .. {last}" if len(plan.shards) > 1 else ""))
    if plan.skipped:
        print(f"  done    {len(plan.skipped)} shard(s) already committed (skipped unless --overwrite)")
    if plan.repaired:
        print(
            f"  repair  {len(plan.repaired)} shard(s) marked done whose file is missing or changed (a run redoes them)"
        )
    from pipeline.lease import read_lease

    try:
        holder = read_lease(plan.output)
    except Exception:  # validate answers about the job; the lease is only a hint here
        holder = None
    if holder is not None:
        print(f"  lease   held by {holder.describe()} until {holder.expires_at}: a run now would exit 2")
    print(f"  output  {job.output.url}")
    print(f"  model   {job.model.source}")
    print(f"  tasks   {', '.join(plan.tasks)}")
    if job.embed is not None:
        from pipeline.stages.embed import embedding_columns

        print(f"  embed   {', '.join(f'{column} ({model})' for column, model in embedding_columns(job).items())}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.verify import verify_command

    return verify_command(args)


def _schema(args: argparse.Namespace) -> int:
    from pipeline.docs import schema_markdown
    from pipeline.schema import schema_text

    print(schema_text() if args.json else schema_markdown(), end="" if args.json else "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
