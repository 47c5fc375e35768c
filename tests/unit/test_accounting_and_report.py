"""Unit tests for what makes a run watchable: token and cost accounting, the run report's HTML, the live
metrics' no-op outside Ray, and the Grafana dashboard naming only metrics the pipeline exports."""

from __future__ import annotations

import json
import re
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pytest
import torch

from pipeline import rows
from pipeline.accounting import Usage, cost_summary, render_usage, token_summary
from pipeline.generator import Generator
from pipeline.metrics import SPECS, StageMetrics
from pipeline.report import rate_series, render_report
from pipeline.shards import Shard
from pipeline.stages.generate import TASK_TOKENS_TYPE
from pipeline.summary import RunStats
from pipeline.writer import ShardResult

ROOT = Path(__file__).parents[2]
T0 = datetime(2026, 12, 1, 2, 0, tzinfo=timezone.utc)


def committed_batch() -> pa.Table:
    """Rows as the driver admits them: two answered samples from one actor, a failed one, a shard_end row."""
    at = pa.array([T0, T0, T0, T0], pa.timestamp("us", tz="UTC"))
    return pa.table(
        {
            rows.RECORD: [rows.SAMPLE, rows.SAMPLE, rows.SAMPLE, rows.SHARD_END],
            "shard": ["s://a.tar"] * 4,
            "error": [None, None, "cannot decode", None],
            "error_reason": [None, None, "undecodable", None],
            "prompt_tokens": pa.array([30, 31, None, None], pa.int32()),
            "generated_tokens": pa.array([7, 5, None, None], pa.int32()),
            "task_tokens": pa.array(
                [
                    [
                        {"task": "caption", "prompt_tokens": 14, "generated_tokens": 4},
                        {"task": "vqa", "prompt_tokens": 16, "generated_tokens": 3},
                    ],
                    [
                        {"task": "caption", "prompt_tokens": 14, "generated_tokens": 2},
                        {"task": "vqa", "prompt_tokens": 17, "generated_tokens": 3},
                    ],
                    None,
                    None,
                ],
                TASK_TOKENS_TYPE,
            ),
            "processed_at": at,
            rows.MODEL_ACTOR: ["actor-1"] * 4,
            rows.MODEL_ACTOR_STARTED: [T0.timestamp() - 20.0] * 4,
            rows.seconds_column("model"): [1.0, 1.0, 1.0, 1.0],
        }
    )


def test_usage_totals_tokens_per_task_and_model_actor_lifetimes():
    usage = Usage()
    usage.observe(committed_batch())
    later = committed_batch()
    later = later.set_column(
        later.schema.get_field_index("processed_at"),
        "processed_at",
        pa.array([T0.replace(minute=1)] * 4, pa.timestamp("us", tz="UTC")),
    )
    usage.observe(later)
    assert (usage.prompt_tokens, usage.generated_tokens) == (122, 24)
    assert usage.prompt_tokens_by_task == {"caption": 56, "vqa": 66}
    assert usage.generated_tokens_by_task == {"caption": 12, "vqa": 12}
    # one actor, from its start (20 s before its first call ended) to the end of its last call (60 s later)
    assert usage.model_actor_seconds == pytest.approx(80.0)
    assert token_summary(usage, 4) == {
        "prompt": 122,
        "generated": 24,
        "prompt_per_image": 30.5,
        "generated_per_image": 6.0,
        "by_task": {"caption": {"prompt": 56, "generated": 12}, "vqa": {"prompt": 66, "generated": 12}},
    }


def test_cost_on_gpus_is_gpu_seconds_at_the_price_and_scales_to_a_million_images():
    usage = Usage(model_actors={"a": [0.0, 3600.0], "b": [100.0, 1900.0]})  # 1.5 actor-hours
    cost = cost_summary(usage, samples=3000, model_busy_seconds=4000.0, gpus_per_actor=2, gpu_hour_usd=2.0)
    assert cost["model_actor_seconds"] == 5400.0
    assert cost["gpu_seconds"] == 10800.0 and cost["billed_unit"] == "GPU-hour"
    assert cost["model_actor_seconds_per_1000_images"] == 1800.0
    assert cost["gpu_seconds_per_1000_images"] == 3600.0
    assert cost["run_usd"] == 6.0  # 3 GPU-hours at $2
    assert cost["per_million_images_usd"] == 2000.0
    lines = render_usage({"cost": cost})
    assert lines == [
        "  model     2 actor(s), 10,800.0 GPU-seconds (4,000.0 s generating), 3,600.0 GPU-s per 1,000 images",
        "  cost      $6.0000 this run at $2/GPU-hour, $2,000.00 per million images",
    ]


def test_cost_on_cpu_prices_model_actor_hours_and_without_a_price_prints_no_cost():
    usage = Usage(model_actors={"a": [0.0, 36.0]})
    priced = cost_summary(usage, samples=10, model_busy_seconds=30.0, gpus_per_actor=0, gpu_hour_usd=1.0)
    assert priced["gpu_seconds"] is None and priced["billed_unit"] == "model-actor-hour"
    assert priced["run_usd"] == 0.01 and priced["per_million_images_usd"] == 1000.0
    unpriced = cost_summary(usage, samples=10, model_busy_seconds=30.0, gpus_per_actor=0, gpu_hour_usd=None)
    assert unpriced["run_usd"] is None and unpriced["per_million_images_usd"] is None
    assert [line.split()[0] for line in render_usage({"cost": unpriced})] == ["model"]


def test_generated_tokens_end_at_the_first_end_of_sequence_token():
    fake = SimpleNamespace(eos_token_ids=[2, 9])
    new_tokens = torch.tensor([[5, 7, 2, 0, 0], [5, 5, 5, 5, 5], [9, 0, 0, 0, 0], [4, 2, 9, 2, 2]])
    assert Generator._generated_counts(fake, new_tokens) == [3, 5, 1, 2]
    assert Generator._generated_counts(SimpleNamespace(eos_token_ids=[]), new_tokens) == [5, 5, 5, 5]


def test_run_stats_keep_a_timeline_shard_seconds_and_a_recent_rate():
    stats = RunStats(started=100.0)
    stats.observe(committed_batch())
    assert stats.samples == 3 and len(stats.timeline) == 1
    assert stats.shard_seconds == {"s://a.tar": 4.0}
    stats.timeline = [(10.0, 100), (20.0, 200), (50.0, 500)]
    stats.samples = 500
    assert stats.recent_rate(30.0, now=150.0) == pytest.approx((500 - 200) / 30)  # window 20..50 s
    assert stats.recent_rate(100.0, now=150.0) == pytest.approx(500 / 50)  # the whole run so far


def test_first_commit_is_when_its_thread_put_the_marker_in_place_not_when_the_driver_noticed():
    """The driver learns of a finished commit only at its next batch, which may come one model call later."""
    stats = RunStats(started=100.0)
    failed = ShardResult(Shard("s://f.tar", "f"), finished=True)  # no file, no marker: not a commit
    stats.observe_commits([failed])
    assert stats.first_commit_seconds is None
    later, earlier = (
        ShardResult(Shard(f"s://{n}.tar", n), finished=True, committed_at=t) for n, t in (("b", 109.0), ("a", 104.5))
    )
    stats.observe_commits([later, earlier])
    stats.observe_commits([ShardResult(Shard("s://c.tar", "c"), finished=True, committed_at=103.0)])  # noticed later
    assert stats.first_commit_seconds == 4.5


def summary(**overrides) -> dict:
    found = {
        "job": "nightly",
        "run_id": "20261201T020000Z-abc123",
        "command": "run",
        "status": "completed",
        "error": None,
        "started_at": "2026-12-01T02:00:00+00:00",
        "finished_at": "2026-12-01T02:01:40+00:00",
        "wall_seconds": 100.0,
        "model": "llava-hf/llava-1.5-7b-hf",
        "tasks": ["caption"],
        "output": "s3://bucket/out/",
        "samples": {"read": 1000, "succeeded": 990, "failed": 10, "failed_by_reason": {"undecodable": 10}},
        "shards": {
            "total": 4,
            "ok": 3,
            "partial": 1,
            "failed": 0,
            "unfinished": 0,
            "skipped_already_committed": 2,
            "problems": [{"shard": "s3://b/s-3.tar", "status": "partial", "samples": 9, "error": "truncated"}],
            "outputs": [],
            "rows_replaced": 0,
        },
        "duplicates_dropped": 0,
        "stream_restarts": 0,
        "images_per_second": 10.0,
        "seconds_to_first_row": 12.5,
        "stages": {"read": {"busy_seconds": 5.0}, "model": {"busy_seconds": 80.5}},
        "tokens": {"prompt": 600000, "generated": 20000},
        "cost": cost_summary(Usage(model_actors={"a": [0.0, 90.0]}), 1000, 80.5, 1, 2.5),
        "slowest_shards": [{"shard": "s3://b/s-1.tar", "busy_seconds": 30.0}],
        "timeline": {"seconds": [25.0, 50.0, 100.0], "samples": [100, 400, 1000]},
    }
    found.update(overrides)
    return found


def test_report_escapes_what_it_shows_and_loads_nothing():
    page = render_report(summary(job="<script>alert(1)</script>", error="</script><b>x</b>"))
    assert "<script>alert" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "</script><b>" not in page
    assert not re.search(r"""(src|href)\s*=""", page)
    embedded = re.search(r'<script type="application/json" id="summary-json">(.*?)</script>', page, re.S).group(1)
    assert json.loads(embedded)["job"] == "<script>alert(1)</script>"


def test_report_bars_carry_the_summary_values():
    page = render_report(summary())
    bars = re.findall(r'<g class="bar" data-label="([^"]+)" data-value="([^"]+)">', page)
    assert ("model", "80.5") in bars and ("undecodable", "10") in bars and ("skipped", "2") in bars
    assert ("s-1.tar", "30.0") in bars
    assert '<tr data-key="cost.run_usd"><th>Cost of this run (USD)</th><td>0.0625</td></tr>' in page


def test_report_says_so_when_nothing_failed():
    page = render_report(summary(samples={"read": 5, "succeeded": 5, "failed": 0, "failed_by_reason": {}}))
    assert (
        '<figure id="figure-failures" data-figure="failures"><figcaption>Failed samples by reason</figcaption>' in page
    )
    assert "no failed samples" in page


def test_rate_series_adds_up_to_the_samples_committed():
    series = rate_series({"seconds": [25.0, 50.0, 100.0], "samples": [100, 400, 1000]})
    width = 100.0 / len(series)
    assert sum(rate * width for _, rate in series) == pytest.approx(1000)
    assert rate_series({"seconds": [], "samples": []}) == []


def test_stage_metrics_outside_a_run_record_nothing():
    metrics = StageMetrics("model", None)
    table = committed_batch()
    metrics.received(table)
    metrics.handed_on(table, ["x"], 0.1)
    metrics.count_tokens([[{"task": "caption", "prompt_tokens": 1, "generated_tokens": 1}]])
    metrics.actor_alive()
    metrics.settle()  # returns at once: nothing recorded, not an actor
    assert metrics.tags is None


def _exported_names() -> set[str]:
    """Names as Ray's Prometheus endpoint spells them: `ray_` prefix, counters with `_total`, histograms with
    their `_bucket`, `_count` and `_sum` series."""
    names = set()
    for name, spec in SPECS.items():
        full = f"ray_llava_pipeline_{name}"
        if spec.kind == "counter":
            names.add(f"{full}_total")
        elif spec.kind == "histogram":
            names.update(f"{full}_{suffix}" for suffix in ("bucket", "count", "sum"))
        else:
            names.add(full)
    return names


def test_dashboard_queries_only_metrics_the_pipeline_exports():
    dashboard = json.loads((ROOT / "infra" / "grafana" / "llava-pipeline.json").read_text())
    exported = _exported_names()
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            names = set(re.findall(r"\bray_llava_pipeline_\w+", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)
            assert 'job="$job"' in target["expr"] and 'run=~"$run"' in target["expr"], panel["title"]
            used |= names
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    # every metric the pipeline exports has a panel
    assert {re.sub(r"_(total|bucket|count|sum)$", "", n) for n in used} == {
        f"ray_llava_pipeline_{name}" for name in SPECS
    }


@pytest.mark.parametrize("price", ["-1", "nan"])
def test_gpu_hour_price_must_be_a_price(price, tmp_path, capsys):
    from pipeline.cli import main

    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: j\ninput: {{urls: ['{tmp_path}/*.tar']}}\noutput: {{url: '{tmp_path}/out/'}}\n"
        "model: {source: some/model}\ntasks: {caption: {}}\n"
    )
    assert main(["run", str(job), "--gpu-hour-price", price]) == 2
    assert capsys.readouterr().err.startswith("error: --gpu-hour-price: must be at least 0")


def test_gpu_hour_price_replaces_the_jobs_price(tmp_path):
    from pipeline.cli import _load, build_parser

    job = tmp_path / "job.yaml"
    job.write_text(
        f"name: j\ninput: {{urls: ['{tmp_path}/*.tar']}}\noutput: {{url: '{tmp_path}/out/'}}\n"
        "model: {source: some/model}\ntasks: {caption: {}}\ncost: {gpu_hour_usd: 4.0}\n"
    )
    assert _load(build_parser().parse_args(["run", str(job)])).cost.gpu_hour_usd == 4.0
    assert _load(build_parser().parse_args(["run", str(job), "--gpu-hour-price", "1.25"])).cost.gpu_hour_usd == 1.25


def test_a_batch_without_samples_records_without_failing_the_batch():
    """Ray's counters refuse an increment of 0: a batch of only shard_end rows must still go through."""
    metrics = StageMetrics("parse", {"job": "unit", "run": "r-1"})
    only_end = pa.table({rows.RECORD: [rows.SHARD_END]})
    metrics.received(only_end)
    metrics.handed_on(only_end, [None], 0.01)
    metrics.count_tokens([None, [{"task": "caption", "prompt_tokens": 3, "generated_tokens": 0}]])
    metrics.received(committed_batch())
    metrics.handed_on(committed_batch(), ["undecodable"], 0.01)
