"""The run report: one self-contained HTML file next to the run summary (`_runs/<run_id>.html`).

Made from the summary alone, so it shows exactly what the summary records: images/s over the run, each
stage's busy time, failures by reason, shards by status, the slowest shards, and the summary table. The
plots are inline SVG drawn here; the file loads nothing (no scripts, styles or fonts from elsewhere), so it
opens from a bucket, an e-mail or a laptop offline. Every plotted bar and point carries its value in
`data-value`, the figures' numbers are in the text, and a browser test compares both with the summary.
"""

from __future__ import annotations

import html
import json

WIDTH = 560
BAR_HEIGHT = 22
BAR_GAP = 8
LABEL_WIDTH = 190
VALUE_WIDTH = 90
COLOURS = {"ok": "#2e7d32", "partial": "#f9a825", "failed": "#c62828", "unfinished": "#6d4c41", "skipped": "#90a4ae"}
BAR_COLOUR = "#1565c0"
FAILURE_COLOUR = "#c62828"
# Images/s is drawn as the rate over this many equal slices of the run.
RATE_SLICES = 40

STYLE = """
body { font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px; color: #212121; }
h1 { font-size: 20px; margin: 0 0 4px; }
.status-completed { color: #2e7d32; } .status-failed, .status-interrupted { color: #c62828; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(600px, 1fr)); gap: 16px; margin-top: 16px; }
figure { margin: 0; padding: 12px; border: 1px solid #e0e0e0; border-radius: 6px; }
figcaption { font-weight: 600; margin-bottom: 8px; }
svg text { font: 12px system-ui, sans-serif; fill: #424242; }
table { border-collapse: collapse; margin-top: 16px; }
th, td { text-align: left; padding: 3px 12px 3px 0; border-bottom: 1px solid #eeeeee; vertical-align: top; }
th { font-weight: 600; color: #616161; white-space: nowrap; }
.empty { color: #757575; font-style: italic; }
"""


def render_report(summary: dict) -> str:
    """The report's HTML for a run summary (`pipeline.summary.build_summary`)."""
    samples, shards = summary["samples"], summary["shards"]
    figures = [
        _figure("rate", "Images/s over the run", _rate_plot(summary)),
        _figure(
            "stages",
            "Busy time per stage (s)",
            _bars([(name, info["busy_seconds"]) for name, info in summary["stages"].items()], "s"),
        ),
        _figure(
            "failures",
            "Failed samples by reason",
            _bars(list(samples["failed_by_reason"].items()), "", colour=FAILURE_COLOUR, empty="no failed samples"),
        ),
        _figure(
            "shards",
            "Shards by status",
            _bars(
                [
                    (status, shards[key])
                    for status, key in (
                        ("ok", "ok"),
                        ("partial", "partial"),
                        ("failed", "failed"),
                        ("unfinished", "unfinished"),
                        ("skipped", "skipped_already_committed"),
                    )
                ],
                "",
                colours=COLOURS,
            ),
        ),
        _figure(
            "slowest",
            "Slowest shards (busy seconds, all stages)",
            _bars(
                [(s["shard"].rsplit("/", 1)[-1], s["busy_seconds"]) for s in summary.get("slowest_shards", [])],
                "s",
                titles=[s["shard"] for s in summary.get("slowest_shards", [])],
            ),
        ),
    ]
    status = summary["status"]
    title = f"Run {summary['run_id']} of {summary['job']}"
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
        f'<h1>{_e(title)}: <span class="status-{_e(status)}" id="status">{_e(status)}</span></h1>'
        f"<div>{_e(summary['command'])} started {_e(summary['started_at'])}, {summary['wall_seconds']:.1f} s, "
        f"{samples['read']} samples, model {_e(summary['model'])}</div>"
        + _usage_line(summary)
        + (f'<p class="status-failed">{_e(summary["error"])}</p>' if summary.get("error") else "")
        + f'<div class="grid">{"".join(figures)}</div>'
        + _summary_table(summary)
        + "</body></html>\n"
    )


def _usage_line(summary: dict) -> str:
    """Tokens and what the model's time cost, under the title."""
    tokens, cost = summary.get("tokens"), summary.get("cost")
    parts = []
    if tokens:
        parts.append(f"{tokens['prompt']:,} prompt and {tokens['generated']:,} generated tokens")
    if cost:
        on_gpus = cost.get("gpu_seconds") is not None
        seconds = cost["gpu_seconds"] if on_gpus else cost["model_actor_seconds"]
        parts.append(f"{seconds:,.1f} {'GPU' if on_gpus else 'model-actor'}-seconds")
        if cost.get("run_usd") is not None:
            line = f'<span id="run-cost">${cost["run_usd"]:,.4f}</span> at ${cost["gpu_hour_usd"]:g}/{_e(cost["billed_unit"])}'
            if cost.get("per_million_images_usd") is not None:
                line += f", ${cost['per_million_images_usd']:,.2f} per million images"
            parts.append(line)
    return f'<div class="usage">{"; ".join(parts)}</div>' if parts else ""


def _e(value: object) -> str:
    return html.escape(str(value), quote=True)


def _number(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _figure(name: str, caption: str, body: str) -> str:
    return f'<figure id="figure-{name}" data-figure="{name}"><figcaption>{_e(caption)}</figcaption>{body}</figure>'


def _bars(
    items: list[tuple[str, float]],
    unit: str,
    *,
    colour: str = BAR_COLOUR,
    colours: dict[str, str] | None = None,
    titles: list[str] | None = None,
    empty: str = "nothing to show",
) -> str:
    """A horizontal bar chart, one labelled bar per item, its value written after it."""
    if not items:
        return f'<p class="empty">{_e(empty)}</p>'
    largest = max(value for _, value in items) or 1
    span = WIDTH - LABEL_WIDTH - VALUE_WIDTH
    height = len(items) * (BAR_HEIGHT + BAR_GAP)
    parts = [f'<svg width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">']
    for index, (label, value) in enumerate(items):
        y = index * (BAR_HEIGHT + BAR_GAP)
        length = max(span * value / largest, 1 if value else 0)
        fill = (colours or {}).get(label, colour)
        title = titles[index] if titles else label
        parts.append(
            f'<g class="bar" data-label="{_e(label)}" data-value="{value}"><title>{_e(title)}: {_number(value)}'
            f"{_e(unit)}</title>"
            f'<text x="{LABEL_WIDTH - 8}" y="{y + BAR_HEIGHT * 0.7:.1f}" text-anchor="end">{_e(label)}</text>'
            f'<rect x="{LABEL_WIDTH}" y="{y}" width="{length:.1f}" height="{BAR_HEIGHT}" fill="{fill}"></rect>'
            f'<text class="value" x="{LABEL_WIDTH + length + 6:.1f}" y="{y + BAR_HEIGHT * 0.7:.1f}">'
            f"{_number(value)}{_e(unit)}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)


def rate_series(timeline: dict) -> list[tuple[float, float]]:
    """(end of slice in seconds, images/s in that slice) over RATE_SLICES equal slices of the timeline."""
    seconds, samples = timeline.get("seconds") or [], timeline.get("samples") or []
    if not seconds or seconds[-1] <= 0:
        return []
    width = seconds[-1] / RATE_SLICES
    series, before, index = [], 0, 0
    for slice_number in range(1, RATE_SLICES + 1):
        end = slice_number * width
        while index < len(seconds) and seconds[index] <= end + 1e-9:
            index += 1
        committed = samples[index - 1] if index else 0
        series.append((end, (committed - before) / width))
        before = committed
    return series


def _rate_plot(summary: dict) -> str:
    series = rate_series(summary.get("timeline") or {})
    average = summary.get("images_per_second") or 0
    if not series:
        return '<p class="empty">no samples committed</p>'
    left, bottom, top, height = 48, 24, 8, 200
    plot_width, plot_height = WIDTH - left - 12, height - bottom - top
    end = series[-1][0]
    peak = max(max(rate for _, rate in series), average) or 1
    x = lambda t: left + plot_width * t / end  # noqa: E731
    y = lambda r: top + plot_height * (1 - r / peak)  # noqa: E731
    points = [(0.0, series[0][1])]
    for index, (t, rate) in enumerate(series):  # a step per slice: flat while the slice lasts
        points.append((t, rate))
        if index + 1 < len(series):
            points.append((t, series[index + 1][1]))
    path = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r in points)
    dots = "".join(
        f'<circle class="point" data-seconds="{t:.3f}" data-value="{rate:.3f}" cx="{x(t):.1f}" cy="{y(rate):.1f}" '
        f'r="1.5" fill="{BAR_COLOUR}"></circle>'
        for t, rate in series
    )
    return (
        f'<svg width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" role="img">'
        f'<line x1="{left}" y1="{top + plot_height}" x2="{left + plot_width}" y2="{top + plot_height}" '
        'stroke="#9e9e9e"></line>'
        f'<line x1="{left}" y1="{top}" x2="{left}" y2="{top + plot_height}" stroke="#9e9e9e"></line>'
        f'<text x="{left - 6}" y="{top + 10}" text-anchor="end">{_number(peak)}</text>'
        f'<text x="{left - 6}" y="{top + plot_height}" text-anchor="end">0</text>'
        f'<text x="{left}" y="{height - 6}">0 s</text>'
        f'<text x="{left + plot_width}" y="{height - 6}" text-anchor="end">{end:.1f} s</text>'
        f'<polyline points="{path}" fill="none" stroke="{BAR_COLOUR}" stroke-width="2"></polyline>{dots}'
        f'<line class="average" data-value="{average}" x1="{left}" y1="{y(average):.1f}" x2="{left + plot_width}" '
        f'y2="{y(average):.1f}" stroke="#ef6c00" stroke-dasharray="4 3"></line>'
        f'<text x="{left + plot_width}" y="{y(average) - 4:.1f}" text-anchor="end" fill="#ef6c00">'
        f'run average <tspan id="average-rate">{average:.2f}</tspan> images/s</text>'
        "</svg>"
    )


def _summary_rows(summary: dict) -> list[tuple[str, str, str]]:
    """(key, label, value) for the summary table, in reading order."""
    samples, shards = summary["samples"], summary["shards"]
    found = [
        ("status", "Status", summary["status"]),
        ("run_id", "Run", summary["run_id"]),
        ("command", "Command", summary["command"]),
        ("started_at", "Started", summary["started_at"]),
        ("finished_at", "Finished", summary["finished_at"]),
        ("wall_seconds", "Wall time (s)", f"{summary['wall_seconds']:.3f}"),
        ("images_per_second", "Images/s", f"{summary['images_per_second'] or 0:.3f}"),
        ("seconds_to_first_row", "Seconds to first row", str(summary.get("seconds_to_first_row"))),
        ("samples.read", "Samples read", str(samples["read"])),
        ("samples.succeeded", "Samples succeeded", str(samples["succeeded"])),
        ("samples.failed", "Samples failed", str(samples["failed"])),
        ("shards.total", "Shards", str(shards["total"])),
        ("shards.rows_replaced", "Rows replaced (retry-failed)", str(shards.get("rows_replaced", 0))),
        ("duplicates_dropped", "Duplicate rows dropped", str(summary["duplicates_dropped"])),
        ("stream_restarts", "Stream restarts", str(summary["stream_restarts"])),
        ("model", "Model", summary["model"]),
        ("tasks", "Tasks", ", ".join(summary["tasks"])),
        ("output", "Output", summary["output"]),
    ]
    tokens, cost = summary.get("tokens"), summary.get("cost")
    if tokens:
        found += [
            ("tokens.prompt", "Prompt tokens", str(tokens["prompt"])),
            ("tokens.generated", "Generated tokens", str(tokens["generated"])),
        ]
    if cost:
        found += [
            ("cost.model_actors", "Model actors", str(cost["model_actors"])),
            ("cost.model_actor_seconds", "Model-actor seconds", str(cost["model_actor_seconds"])),
            ("cost.model_busy_seconds", "Model busy seconds", str(cost["model_busy_seconds"])),
            (
                "cost.model_actor_seconds_per_1000_images",
                "Model-actor s per 1,000 images",
                str(cost["model_actor_seconds_per_1000_images"]),
            ),
        ]
        if cost.get("gpu_seconds") is not None:
            found.append(("cost.gpu_seconds", "GPU-seconds", str(cost["gpu_seconds"])))
        if cost.get("run_usd") is not None:
            found += [
                ("cost.gpu_hour_usd", f"Price (USD per {cost['billed_unit']})", str(cost["gpu_hour_usd"])),
                ("cost.run_usd", "Cost of this run (USD)", str(cost["run_usd"])),
                ("cost.per_million_images_usd", "Cost per million images (USD)", str(cost["per_million_images_usd"])),
            ]
    return found


def _summary_table(summary: dict) -> str:
    body = "".join(
        f'<tr data-key="{_e(key)}"><th>{_e(label)}</th><td>{_e(value)}</td></tr>'
        for key, label, value in _summary_rows(summary)
    )
    problems = summary["shards"].get("problems") or []
    listed = "".join(
        f"<tr><th>{_e(p['status'])}</th><td>{_e(p['shard'])}: {_e(p['error'] or '-')}</td></tr>" for p in problems
    )
    return (
        f'<h2>Summary</h2><table id="summary">{body}</table>'
        + (f'<h2>Shard problems</h2><table id="problems">{listed}</table>' if listed else "")
        + f'<script type="application/json" id="summary-json">{_json_for_html(summary)}</script>'
    )


def _json_for_html(summary: dict) -> str:
    """The summary itself, embedded as data (not run) for whoever opens the report; `<` escaped so no value
    can close the element."""
    return json.dumps(summary, sort_keys=False).replace("<", "\\u003c")
