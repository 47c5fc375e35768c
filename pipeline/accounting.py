"""Token and cost accounting: what a run's answers cost in tokens, model-actor time and money.

The model stage writes each row's token counts (`prompt_tokens`, `generated_tokens`, `task_tokens`; schema
version 2) and stamps its rows with the actor that answered them and when that actor started. The driver folds
every committed batch into a `Usage`, so the totals are sums over the rows written, like the rest of the summary.

Model-actor seconds are each model actor's lifetime as its rows show it, from its start (the model load
included: a GPU is held while the weights load) to the end of its last call. On GPUs they are multiplied by the
GPUs per actor (`stages.model.num_gpus`) into GPU-seconds; priced at `cost.gpu_hour_usd` (or
`--gpu-hour-price`) they give the cost of the run and of a million images at this run's rate. On a CPU-only
model stage the same price is read per model-actor-hour.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline import rows


@dataclass
class Usage:
    prompt_tokens: int = 0
    generated_tokens: int = 0
    prompt_tokens_by_task: Counter = field(default_factory=Counter)
    generated_tokens_by_task: Counter = field(default_factory=Counter)
    # actor -> [started (epoch seconds), end of its last call (epoch seconds)]
    model_actors: dict[str, list[float]] = field(default_factory=dict)

    def observe(self, table: pa.Table) -> None:
        if "task_tokens" in table.column_names:
            self._observe_tokens(table)
        if rows.MODEL_ACTOR in table.column_names and "processed_at" in table.column_names:
            self._observe_actors(table)

    def _observe_tokens(self, table: pa.Table) -> None:
        self.prompt_tokens += pc.sum(table.column("prompt_tokens")).as_py() or 0
        self.generated_tokens += pc.sum(table.column("generated_tokens")).as_py() or 0
        entries = pc.list_flatten(table.column("task_tokens"))
        if not len(entries):
            return
        per_task = (
            pa.table(
                {
                    "task": pc.struct_field(entries, "task"),
                    "prompt": pc.struct_field(entries, "prompt_tokens").cast(pa.int64()),
                    "generated": pc.struct_field(entries, "generated_tokens").cast(pa.int64()),
                }
            )
            .group_by("task")
            .aggregate([("prompt", "sum"), ("generated", "sum")])
        )
        for task, prompt, generated in zip(
            *(per_task.column(n).to_pylist() for n in ("task", "prompt_sum", "generated_sum"))
        ):
            self.prompt_tokens_by_task[task] += prompt or 0
            self.generated_tokens_by_task[task] += generated or 0

    def _observe_actors(self, table: pa.Table) -> None:
        calls = (
            pa.table(
                {
                    "actor": table.column(rows.MODEL_ACTOR),
                    "started": table.column(rows.MODEL_ACTOR_STARTED),
                    "end": table.column("processed_at").cast(pa.int64()),
                }
            )
            .filter(pc.is_valid(table.column(rows.MODEL_ACTOR)))
            .group_by("actor")
            .aggregate([("started", "min"), ("end", "max")])
        )
        for actor, started, end in zip(*(calls.column(n).to_pylist() for n in ("actor", "started_min", "end_max"))):
            span = self.model_actors.setdefault(actor, [started, end / 1e6])
            span[0] = min(span[0], started)
            span[1] = max(span[1], end / 1e6)

    @property
    def model_actor_seconds(self) -> float:
        return sum(max(0.0, end - started) for started, end in self.model_actors.values())


def token_summary(usage: Usage, samples: int) -> dict[str, object]:
    tasks = sorted(set(usage.prompt_tokens_by_task) | set(usage.generated_tokens_by_task))
    return {
        "prompt": usage.prompt_tokens,
        "generated": usage.generated_tokens,
        "prompt_per_image": round(usage.prompt_tokens / samples, 2) if samples else None,
        "generated_per_image": round(usage.generated_tokens / samples, 2) if samples else None,
        "by_task": {
            task: {"prompt": usage.prompt_tokens_by_task[task], "generated": usage.generated_tokens_by_task[task]}
            for task in tasks
        },
    }


def cost_summary(
    usage: Usage, samples: int, model_busy_seconds: float, gpus_per_actor: float, gpu_hour_usd: float | None
) -> dict[str, object]:
    """Model-actor and GPU seconds, per 1,000 images, and priced when a price is given."""
    actor_seconds = usage.model_actor_seconds
    on_gpus = gpus_per_actor > 0
    # What the price applies to: GPU-seconds on GPUs, model-actor seconds on a CPU-only model stage.
    billed_seconds = actor_seconds * gpus_per_actor if on_gpus else actor_seconds
    per_thousand = 1000 / samples if samples else None
    run_usd = billed_seconds / 3600 * gpu_hour_usd if gpu_hour_usd is not None else None
    return {
        "model_actors": len(usage.model_actors),
        "model_actor_seconds": round(actor_seconds, 3),
        "model_busy_seconds": round(model_busy_seconds, 3),
        "gpus_per_model_actor": gpus_per_actor,
        "gpu_seconds": round(billed_seconds, 3) if on_gpus else None,
        "billed_unit": "GPU-hour" if on_gpus else "model-actor-hour",
        "model_actor_seconds_per_1000_images": round(actor_seconds * per_thousand, 3) if per_thousand else None,
        "gpu_seconds_per_1000_images": round(billed_seconds * per_thousand, 3) if on_gpus and per_thousand else None,
        "gpu_hour_usd": gpu_hour_usd,
        "run_usd": round(run_usd, 6) if run_usd is not None else None,
        "per_million_images_usd": round(run_usd / samples * 1e6, 4) if run_usd is not None and samples else None,
    }


def render_usage(summary: dict[str, object]) -> list[str]:
    """The summary's token and cost lines, as printed after a run."""
    tokens, cost = summary.get("tokens"), summary.get("cost")
    lines = []
    if isinstance(tokens, dict):
        per_image = (
            f" ({tokens['prompt_per_image']:g} / {tokens['generated_per_image']:g} per image)"
            if tokens.get("prompt_per_image") is not None
            else ""
        )
        lines.append(f"  tokens    {tokens['prompt']:,} prompt, {tokens['generated']:,} generated{per_image}")
    if isinstance(cost, dict):
        unit = "GPU" if cost["gpu_seconds"] is not None else "model-actor"
        billed = cost["gpu_seconds"] if cost["gpu_seconds"] is not None else cost["model_actor_seconds"]
        per_thousand = (
            cost["gpu_seconds_per_1000_images"]
            if cost["gpu_seconds"] is not None
            else cost["model_actor_seconds_per_1000_images"]
        )
        line = (
            f"  model     {cost['model_actors']} actor(s), {billed:,.1f} {unit}-seconds"
            f" ({cost['model_busy_seconds']:,.1f} s generating)"
        )
        if per_thousand is not None:
            line += f", {per_thousand:,.1f} {unit}-s per 1,000 images"
        lines.append(line)
        if cost["run_usd"] is not None:
            per_million = cost["per_million_images_usd"]
            lines.append(
                f"  cost      ${cost['run_usd']:,.4f} this run at ${cost['gpu_hour_usd']:g}/{cost['billed_unit']}"
                + (f", ${per_million:,.2f} per million images" if per_million is not None else "")
            )
    return lines
