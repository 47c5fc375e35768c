"""The plan's processor checks: run in a process of their own, and remembered per node once passed.

The checks here are standard-library calls, so each process costs an interpreter's start and not transformers'
imports; the real checks' way through a plan is in test_cli_imports."""

from __future__ import annotations

import functools
import importlib
import json
import os
import time
from pathlib import Path

import pytest

from pipeline.config import ModelConfig
from pipeline.errors import PipelineError
from pipeline.inputs import render_every_prompt
from pipeline.processor_checks import CheckMemory, run_here, start


def checkpoint_files(root: Path) -> Path:
    root.mkdir()
    (root / "config.json").write_text('{"model_type": "llava"}')
    (root / "chat_template.jinja").write_text("{{ messages }}")
    (root / "model.safetensors").write_bytes(b"weights")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main")
    return root


def test_a_passed_check_is_not_run_again_until_a_file_it_reads_changes(tmp_path: Path) -> None:
    checkpoint = checkpoint_files(tmp_path / "checkpoint")
    memory = CheckMemory(tmp_path / "checks")
    check = functools.partial(os.listdir, str(checkpoint))

    first = start([check], memory)
    assert first.process is not None
    first.result()
    assert first.as_summary() == {"ran": 1, "remembered": 0}

    again = start([check], memory)
    assert again.process is None  # nothing started
    again.result()
    assert again.as_summary() == {"ran": 0, "remembered": 1}

    # Weights and hidden files are not what a processor check reads.
    (checkpoint / "model.safetensors").write_bytes(b"other weights")
    (checkpoint / ".git" / "HEAD").write_text("ref: refs/heads/other")
    assert start([check], memory).as_summary() == {"ran": 0, "remembered": 1}

    (checkpoint / "chat_template.jinja").write_text("{{ messages }}!")
    changed = start([check], memory)
    assert changed.process is not None
    changed.result()
    assert changed.as_summary() == {"ran": 1, "remembered": 0}


def test_a_failed_check_is_never_remembered_and_its_error_stays(tmp_path: Path) -> None:
    memory = CheckMemory(tmp_path / "checks")
    check = functools.partial(json.loads, "{not json")
    for _ in range(2):
        running = start([check], memory)
        assert running.process is not None
        for _ in range(2):  # asking twice gives the same answer
            with pytest.raises(PipelineError, match="JSONDecodeError"):
                running.result()
    assert not (tmp_path / "checks").exists()


def test_a_check_given_what_cannot_be_described_always_runs(tmp_path: Path) -> None:
    memory = CheckMemory(tmp_path / "checks")
    calls: list[object] = []
    for check in (lambda: calls.append("lambda"), functools.partial(calls.append, object())):
        assert memory.key(check) is None
        run_here([check], memory)
        run_here([check], memory)
    assert len(calls) == 4


def test_the_key_follows_the_template_the_prompts_and_the_processor_files(tmp_path: Path) -> None:
    checkpoint = checkpoint_files(tmp_path / "checkpoint")
    memory = CheckMemory(tmp_path / "checks")
    config = ModelConfig(source=str(checkpoint))

    def key(config=config, instructions=("Describe the image.",)) -> str | None:
        return memory.key(functools.partial(render_every_prompt, str(checkpoint), config, list(instructions)))

    assert key() == key() is not None
    assert key(instructions=("What shape is it?",)) != key()
    assert key(config=config.model_copy(update={"chat_template": "{{ x }}"})) != key()
    (checkpoint / "model-00002.safetensors").write_bytes(b"more weights")
    unchanged = key()
    (checkpoint / "tokenizer.json").write_text("{}")
    assert key() != unchanged


def record_call(path: str) -> None:
    with open(path, "a") as handle:
        handle.write("ran\n")


def test_a_memory_that_cannot_be_written_only_means_checking_again(tmp_path: Path, caplog) -> None:
    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    memory = CheckMemory(blocked / "checks")
    calls = tmp_path / "calls.txt"
    check = functools.partial(record_call, str(calls))
    assert memory.key(check) is not None
    run_here([check], memory)
    run_here([check], memory)
    assert calls.read_text() == "ran\nran\n"
    assert "could not remember a passed processor check" in caplog.text


def test_checks_a_run_never_confirmed_are_stopped_not_left_behind(tmp_path: Path) -> None:
    """A run that ends before it confirms its checks (the cluster does not fit, Ctrl-C) stops their process."""
    memory = CheckMemory(tmp_path / "checks")
    running = start([functools.partial(time.sleep, 60)], memory)
    process = running.process
    assert process is not None and process.poll() is None
    started = time.monotonic()
    running.abandon()
    assert process.poll() is not None and time.monotonic() - started < 30
    assert running.process is None and not list(memory.directory.glob("*.passed"))
    running.abandon()  # nothing left to stop


def test_checks_run_with_torch_marked_absent_and_only_a_failure_runs_them_again_with_torch() -> None:
    """transformers imports torch whenever it is installed, though loading processors needs none of it: the checks
    run first with torch marked absent. A check that fails there (a processor that needs torch) decides in a
    second process where torch imports."""
    torch_absent = functools.partial(exec, "import importlib.util\nassert importlib.util.find_spec('torch') is None")
    start([torch_absent]).result()  # it would fail wherever torch can be found

    needs_torch = functools.partial(importlib.import_module, "torch")
    start([needs_torch]).result()  # fails without torch, passes with it

    with pytest.raises(PipelineError, match="ValueError: bad either way"):
        start([functools.partial(exec, "raise ValueError('bad either way')")]).result()
