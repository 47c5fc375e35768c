"""Watching a run: live metrics scraped from the session Ray's Prometheus endpoint, the token and cost lines,
and the HTML run report rendered in headless Chromium. One run serves every test here."""

from __future__ import annotations

import io
import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from contextlib import redirect_stderr, redirect_stdout
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families
from support import CliResult, base_job, read_output, upload

from pipeline.cli import main
from pipeline.report import rate_series
from pipeline.testing.shards import synthetic_samples, write_shard

SHARDS, PER_SHARD = 2, 4
PRICE = 2.5
# Watching goes on this long after the run returned: an actor the pool let go waits for its last export.
AFTER_THE_RUN_SECONDS = 5.0
CHROMIUM = "/usr/bin/chromium"


@pytest.fixture(scope="module")
def observed_run(s3, ray_address, metrics_port, tiny_model, tmp_path_factory):
    """One run with a failing sample, scraped every half second while it runs."""
    bucket = "observe"
    s3.create_bucket(bucket)
    local = tmp_path_factory.mktemp("observe-shards")
    for index in range(SHARDS):
        samples = synthetic_samples(PER_SHARD, seed=40 + index, key_prefix=f"o{index}")
        if index == 0:
            samples[1]["jpg"] = b""  # an empty image member: a decode failure with its own reason
        write_shard(local / f"shard-{index:05d}.tar", samples)
        upload(s3, local / f"shard-{index:05d}.tar", f"{bucket}/shards/shard-{index:05d}.tar")
    job = base_job(
        bucket,
        tiny_model,
        name="observed",
        tasks={"caption": {"max_new_tokens": 4}, "vqa": {"questions": ["Is it red?"], "max_new_tokens": 3}},
        failures={"max_failed_sample_fraction": 0.5},
    )
    job_path = tmp_path_factory.mktemp("observe-job") / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))

    url = f"http://127.0.0.1:{metrics_port}/metrics"
    snapshots: list[tuple[float, dict]] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            snapshots.append((time.monotonic(), _scrape(url, "observed")))
            stop.wait(0.5)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        out, err = io.StringIO(), io.StringIO()
        with redirect_stdout(out), redirect_stderr(err):  # the CLI in-process, as run_cli runs it
            exit_code = main(["run", str(job_path), "--gpu-hour-price", str(PRICE)])
        result = CliResult(exit_code, out.getvalue(), err.getvalue())
        ended = time.monotonic()
        # The pools let their actors go as the run ends; each lives on until its last export (settle), so
        # an actor whose only batches came at the very end is still seen alive for a moment after the run.
        while time.monotonic() < ended + AFTER_THE_RUN_SECONDS and not _both_pools_seen(snapshots):
            stop.wait(0.25)
    finally:
        stop.set()
        watcher.join()
    fs = s3.filesystem()
    [summary_path] = fs.glob(f"{bucket}/out/_runs/*.json")
    summary = json.loads(fs.cat_file(summary_path))
    return {
        "result": result,
        "summary": summary,
        "report": fs.cat_file(summary_path.replace(".json", ".html")).decode(),
        "table": read_output(s3, f"s3://{bucket}/out/"),
        "during": [m for at, m in snapshots if m and at < ended],
        "around": [m for _, m in snapshots if m],
        "url": url,
    }


def _both_pools_seen(snapshots: list[tuple[float, dict]]) -> bool:
    return all(
        any(_value(m, "ray_llava_pipeline_actors_alive", stage=stage) for _, m in list(snapshots))
        for stage in ("model", "prepare")
    )


def _scrape(url: str, job: str) -> dict[tuple[str, tuple], float]:
    """Every llava_pipeline sample of one job, summed over Ray's per-worker labels: {(name, labels): value}."""
    try:
        text = urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return {}
    found: dict[tuple[str, tuple], float] = Counter()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if "llava_pipeline_" not in sample.name or sample.labels.get("job") != job:
                continue
            labels = tuple(
                sorted(
                    (k, v) for k, v in sample.labels.items() if k in ("run", "stage", "reason", "task", "status", "le")
                )
            )
            found[(sample.name, labels)] += sample.value
    return dict(found)


def _value(metrics: dict, name: str, **labels: str) -> float:
    """The sum over series of `name` whose labels include `labels`."""
    want = set(labels.items())
    return sum(v for (n, found), v in metrics.items() if n == name and want <= set(found))


def _settled(url: str, expected: dict[tuple[str, tuple[tuple[str, str], ...]], float]) -> dict:
    """What the endpoint says of `expected` once every process's last export arrived (each exports every
    metrics_report_interval_ms, on its own clock), or after 20 s."""
    deadline = time.monotonic() + 20
    while True:
        metrics = _scrape(url, "observed")
        found = {key: _value(metrics, key[0], **dict(key[1])) for key in expected}
        if found == expected or time.monotonic() > deadline:
            return found
        time.sleep(0.5)


def test_run_completes_with_a_failed_sample(observed_run):
    summary = observed_run["summary"]
    assert observed_run["result"].exit_code == 0, observed_run["result"].stderr
    assert summary["status"] == "completed"
    assert summary["samples"]["read"] == SHARDS * PER_SHARD
    assert summary["samples"]["failed"] == 1


def test_metrics_endpoint_counts_every_sample_by_stage_and_reason(observed_run):
    summary = observed_run["summary"]
    run = summary["run_id"]
    total = summary["samples"]["read"]
    [(reason, failed)] = summary["samples"]["failed_by_reason"].items()
    expected = {}
    for stage in ("read", "prepare", "model", "parse"):
        expected[("ray_llava_pipeline_samples_in_total", (("run", run), ("stage", stage)))] = total
        expected[("ray_llava_pipeline_samples_out_total", (("run", run), ("stage", stage)))] = total
    expected[("ray_llava_pipeline_failures_total", (("run", run), ("stage", "prepare"), ("reason", reason)))] = failed
    expected[("ray_llava_pipeline_failures_total", (("run", run),))] = failed
    expected[("ray_llava_pipeline_committed_samples_total", (("run", run),))] = total
    expected[("ray_llava_pipeline_committed_failures_total", (("run", run), ("reason", reason)))] = failed
    expected[("ray_llava_pipeline_committed_shards_total", (("run", run), ("status", "ok")))] = SHARDS
    # The tokens the model counted live are the tokens the rows carry, which the summary totals.
    for task, counts in summary["tokens"]["by_task"].items():
        expected[("ray_llava_pipeline_prompt_tokens_total", (("run", run), ("task", task)))] = counts["prompt"]
        expected[("ray_llava_pipeline_generated_tokens_total", (("run", run), ("task", task)))] = counts["generated"]
    # One latency observation per model call: as many as the calls the rows tell apart (one stamp per call).
    expected[("ray_llava_pipeline_batch_seconds_count", (("run", run), ("stage", "model")))] = summary["steady_state"][
        "model_calls"
    ]

    assert _settled(observed_run["url"], expected) == expected

    metrics = _scrape(observed_run["url"], "observed")
    assert _value(metrics, "ray_llava_pipeline_images_per_second", run=run) > 0  # the driver's last figure


def test_metrics_were_live_during_the_run(observed_run):
    """Scraped while the run was going: samples counted before the driver had them all, and the actors alive
    (seen until they exit, which with 8 samples is moments after their first batch)."""
    run = observed_run["summary"]["run_id"]
    total = observed_run["summary"]["samples"]["read"]
    during = observed_run["during"]
    assert during, "the endpoint answered nothing during the run"
    for stage in ("model", "prepare"):  # each pool has one actor (stages.*.concurrency: 1)
        alive = [_value(m, "ray_llava_pipeline_actors_alive", run=run, stage=stage) for m in observed_run["around"]]
        assert max(alive) == 1, (stage, alive)
    read = [_value(m, "ray_llava_pipeline_samples_out_total", run=run, stage="read") for m in during]
    committed = [_value(m, "ray_llava_pipeline_committed_samples_total", run=run) for m in during]
    assert any(r > 0 and c < total for r, c in zip(read, committed)), list(zip(read, committed))
    assert committed == sorted(committed)


def test_rows_carry_token_counts_and_the_summary_totals_them(observed_run):
    table, summary = observed_run["table"], observed_run["summary"]
    answered = table.filter(pc.is_null(table.column("error")))
    failed = table.filter(pc.is_valid(table.column("error")))
    assert failed.column("task_tokens").null_count == failed.num_rows == 1
    by_task: dict[str, Counter] = {}
    for row in answered.to_pylist():
        assert [t["task"] for t in row["task_tokens"]] == ["caption", "vqa"]
        for entry, limit in zip(row["task_tokens"], (4, 3)):
            assert entry["prompt_tokens"] > 0 and 1 <= entry["generated_tokens"] <= limit
            by_task.setdefault(entry["task"], Counter()).update(
                {"prompt": entry["prompt_tokens"], "generated": entry["generated_tokens"]}
            )
        assert row["prompt_tokens"] == sum(t["prompt_tokens"] for t in row["task_tokens"])
        assert row["generated_tokens"] == sum(t["generated_tokens"] for t in row["task_tokens"])
    tokens = summary["tokens"]
    assert tokens["by_task"] == {task: dict(counts) for task, counts in by_task.items()}
    assert tokens["prompt"] == pc.sum(table.column("prompt_tokens")).as_py()
    assert tokens["generated"] == pc.sum(table.column("generated_tokens")).as_py()


def test_cost_is_model_actor_time_at_the_given_price(observed_run):
    cost, summary = observed_run["summary"]["cost"], observed_run["summary"]
    samples = summary["samples"]["read"]
    assert cost["model_actors"] == 1
    assert 0 < cost["model_busy_seconds"] <= cost["model_actor_seconds"] < summary["wall_seconds"]
    assert cost["gpu_seconds"] is None and cost["billed_unit"] == "model-actor-hour"  # num_gpus 0 in the test
    assert cost["model_actor_seconds_per_1000_images"] == pytest.approx(
        cost["model_actor_seconds"] / samples * 1000, rel=1e-3
    )
    assert cost["gpu_hour_usd"] == PRICE
    assert cost["run_usd"] == pytest.approx(cost["model_actor_seconds"] / 3600 * PRICE, abs=1e-6)
    assert cost["per_million_images_usd"] == pytest.approx(cost["run_usd"] / samples * 1e6, rel=1e-3)

    printed = observed_run["result"].stdout
    assert (
        f"  tokens    {summary['tokens']['prompt']:,} prompt, {summary['tokens']['generated']:,} generated" in printed
    )
    assert re.search(r"^  model     1 actor\(s\), [\d.,]+ model-actor-seconds .*per 1,000 images$", printed, re.M)
    assert f"  cost      ${cost['run_usd']:,.4f} this run at ${PRICE:g}/model-actor-hour" in printed
    assert f"${cost['per_million_images_usd']:,.2f} per million images" in printed
    assert f"  report    {summary['report_url']}" in printed


class _Figures(HTMLParser):
    """The bars and points of each figure, and the summary table, as a browser's DOM has them."""

    def __init__(self) -> None:
        super().__init__()
        self.figure: str | None = None
        self.bars: dict[str, list[tuple[str, float]]] = {}
        self.points: list[float] = []
        self.table: dict[str, str] = {}
        self.average: float | None = None
        self._row: str | None = None
        self._cell = False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self.figure = attrs["data-figure"]
            self.bars[self.figure] = []
        elif tag == "g" and attrs.get("class") == "bar":
            self.bars[self.figure].append((attrs["data-label"], float(attrs["data-value"])))
        elif tag == "circle" and attrs.get("class") == "point":
            self.points.append(float(attrs["data-value"]))
        elif tag == "line" and attrs.get("class") == "average":
            self.average = float(attrs["data-value"])
        elif tag == "tr" and "data-key" in attrs:
            self._row = attrs["data-key"]
        elif tag == "td" and self._row:
            self._cell = True

    def handle_endtag(self, tag):
        if tag == "td":
            self._cell, self._row = False, None

    def handle_data(self, data):
        if self._cell and self._row:
            self.table[self._row] = self.table.get(self._row, "") + data


def _chromium(*args: str) -> subprocess.CompletedProcess:
    assert Path(CHROMIUM).exists(), "Chromium is missing: scripts/setup.sh installs it (apt-get install chromium)"
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", *args],
        capture_output=True,
        text=True,
        timeout=60,
        # No session bus: where none runs, Chromium otherwise waits for one (up to its 25-second D-Bus timeout).
        env={**os.environ, "DBUS_SESSION_BUS_ADDRESS": "disabled:"},
    )


@pytest.fixture(scope="module")
def rendered(observed_run, tmp_path_factory):
    """The report as headless Chromium renders it: its DOM after load, and a screenshot."""
    directory = tmp_path_factory.mktemp("report")
    page = directory / "report.html"
    page.write_text(observed_run["report"], encoding="utf-8")
    screenshot = directory / "report.png"
    with ThreadPoolExecutor(2) as both:  # two browsers at once: half the wait
        dom_run = both.submit(_chromium, "--dump-dom", page.as_uri())
        shot_run = both.submit(
            _chromium, "--hide-scrollbars", "--window-size=1280,1500", f"--screenshot={screenshot}", page.as_uri()
        )
        dom, shot = dom_run.result(), shot_run.result()
    assert dom.returncode == 0 and shot.returncode == 0, (dom.stderr[-2000:], shot.stderr[-2000:])
    figures = _Figures()
    figures.feed(dom.stdout)
    return {"dom": dom.stdout, "figures": figures, "screenshot": screenshot}


def test_report_is_self_contained(observed_run):
    report = observed_run["report"]
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", report), "the report loads something from elsewhere"
    assert "<script src" not in report and "<link" not in report


def test_report_renders_and_its_figures_match_the_summary(observed_run, rendered):
    summary, figures = observed_run["summary"], rendered["figures"]
    assert summary["run_id"] in rendered["dom"]
    assert figures.bars["stages"] == [(name, info["busy_seconds"]) for name, info in summary["stages"].items()]
    assert figures.bars["failures"] == [(r, n) for r, n in summary["samples"]["failed_by_reason"].items()]
    shards = summary["shards"]
    assert dict(figures.bars["shards"]) == {
        "ok": shards["ok"],
        "partial": shards["partial"],
        "failed": shards["failed"],
        "unfinished": shards["unfinished"],
        "skipped": shards["skipped_already_committed"],
    }
    slowest = summary["slowest_shards"]
    assert len(slowest) == SHARDS
    assert figures.bars["slowest"] == [(s["shard"].rsplit("/", 1)[-1], s["busy_seconds"]) for s in slowest]
    assert figures.average == summary["images_per_second"]
    assert figures.points == pytest.approx([rate for _, rate in rate_series(summary["timeline"])], abs=1e-3)
    # Images/s over the run adds up to the samples committed: each slice's rate times its width.
    width = summary["timeline"]["seconds"][-1] / len(figures.points)
    assert sum(rate * width for rate in figures.points) == pytest.approx(summary["samples"]["read"], abs=0.05)

    table = figures.table
    assert table["samples.read"] == str(summary["samples"]["read"])
    assert table["samples.failed"] == str(summary["samples"]["failed"])
    assert table["tokens.prompt"] == str(summary["tokens"]["prompt"])
    assert table["cost.run_usd"] == str(summary["cost"]["run_usd"])
    assert table["wall_seconds"] == f"{summary['wall_seconds']:.3f}"


def test_report_screenshot_shows_the_plots(rendered):
    image = Image.open(io.BytesIO(rendered["screenshot"].read_bytes())).convert("RGB")
    assert image.size == (1280, 1500)
    colours = Counter(image.getdata())
    # The bars' and the line's blue, and the failure bar's red, are painted: the SVG rendered.
    assert colours[(0x15, 0x65, 0xC0)] > 500
    assert colours[(0xC6, 0x28, 0x28)] > 100
