"""`llava-pipeline verify`: audit an output prefix, changing nothing.

Checked, for every completion marker and data file under the prefix (paths from `OutputLayout`):

- the marker's data file exists, and its bytes, SHA-256, row count and key set are what the marker
  recorded (`pipeline.integrity`; markers older than those fields are checked for what they have);
- its rows are the marker's shard's, and no sample (shard, key) appears twice in a file or across files;
- the file matches the output schema of the version it declares in its Parquet metadata (columns,
  types, nullability, nulls inside lists and structs);
- no data file lacks a marker (readers would see rows no run vouches for), nothing is left under `_staging/`.

Every data file is read once (in parallel); nothing is written.
"""

from __future__ import annotations

import argparse
import json
import logging
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import ValidationError

from pipeline import integrity
from pipeline.config import RetryConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.layout import DATA_SUFFIX, OutputLayout
from pipeline.schema import METADATA_PREFIX, OutputSchema, embeddings_problems, load_schema
from pipeline.storage import resolve_storage
from pipeline.urls import check_url

log = logging.getLogger(__name__)

_PARALLEL_FILES = 8
_SCHEMA_VERSION_KEY = f"{METADATA_PREFIX}schema_version".encode()
# Kinds of finding, in the order a report lists them.
KINDS = (
    "missing",  # a marker without its data file
    "changed",  # the file is not what its marker recorded
    "schema",  # the file does not match the schema it declares
    "duplicate",  # a sample in more than one row
    "orphan",  # a data file without a marker
    "staged",  # a file left under _staging/
    "unreadable",  # a marker or data file that cannot be read or parsed
    "empty",  # nothing committed under the prefix at all
)


@dataclass(frozen=True)
class Finding:
    kind: str
    path: str  # relative to the prefix
    detail: str


@dataclass
class FileCheck:
    """What reading one data file found."""

    rows: int = 0
    schema: str | None = None  # "<name> v<version>" as the file declares it
    samples: list[tuple[str, str]] = field(default_factory=list)  # (shard, key) per row
    problems: list[tuple[str, str]] = field(default_factory=list)  # (kind, detail)


@dataclass
class Audit:
    url: str
    markers: int = 0
    files: int = 0
    rows: int = 0
    schemas: list[str] = field(default_factory=list)
    partly_checked: list[str] = field(default_factory=list)  # markers that predate recorded sizes and checksums
    lease: dict[str, str] | None = None
    findings: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.findings

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, **asdict(self)}, indent=2) + "\n"


def check_file(data: bytes, marker: dict[str, object] | None) -> FileCheck:
    """Check one data file's bytes against its marker (None: it has none) and its declared schema."""
    check = FileCheck()
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:
        check.problems.append(("unreadable", f"not a readable Parquet file ({type(exc).__name__}: {exc})"))
        return check
    check.rows = table.num_rows
    schema = _declared_schema(table.schema, check)
    if schema is not None:
        check.schema = f"{schema.name} v{schema.version}"
        check.problems.extend(("schema", problem) for problem in schema_problems(table, schema))
    if "key" in table.column_names and "shard" in table.column_names:
        keys = [str(k) for k in table.column("key").to_pylist()]
        shards = [str(s) for s in table.column("shard").to_pylist()]
        check.samples = list(zip(shards, keys))
        counts: dict[tuple[str, str], int] = defaultdict(int)
        for sample in check.samples:
            counts[sample] += 1
        twice = sorted(sample for sample, n in counts.items() if n > 1)
        if twice:
            check.problems.append(
                ("duplicate", f"{len(twice)} key(s) appear more than once in the file, e.g. {twice[0][1]!r}")
            )
        if marker is not None:
            others = sorted(set(shards) - {marker.get("shard")})
            if others:
                check.problems.append(("changed", f"rows of another shard than the marker's ({others[0]})"))
    else:
        keys = []
    if marker is not None:
        mismatches = integrity.content_mismatch(marker, integrity.Fingerprint.of(data), table.num_rows, keys)
        check.problems.extend(("changed", problem) for problem in mismatches)
    return check


def _declared_schema(schema: pa.Schema, check: FileCheck) -> OutputSchema | None:
    declared = (schema.metadata or {}).get(_SCHEMA_VERSION_KEY)
    if declared is None:
        check.problems.append(("schema", "declares no schema version (llava_pipeline.schema_version)"))
        return None
    try:
        return load_schema(int(declared))
    except (ValueError, FileNotFoundError, ModuleNotFoundError):
        check.problems.append(
            (
                "schema",
                f"declares schema version {declared.decode(errors='replace')}, which this llava-pipeline "
                "does not know (a newer release may)",
            )
        )
        return None


def schema_problems(table: pa.Table, schema: OutputSchema) -> list[str]:
    """How a table differs from a schema version: columns, types, nullability, then nulls where none may be.
    A version's optional columns (the embeddings) may be absent; those present must match their metadata."""
    problems = []
    schema = schema.for_columns(table.column_names)
    expected = schema.arrow
    missing = [name for name in expected.names if name not in table.column_names]
    extra = [name for name in table.column_names if name not in expected.names]
    if missing:
        problems.append(f"missing column(s) {', '.join(missing)} of {schema.name} v{schema.version}")
    if extra:
        problems.append(f"column(s) {', '.join(extra)} not in {schema.name} v{schema.version}")
    for wanted in expected:
        if wanted.name not in table.column_names:
            continue
        found = table.schema.field(wanted.name)
        if not found.type.equals(wanted.type):
            problems.append(
                f"column {wanted.name!r} is {found.type}, {schema.name} v{schema.version} says {wanted.type}"
            )
        elif found.nullable != wanted.nullable:
            problems.append(
                f"column {wanted.name!r} is {'' if found.nullable else 'not '}nullable, the schema says "
                f"it is {'' if wanted.nullable else 'not '}"
            )
    if not problems:
        try:
            schema.conform(table)
        except ValueError as exc:
            problems.append(str(exc))
    if schema.optional_names:
        problems.extend(embeddings_problems(table))
    return problems


def audit(layout: OutputLayout) -> Audit:
    """Check everything under the prefix; the findings, in the order a report lists them."""
    from pipeline.lease import read_lease

    report = Audit(url=layout.url)
    objects = layout.objects()
    markers = {name: rel for rel in objects if (name := layout.marker_name(rel)) is not None}
    data = {name: rel for rel in objects if (name := layout.data_name(rel)) is not None}
    findings: list[Finding] = []
    report.markers, report.files = len(markers), len(data)
    try:
        holder = read_lease(layout)
    except Exception as exc:  # the audit does not depend on it
        log.warning("could not read the lease on %s: %s", layout.url, exc)
        holder = None
    if holder is not None:
        report.lease = {"run_id": holder.run_id, "holder": holder.describe(), "expires_at": holder.expires_at}

    def read_marker(name: str) -> tuple[str, dict[str, object] | None]:
        try:
            return name, layout.read_marker(name)
        except Exception as exc:
            findings.append(Finding("unreadable", markers[name], f"cannot read the marker: {exc}"))
            return name, None

    def check(name: str) -> tuple[str, FileCheck]:
        try:
            data_bytes = layout.read_bytes(layout.data_path(name))
        except Exception as exc:
            return name, FileCheck(problems=[("unreadable", f"cannot read the file: {exc}")])
        return name, check_file(data_bytes, marker_content.get(name))

    with ThreadPoolExecutor(max_workers=_PARALLEL_FILES) as pool:
        marker_content = dict(pool.map(read_marker, sorted(markers)))
        checks = dict(pool.map(check, sorted(data)))

    first_seen: dict[tuple[str, str], str] = {}
    across: dict[tuple[str, str], list[tuple[str, str]]] = defaultdict(list)  # (file, earlier file) -> samples
    schemas = set()
    for name in sorted(data):
        result = checks[name]
        report.rows += result.rows
        if result.schema:
            schemas.add(result.schema)
        findings.extend(Finding(kind, data[name], detail) for kind, detail in result.problems)
        for sample in dict.fromkeys(result.samples):
            earlier = first_seen.setdefault(sample, data[name])
            if earlier != data[name]:
                across[(data[name], earlier)].append(sample)
    for (path, earlier), samples in sorted(across.items()):
        findings.append(
            Finding(
                "duplicate",
                path,
                f"{len(samples)} sample(s) also in {earlier}, e.g. key {samples[0][1]!r} of {samples[0][0]}",
            )
        )
    report.schemas = sorted(schemas)

    for name, rel in sorted(markers.items()):
        marker = marker_content[name]
        if name not in data:
            findings.append(
                Finding(
                    "missing",
                    f"{name}{DATA_SUFFIX}",
                    f"marked done ({rel}) but the data file is missing: a resume redoes it",
                )
            )
        elif marker is not None and not integrity.is_fully_checkable(marker):
            report.partly_checked.append(name)
    for name in sorted(set(data) - set(markers)):
        findings.append(
            Finding(
                "orphan",
                data[name],
                "no completion marker: a commit that did not finish (a resume over its shard redoes it) or a "
                "file put there by hand; readers see its rows",
            )
        )
    for rel in sorted(rel for rel in objects if layout.is_staged(rel)):
        findings.append(
            Finding("staged", rel, "left under _staging/ by a run that did not finish (the next run removes it)")
        )
    if not markers and not data:
        findings.append(Finding("empty", "", "nothing is committed under the prefix"))
    report.findings = sorted(findings, key=lambda f: (KINDS.index(f.kind), f.path))
    return report


def render(report: Audit) -> str:
    lines = [
        f"verify {report.url}: {'ok' if report.ok else f'{len(report.findings)} problem(s)'}",
        f"  markers   {report.markers}",
        f"  files     {report.files} ({report.rows} rows"
        + (f", schema {', '.join(report.schemas)}" if report.schemas else "")
        + ")",
    ]
    if report.partly_checked:
        lines.append(
            f"  note      {len(report.partly_checked)} marker(s) predate recorded sizes and checksums: only their "
            f"row count is compared, e.g. {report.partly_checked[0]}"
        )
    if report.lease:
        lines.append(
            f"  lease     held by {report.lease['holder']} until {report.lease['expires_at']}: a run is writing "
            "here, so its files in flight show up as problems"
        )
    if report.ok:
        lines.append("  checked   every marker has its file, with the size, SHA-256, rows and keys it recorded;")
        lines.append("            every file is on its schema; no key twice; no orphan or staged files")
        return "\n".join(lines)
    lines.append("problems:")
    width = max(len(f.kind) for f in report.findings)
    for finding in report.findings:
        where = f"{finding.path}: " if finding.path else ""
        lines.append(f"  {finding.kind:<{width}}  {where}{finding.detail}")
    return "\n".join(lines)


def verify_command(args: argparse.Namespace) -> int:
    layout = _layout(args)
    report = audit(layout)
    print(report.to_json() if args.json else render(report), end="" if args.json else "\n")
    return 0 if report.ok else 1


def _layout(args: argparse.Namespace) -> OutputLayout:
    storage, retries, url = StorageConfig(), RetryConfig(), args.output
    if args.job:
        from pipeline.jobfile import load_job

        job = load_job(args.job, output=args.output)
        storage, retries, url = job.storage_for("output"), job.retries, job.output.url
    if not url:
        raise ConfigError("verify: give OUTPUT_URL, or --job with an output.url")
    try:
        check_url(url)
    except ValueError as exc:
        raise ConfigError(f"OUTPUT_URL: {exc}") from None
    if args.endpoint_url:
        try:
            endpoint = StorageConfig(endpoint_url=args.endpoint_url).endpoint_url
        except ValidationError as exc:
            raise ConfigError(f"--endpoint-url: {exc.errors()[0]['msg']}") from None
        storage = storage.model_copy(update={"endpoint_url": endpoint})
    return OutputLayout(url, resolve_storage(storage), retries)
