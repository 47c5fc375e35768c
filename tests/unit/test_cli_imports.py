"""The CLI is wiring: core commands load no tools, no test fixtures, and `validate --offline` no Ray or torch.

Each check runs in a fresh interpreter, so modules other tests imported cannot hide an import."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.cli import TOOLS

OFF_THE_RUN_PATH = ("pipeline.tools", "pipeline.testing")
DEMO_JOB = Path(__file__).resolve().parents[2] / "jobs" / "demo.yaml"


def _run_fresh(script: str) -> tuple[str, list[str]]:
    """Run `script` (which may call `main`) in a new interpreter: its output, and the modules loaded by the end."""
    program = (
        "import json, sys\n"
        "from pipeline.cli import main\n"
        f"{script}\n"
        "print('MODULES ' + json.dumps(sorted(sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    output, _, modules = done.stdout.rpartition("MODULES ")
    return output, json.loads(modules)


def _modules_after(script: str) -> list[str]:
    return _run_fresh(script)[1]


def _loaded(modules: list[str], *roots: str) -> list[str]:
    return [m for m in modules if any(m == root or m.startswith(root + ".") for root in roots)]


def _job(tmp_path: Path, **extra: object) -> Path:
    """The shipped demo job (kept valid by the CLI tests), plus `extra` top-level keys."""
    job = {**yaml.safe_load(DEMO_JOB.read_text()), **extra}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_validate_offline_and_verify_load_no_tools_fixtures_ray_or_torch(tmp_path):
    job = _job(tmp_path)
    # verify: an empty prefix is a finding (exit 1), so the audit ran through, on pyarrow and the store alone.
    modules = _modules_after(
        f"assert main(['validate', '--offline', {str(job)!r}]) == 0\n"
        f"assert main(['verify', {str(tmp_path / 'out')!r}]) == 1"
    )
    assert "pipeline.cli" in modules and "pipeline.config" in modules
    assert _loaded(modules, *OFF_THE_RUN_PATH, "ray", "torch") == []


def test_core_commands_load_no_tools_or_fixtures(tmp_path):
    # An unknown key stops run and retry-failed at the job spec (exit 2), after their code paths have loaded.
    bad = _job(tmp_path, unknown_key=1)
    script = f"assert main(['run', {str(bad)!r}]) == 2\nassert main(['retry-failed', {str(bad)!r}]) == 2"
    _, modules = _run_fresh(script + "\nassert main(['schema']) == 0")
    assert _loaded(modules, *OFF_THE_RUN_PATH) == []


def test_top_level_help_lists_every_command_without_importing_tools():
    output, modules = _run_fresh(
        "try:\n    main(['--help'])\nexcept SystemExit as exit:\n    assert exit.code == 0, exit.code"
    )
    help_text = " ".join(output.split())
    for command in ("run", "retry-failed", "validate", "verify", "schema", *TOOLS):
        assert f" {command} " in help_text, command
    for _, help_line in TOOLS.values():
        assert help_line in help_text
    assert _loaded(modules, *OFF_THE_RUN_PATH) == []


def test_run_answers_missing_shards_before_loading_ray_or_torch(tmp_path):
    """Planning (shards, output, model) comes before Ray and torch, so a job that cannot run fails fast."""
    job = {**yaml.safe_load(DEMO_JOB.read_text())}
    job["input"] = {"urls": [str(tmp_path / "nowhere" / "shard-*.tar")]}
    job["output"] = {"url": str(tmp_path / "out")}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    script = f"""
import contextlib, io
err = io.StringIO()
with contextlib.redirect_stderr(err):
    code = main(['run', {str(path)!r}])
assert code == 2, code
print(err.getvalue())
"""
    output, modules = _run_fresh(script)
    assert "shard-*.tar" in output and "input.urls" in output
    assert _loaded(modules, "ray", "torch", "transformers", *OFF_THE_RUN_PATH) == []


def test_a_run_checks_its_processors_in_another_process_so_the_driver_never_loads_torch(tmp_path):
    """`plan_job(background_checks=True)` (what `run` does) loads the processors, LLaVA's and CLIP's, in a process
    of its own: the driver stays free of transformers and torch (their memory, their seconds of teardown). A
    second plan of the same job on this node finds both checks passed before and starts no process."""
    from pipeline.testing.shards import write_shards

    models = Path(__file__).resolve().parents[2] / "models"
    write_shards(tmp_path / "shards", shards=1, samples_per_shard=1)
    cache = str(tmp_path / "node-cache")
    job = {
        "name": "checks",
        "input": {"urls": [str(tmp_path / "shards" / "shard-00000.tar")]},
        "output": {"url": str(tmp_path / "out")},
        "model": {"source": str(models / "tiny-llava-shapes"), "device": "cpu", "cache_dir": cache},
        "tasks": {"caption": {}, "vqa": {"questions": ["What colour is the background?"]}},
        "embed": {"image_text_model": {"source": str(models / "tiny-clip-shapes"), "device": "cpu"}},
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job))
    script = f"""
from pipeline.jobfile import load_job
from pipeline.plan import plan_job
plan = plan_job(load_job({str(path)!r}), background_checks=True)
started = plan.pending_checks.process is not None
plan.confirm_checks()
print('CHECKED', started, plan.pending_checks.as_summary())
"""
    output, modules = _run_fresh(script)
    assert "CHECKED True {'ran': 2, 'remembered': 0}" in output
    assert "pipeline.inputs" in modules  # the driver named the checks ...
    assert _loaded(modules, "torch", "transformers") == []  # ... which ran elsewhere
    assert len(list((tmp_path / "node-cache" / "checks").glob("*.passed"))) == 2

    output, modules = _run_fresh(script)
    assert "CHECKED False {'ran': 0, 'remembered': 2}" in output
    assert _loaded(modules, "torch", "transformers") == []
