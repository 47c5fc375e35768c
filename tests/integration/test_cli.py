"""The console script as users run it: exit codes, messages and overrides.

Commands run in-process (`support.run_cli`) unless the test is about the installed script itself;
a bad job must be answered before the runner is imported, which the in-process runner enforces.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import CliResult, base_job, run_cli, upload

from pipeline.testing.s3_server import free_port
from pipeline.testing.shards import write_shards

SCRIPT = str(Path(sys.executable).parent / "llava-pipeline")


def assert_stopped_before_ray(result: CliResult, *fragments: str) -> None:
    assert result.exit_code == 2, result.stderr
    assert result.stderr.startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_installed_script_lists_commands_and_overrides():
    top = subprocess.run([SCRIPT, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0
    for command in ("run", "validate", "demo", "schema"):
        assert command in top.stdout


def test_run_help_lists_overrides_and_exit_codes(capsys):
    run = run_cli(capsys, "run", "--help")
    assert run.exit_code == 0
    for option in ("--input", "--output", "--model", "exit codes"):
        assert option in run.stdout


def test_unknown_key_exits_2_naming_the_field(capsys, tmp_path, s3, bucket, tiny_model, write_job):
    job = base_job(bucket, tiny_model)
    job["tasks"] = {"captoin": {}}
    result = run_cli(capsys, "run", str(write_job(job)), runner_importable=False)
    assert_stopped_before_ray(result, "tasks.captoin: unknown field", "allowed here: caption, tags, vqa")


def test_bad_url_scheme_exits_2(capsys, s3, bucket, tiny_model, write_job):
    job = base_job(bucket, tiny_model, input={"urls": ["ftps-nope://host/shard.tar"]})
    result = run_cli(capsys, "run", str(write_job(job)), runner_importable=False)
    assert_stopped_before_ray(result, "input.urls[0]: unsupported URL scheme 'ftps-nope'")


def test_missing_shards_exit_2_showing_the_pattern(capsys, s3, bucket, tiny_model, write_job):
    pattern = f"s3://{bucket}/nothing-here/shard-{{000..009}}.tar"
    result = run_cli(
        capsys, "run", str(write_job(base_job(bucket, tiny_model, input={"urls": [pattern]}))), runner_importable=False
    )
    assert_stopped_before_ray(result, "10 of 10 shard(s) do not exist", f"s3://{bucket}/nothing-here/shard-000.tar")

    glob = f"s3://{bucket}/nothing-here/*.tar"
    result = run_cli(
        capsys, "run", str(write_job(base_job(bucket, tiny_model, input={"urls": [glob]}))), runner_importable=False
    )
    assert_stopped_before_ray(result, f"no shards match {glob!r}")


def test_unreachable_endpoint_exits_2(capsys, s3, bucket, tiny_model, write_job):
    dead = f"http://127.0.0.1:{free_port()}"
    # One attempt: the answer is the same after retries, only later (the retry policy has its own tests).
    job = base_job(bucket, tiny_model, storage={"endpoint_url": dead}, retries={"attempts": 1})
    result = run_cli(capsys, "run", str(write_job(job)), runner_importable=False)
    assert_stopped_before_ray(result, "cannot reach the storage endpoint", dead)


def test_missing_model_exits_2(capsys, s3, bucket, tmp_path, write_job):
    write_shards(tmp_path, shards=1, samples_per_shard=1)
    upload(s3, tmp_path / "shard-00000.tar", f"{bucket}/shards/shard-00000.tar")
    result = run_cli(
        capsys, "run", str(write_job(base_job(bucket, tmp_path / "no-such-model"))), runner_importable=False
    )
    assert_stopped_before_ray(result, "model.source:", "no-such-model")


def test_chat_template_without_the_image_stops_the_run_before_any_work(
    capsys, s3, ray_address, bucket, tiny_model, tmp_path, write_job
):
    """The processor checks run beside Ray's start (`Plan.confirm_checks`); a failing one still stops the run
    before any stage starts or anything is written."""
    write_shards(tmp_path, shards=1, samples_per_shard=1)
    upload(s3, tmp_path / "shard-00000.tar", f"{bucket}/shards/shard-00000.tar")
    text_only = (
        "{% for message in messages %}{% for part in message['content'] %}"
        "{% if part['type'] == 'text' %}USER: {{ part['text'] }}{% endif %}{% endfor %}{% endfor %} ASSISTANT:"
    )
    job = base_job(bucket, tiny_model, model={"source": str(tiny_model), "device": "cpu", "chat_template": text_only})
    result = run_cli(capsys, "run", str(write_job(job)))
    assert_stopped_before_ray(result, "model: the chat template placed 0 image tokens")
    assert not s3.filesystem().find(f"{bucket}/out"), "nothing is written, the lease included"


def test_missing_output_bucket_exits_2(capsys, s3, bucket, tiny_model, tmp_path, write_job):
    write_shards(tmp_path, shards=1, samples_per_shard=1)
    upload(s3, tmp_path / "shard-00000.tar", f"{bucket}/shards/shard-00000.tar")
    job = base_job(bucket, tiny_model, output={"url": "s3://no-such-bucket-here/out/"})
    result = run_cli(capsys, "run", str(write_job(job)), runner_importable=False)
    assert_stopped_before_ray(result, "output.url: cannot write under s3://no-such-bucket-here/out/")


def test_validate_checks_without_writing(capsys, s3, bucket, tiny_model, tmp_path, write_job):
    write_shards(tmp_path, shards=2, samples_per_shard=1)
    for name in ("shard-00000.tar", "shard-00001.tar"):
        upload(s3, tmp_path / name, f"{bucket}/shards/{name}")
    result = run_cli(capsys, "validate", str(write_job(base_job(bucket, tiny_model))), runner_importable=False)
    assert result.exit_code == 0, result.stderr
    assert "shards  2 to run:" in result.stdout and "tasks   caption" in result.stdout
    assert not s3.filesystem().exists(f"{bucket}/out")


def test_schema_command_documents_every_column(capsys):
    result = run_cli(capsys, "schema")
    assert result.exit_code == 0
    from pipeline.schema import load_schema

    for column in load_schema().columns:
        assert f"| `{column.name}` |" in result.stdout


@pytest.mark.parametrize(
    "spec", sorted(Path(__file__).parents[2].joinpath("jobs").glob("*.yaml")), ids=lambda p: p.name
)
def test_shipped_job_specs_are_valid(capsys, spec):
    result = run_cli(capsys, "validate", "--offline", str(spec))
    assert result.exit_code == 0, result.stderr
