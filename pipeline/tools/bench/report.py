"""The figures a bench run derives (pipeline ÷ bare), and how they are printed."""

from __future__ import annotations

from pathlib import Path

from pipeline.tools.bench.options import QUESTIONS, Figures


def ratios(figures: Figures) -> dict[str, object]:
    ratio: dict[str, object] = {}
    if figures.bare:
        bare = float(figures.bare["images_per_second"])  # type: ignore[arg-type]
        steady = figures.pipeline.get("steady_images_per_second")
        ratio["steady_pipeline_over_bare"] = round(float(steady) / bare, 3) if steady else None  # type: ignore[arg-type]
        ratio["end_to_end_pipeline_over_bare"] = round(float(figures.pipeline["images_per_second"]) / bare, 3)  # type: ignore[arg-type]
    return ratio


def write_figures(figures, path: Path | None, echo) -> None:
    """A bench run's figures (a dataclass) as JSON at `path`, when one was asked for."""
    if path is None:
        return
    import json
    from dataclasses import asdict

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(asdict(figures), indent=2) + "\n")
    echo(f"figures written to {path}")


def jsonable(values: dict[str, object]) -> dict[str, object]:
    return {k: str(v) if isinstance(v, Path) else v for k, v in values.items()}


def render(figures: Figures) -> str:
    p = figures.pipeline
    lines = [
        f"bench: {figures.model['shape']} model, {figures.options['tasks']} task(s), batch {figures.options['batch_size']}"
    ]
    if figures.bare:
        b = figures.bare
        lines.append(
            f"  bare loop      {b['images_per_second']:.2f} images/s ({b['images']} images in {b['seconds']:.1f} s)"
        )
    lines.append(
        f"  pipeline       {p['steady_images_per_second'] or 0:.2f} images/s steady "
        f"({p['steady_images']} images in {p['steady_seconds'] or 0:.1f} s), {p['images_per_second'] or 0:.2f} "
        f"end to end ({p['images']} in {p['wall_seconds']:.1f} s)"
    )
    if figures.ratio:
        r = figures.ratio
        lines.append(
            f"  ratio          {r['steady_pipeline_over_bare'] or 0:.3f} steady, "
            f"{r['end_to_end_pipeline_over_bare']:.3f} end to end (pipeline ÷ bare)"
        )
    lines.append(f"  first row      {p['seconds_to_first_row'] or 0:.1f} s")
    lines.append(
        f"  model busy     {p['steady_model_busy_fraction'] or 0:.3f} of steady wall time, "
        f"{p['model_busy_fraction'] or 0:.3f} end to end"
    )
    stages = ", ".join(
        f"{s} {v:.1f} s ({p['stage_ms_per_image'][s]} ms/image)" for s, v in p["stage_busy_seconds"].items()
    )
    lines.append(f"  stage busy     {stages}")
    m = p["memory"]
    lines.append(
        f"  peak memory    driver {m['driver_peak_rss_mib']:.0f} MiB, Ray workers {m['workers_peak_rss_mib']:.0f} MiB "
        f"together (largest {m['largest_worker_peak_rss_mib']:.0f} MiB), Ray daemons {m['ray_daemons_peak_rss_mib']:.0f} MiB"
    )
    lines.append(
        f"  (private)      driver {m['driver_peak_private_mib']:.0f} MiB, Ray workers "
        f"{m['workers_peak_private_mib']:.0f} MiB together (largest {m['largest_worker_peak_private_mib']:.0f} MiB)"
    )
    if figures.multitask:
        t = figures.multitask
        lines.append(
            f"  several tasks  caption + tags + {len(QUESTIONS)} questions cost {t['shared_cost_vs_caption']:.2f}x "
            f"caption alone with the shared prefix, {t['whole_prompts_cost_vs_caption']:.2f}x as whole prompts"
        )
    return "\n".join(lines)
