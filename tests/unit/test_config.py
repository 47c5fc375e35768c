"""Unit tests for pipeline.config: the strict job spec, its error messages and CLI overrides."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml
from pydantic import ValidationError

from pipeline.config import JobConfig, StorageConfig
from pipeline.errors import ConfigError
from pipeline.jobfile import load_job, parse_job

MINIMAL: dict[str, Any] = {
    "name": "nightly-captions",
    "input": {"urls": ["/data/shards/shard-{00000..00009}.tar"]},
    "output": {"url": "/data/out"},
    "model": {"source": "llava-hf/llava-1.5-7b-hf"},
    "tasks": {"caption": {}},
}


def job_with(change: Callable[[dict[str, Any]], None]) -> dict[str, Any]:
    raw = copy.deepcopy(MINIMAL)
    change(raw)
    return raw


def config_error(raw: object) -> str:
    with pytest.raises(ConfigError) as info:
        parse_job(raw, source="job.yaml")
    message = str(info.value)
    assert message.startswith("job.yaml: "), message
    return message


def write_yaml(path: Path, document: object) -> Path:
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return path


# --- valid specs and defaults --------------------------------------------------------------------


def test_minimal_job_parses_with_given_values() -> None:
    job = parse_job(copy.deepcopy(MINIMAL))
    assert isinstance(job, JobConfig)
    assert job.name == "nightly-captions"
    assert job.input.urls == ["/data/shards/shard-{00000..00009}.tar"]
    assert job.output.url == "/data/out"
    assert job.model.source == "llava-hf/llava-1.5-7b-hf"
    assert job.tasks.caption is not None
    assert job.tasks.tags is None and job.tasks.vqa is None


def test_defaults_are_filled_in() -> None:
    job = parse_job(copy.deepcopy(MINIMAL))
    assert job.input.image_extensions == ["jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff"]
    assert job.input.metadata_extension == "json"
    assert job.output.compression == "zstd"
    assert (job.model.dtype, job.model.device, job.model.attn_implementation) == ("auto", "auto", "sdpa")
    assert job.model.trust_remote_code is False
    assert job.tasks.caption is not None
    assert job.tasks.caption.prompt == "Write a one-sentence caption for this image."
    assert job.tasks.caption.max_new_tokens == 64
    assert job.generation.do_sample is False and job.generation.num_beams == 1
    assert job.decode.max_image_pixels == 64_000_000
    assert job.stages.read.rows_per_block == 64
    assert job.stages.prepare.concurrency == (1, 8)
    assert job.stages.model.concurrency == 1
    assert job.stages.model.batch_size == 8
    assert job.storage == StorageConfig()
    assert job.storage_for("input") is job.storage


def test_section_storage_overrides_top_level_storage() -> None:
    job = parse_job(job_with(lambda r: r["output"].update(storage={"endpoint_url": "http://minio:9000"})))
    assert job.storage_for("output").endpoint_url == "http://minio:9000"
    assert job.storage_for("input").endpoint_url is None


def test_image_extensions_are_normalized() -> None:
    job = parse_job(job_with(lambda r: r["input"].update(image_extensions=["JPG", ".png"])))
    assert job.input.image_extensions == ["jpg", "png"]


def test_duplicate_image_extensions_after_normalization_are_rejected() -> None:
    message = config_error(job_with(lambda r: r["input"].update(image_extensions=["jpg", ".JPG"])))
    assert "input.image_extensions: duplicate extensions" in message


def test_job_is_frozen() -> None:
    job = parse_job(copy.deepcopy(MINIMAL))
    with pytest.raises(ValidationError, match="frozen"):
        job.name = "other"  # type: ignore[misc]


@pytest.mark.parametrize(
    ("value", "expected"),
    [(2, 2), ([1, 4], (1, 4)), ([3, 3], (3, 3))],
)
def test_concurrency_accepts_int_or_min_max_pair(value: object, expected: object) -> None:
    job = parse_job(job_with(lambda r: r.update(stages={"model": {"concurrency": value}})))
    assert job.stages.model.concurrency == expected


# --- error paths: every message names the field ----------------------------------------------------


def test_unknown_top_level_key_names_it_and_lists_allowed_keys() -> None:
    message = config_error(job_with(lambda r: r.update(taks={"caption": {}})))
    assert "  taks: unknown field (allowed here: name, input, output, model, tasks," in message


def test_unknown_task_key_has_dotted_path_and_hint() -> None:
    message = config_error(job_with(lambda r: r["tasks"].update(captoin={})))
    assert "  tasks.captoin: unknown field (allowed here: caption, tags, vqa)" in message


def test_unknown_stage_key_has_dotted_path_and_hint() -> None:
    message = config_error(job_with(lambda r: r.update(stages={"model": {"batchsize": 4}})))
    assert (
        "  stages.model.batchsize: unknown field (allowed here: concurrency, num_gpus, num_cpus, batch_size," in message
    )


def test_unknown_key_in_optional_storage_section_gets_hint() -> None:
    message = config_error(job_with(lambda r: r["input"].update(storage={"acces_key": "x"})))
    assert "  input.storage.acces_key: unknown field (allowed here: endpoint_url, region," in message


def test_bad_url_scheme_names_the_list_index() -> None:
    message = config_error(job_with(lambda r: r["input"].update(urls=["/data/a.tar", "ftpx://host/b.tar"])))
    assert "  input.urls[1]: unsupported URL scheme 'ftpx'" in message
    assert "input.urls[0]" not in message


@pytest.mark.parametrize("url", ["https://example.com/out", "http://example.com/out"])
def test_read_only_output_url_is_rejected(url: str) -> None:
    message = config_error(job_with(lambda r: r["output"].update(url=url)))
    assert "  output.url: " in message
    assert "is read-only" in message


def test_empty_url_list_is_rejected() -> None:
    message = config_error(job_with(lambda r: r["input"].update(urls=[])))
    assert "  input.urls: List should have at least 1 item" in message


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ([3, 1], "[min, max] = [3, 1]: max is below min"),
        (0, "must be at least 1"),
        ([0, 2], "the min of [min, max] must be at least 1"),
        ("x", "must be an integer (a fixed pool) or a [min, max] pair"),
        (True, "must be an integer (a fixed pool) or a [min, max] pair"),
        ([1.5, 2], "must be an integer (a fixed pool) or a [min, max] pair"),
        ([1, 2, 3], "must be an integer (a fixed pool) or a [min, max] pair"),
    ],
)
def test_bad_concurrency_is_rejected_with_field_path(value: object, fragment: str) -> None:
    message = config_error(job_with(lambda r: r.update(stages={"model": {"concurrency": value}})))
    assert f"  stages.model.concurrency: {fragment}" in message


def test_vqa_without_any_question_source_is_rejected() -> None:
    message = config_error(job_with(lambda r: r["tasks"].update(vqa={})))
    assert "  tasks.vqa: set `questions`, `sample_field`, or both" in message


def test_vqa_prompt_without_question_slot_is_rejected() -> None:
    message = config_error(
        job_with(lambda r: r["tasks"].update(vqa={"questions": ["Why?"], "prompt": "Answer briefly."}))
    )
    assert "  tasks.vqa.prompt: must contain {question}" in message


def test_blank_vqa_question_is_rejected() -> None:
    message = config_error(job_with(lambda r: r["tasks"].update(vqa={"questions": ["Why?", "  "]})))
    assert "  tasks.vqa.questions: questions must not be blank" in message


def test_no_task_enabled_is_rejected() -> None:
    message = config_error(job_with(lambda r: r.update(tasks={"caption": None})))
    assert "  tasks: enable at least one of caption, tags, vqa" in message


def test_sampling_knobs_without_do_sample_are_named() -> None:
    message = config_error(job_with(lambda r: r.update(generation={"temperature": 0.7, "top_k": 5})))
    assert "  generation: temperature, top_k only apply with do_sample: true" in message


def test_prepare_in_the_model_actors_takes_no_pool_settings_of_its_own() -> None:
    job = parse_job(job_with(lambda r: r.update(stages={"prepare": {"in_model_actors": True}})))
    assert job.stages.prepare.in_model_actors and job.stages.prepare.min_cpus == 0
    message = config_error(
        job_with(lambda r: r.update(stages={"prepare": {"in_model_actors": True, "concurrency": 2, "num_cpus": 2}}))
    )
    assert "  stages.prepare: concurrency, num_cpus cannot be set with in_model_actors: true" in message


def test_sampling_knobs_with_do_sample_are_accepted() -> None:
    job = parse_job(job_with(lambda r: r.update(generation={"do_sample": True, "temperature": 0.7, "top_p": 0.9})))
    assert (job.generation.temperature, job.generation.top_p) == (0.7, 0.9)


@pytest.mark.parametrize("section", ["storage", "input.storage", "model.storage"])
def test_access_key_without_secret_is_rejected(section: str) -> None:
    def change(raw: dict[str, Any]) -> None:
        target = raw
        *parents, last = section.split(".")
        for parent in parents:
            target = target[parent]
        target[last] = {"access_key_id": "AKIAEXAMPLE"}

    message = config_error(job_with(change))
    assert f"  {section}: access_key_id and secret_access_key must be set together" in message
    assert "AKIAEXAMPLE" not in message


@pytest.mark.parametrize("name", ["-leading-dash", "has space", "", "x" * 129, "slash/name"])
def test_bad_job_name_is_rejected(name: str) -> None:
    message = config_error(job_with(lambda r: r.update(name=name)))
    assert "  name: String should match pattern" in message


def test_missing_required_section_is_named() -> None:
    message = config_error(job_with(lambda r: r.pop("model")))
    assert "  model: required field is missing" in message


def test_several_errors_are_all_reported() -> None:
    message = config_error(job_with(lambda r: (r.update(name="bad name"), r["tasks"].update(captoin={}))))
    assert "  name: " in message and "  tasks.captoin: " in message


@pytest.mark.parametrize(("document", "kind"), [(["a", "b"], "list"), ("just text", "str"), (None, "NoneType")])
def test_not_a_mapping_is_rejected(document: object, kind: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_job(document, source="job.yaml")
    assert str(info.value) == f"job.yaml: a job spec is a YAML mapping at the top level, got {kind}"


def test_config_error_exit_code_is_2() -> None:
    with pytest.raises(ConfigError) as info:
        parse_job([])
    assert info.value.exit_code == 2


# --- load_job: files and overrides ------------------------------------------------------------------


def test_load_job_reads_yaml_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "job.yaml", MINIMAL)
    assert load_job(path) == parse_job(copy.deepcopy(MINIMAL))


def test_load_job_not_a_mapping_names_the_file(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "job.yaml", ["a", "b"])
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value) == f"{path}: a job spec is a YAML mapping at the top level, got list"


def test_load_job_invalid_yaml(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("name: [unclosed\ninput: {\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value).startswith(f"{path}: not valid YAML: ")


def test_load_job_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value).startswith(f"cannot read job spec {path}: ")
    assert "No such file" in str(info.value)


def test_load_job_validation_error_names_the_file_and_field(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "job.yaml", job_with(lambda r: r["tasks"].update(captoin={})))
    with pytest.raises(ConfigError) as info:
        load_job(path)
    assert str(info.value).startswith(f"{path}: invalid job spec")
    assert "tasks.captoin: unknown field" in str(info.value)


def test_cli_overrides_replace_fields(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "job.yaml", MINIMAL)
    job = load_job(path, inputs=["/other/a.tar", "/other/b.tar"], output="/elsewhere", model="/models/tiny")
    assert job.input.urls == ["/other/a.tar", "/other/b.tar"]
    assert job.output.url == "/elsewhere"
    assert job.model.source == "/models/tiny"
    # Fields next to the overridden ones are kept.
    assert job.tasks == parse_job(copy.deepcopy(MINIMAL)).tasks


def test_cli_overrides_keep_other_keys_in_the_section(tmp_path: Path) -> None:
    raw = job_with(lambda r: (r["output"].update(compression="snappy"), r["model"].update(dtype="float32")))
    path = write_yaml(tmp_path / "job.yaml", raw)
    job = load_job(path, output="/elsewhere", model="/models/tiny")
    assert (job.output.url, job.output.compression) == ("/elsewhere", "snappy")
    assert (job.model.source, job.model.dtype) == ("/models/tiny", "float32")


def test_cli_overrides_fill_sections_missing_from_yaml(tmp_path: Path) -> None:
    raw = {"name": "j", "tasks": {"caption": {}}}
    path = write_yaml(tmp_path / "job.yaml", raw)
    job = load_job(path, inputs=["/in/x.tar"], output="/out", model="org/model")
    assert job.input.urls == ["/in/x.tar"]
    assert job.output.url == "/out"
    assert job.model.source == "org/model"


def test_cli_overrides_are_validated_like_yaml(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "job.yaml", MINIMAL)
    with pytest.raises(ConfigError) as info:
        load_job(path, output="https://example.com/out")
    assert "  output.url: https:// is read-only" in str(info.value)


def test_without_overrides_the_section_is_still_required(tmp_path: Path) -> None:
    path = write_yaml(tmp_path / "job.yaml", {"name": "j", "tasks": {"caption": {}}})
    with pytest.raises(ConfigError) as info:
        load_job(path)
    message = str(info.value)
    assert "  input: required field is missing" in message
    assert "  output: required field is missing" in message
    assert "  model: required field is missing" in message


# --- secrets ------------------------------------------------------------------------------------------

SECRETS = {
    "access_key_id": "AKIAEXAMPLEKEY",
    "secret_access_key": "s3cr3t-VALUE-xyz",
    "session_token": "tok-SECRET-123",
}


def test_secrets_are_hidden_in_repr_str_and_json() -> None:
    job = parse_job(job_with(lambda r: r.update(storage=dict(SECRETS))))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # see test_model_dump_json_of_a_min_max_pool_emits_no_warnings
        dumped = job.model_dump_json()
    for text in (repr(job), str(job), dumped, repr(job.storage), str(job.storage)):
        for secret in SECRETS.values():
            assert secret not in text
    assert '"secret_access_key":"**********"' in dumped
    # The values are still there for the code that needs them.
    assert job.storage.secret_access_key is not None
    assert job.storage.secret_access_key.get_secret_value() == "s3cr3t-VALUE-xyz"


def test_secrets_in_a_section_storage_are_hidden() -> None:
    job = parse_job(job_with(lambda r: r["output"].update(storage=dict(SECRETS))))
    assert all(secret not in repr(job) and secret not in str(job) for secret in SECRETS.values())


def test_rejected_secret_value_is_not_echoed() -> None:
    message = config_error(
        job_with(lambda r: r.update(storage={"access_key_id": "AKIA", "secret_access_key": 987654321}))
    )
    assert "storage.secret_access_key" in message
    assert "987654321" not in message


def test_bad_storage_option_value_is_reported_at_the_option_path() -> None:
    message = config_error(job_with(lambda r: r.update(storage={"options": {"k": [1, 2]}})))
    assert "storage.options.k" in message
    assert ".str:" not in message and ".float:" not in message and ".bool:" not in message


def test_model_dump_json_of_a_min_max_pool_emits_no_warnings() -> None:
    job = parse_job(copy.deepcopy(MINIMAL))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dumped = job.model_dump_json()
    assert '"concurrency":[1,8]' in dumped
