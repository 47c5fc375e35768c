"""The KubeRay manifests in infra/kuberay/: valid against the KubeRay CRDs, free of fields the API server would
silently drop, and running commands that the CLI accepts on the job spec they mount."""

from __future__ import annotations

import copy
import difflib
import functools
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from pipeline.cli import build_parser
from pipeline.config import JobConfig
from pipeline.jobfile import load_job

ROOT = Path(__file__).parents[2]
MANIFESTS = ROOT / "infra" / "kuberay"
CRDS = ROOT / "tests" / "data" / "kuberay-crds"
CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
# Never written in a manifest: they come from a Secret.
CREDENTIAL_VARIABLES = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "HF_TOKEN"}

# The CRDs are 3 MB of YAML: libyaml reads them in about a second, the pure-Python loader in ten.
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _documents() -> list[tuple[str, dict]]:
    found = []
    for path in sorted([*MANIFESTS.rglob("*.yaml"), *MANIFESTS.rglob("*.yml")]):
        for index, document in enumerate(yaml.safe_load_all(path.read_text(encoding="utf-8"))):
            if document is not None:
                found.append((f"{path.relative_to(ROOT)}#{index}", document))
    return found


DOCUMENTS = _documents()
RAY_DOCUMENTS = [(where, doc) for where, doc in DOCUMENTS if doc.get("kind") in CRD_FILES]


def _doc_id(item: tuple[str, dict]) -> str:
    where, doc = item
    return f"{where}:{doc.get('kind')}/{doc.get('metadata', {}).get('name')}"


@functools.lru_cache(maxsize=None)
def _crd(kind: str) -> dict:
    return yaml.load((CRDS / CRD_FILES[kind]).read_text(encoding="utf-8"), Loader=_LOADER)


def crd_schema(kind: str, api_version: str) -> dict:
    """The openAPIV3Schema that the API server applies to `kind` at `api_version` (group/version)."""
    crd = _crd(kind)
    group, _, version = api_version.rpartition("/")
    assert group == crd["spec"]["group"], f"{kind} belongs to API group {crd['spec']['group']}, not {group!r}"
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{kind} has no version {version!r} (the CRD serves {sorted(versions)})"
    entry = versions[version]
    assert entry.get("served"), f"{api_version} {kind} is not served"
    assert not entry.get("deprecated"), f"{api_version} {kind} is deprecated; use the CRD's storage version"
    return entry["schema"]["openAPIV3Schema"]


def to_json_schema(node: object) -> object:
    """Kubernetes' OpenAPI v3 flavour as JSON Schema draft 4. jsonschema already ignores the x-kubernetes-*
    keywords and unknown formats (int32, int-or-string, ...); what needs rewriting is `nullable`, and
    int-or-string fields written without their anyOf."""
    if not isinstance(node, dict):
        return node
    out: dict = {}
    for key, value in node.items():
        if key in ("properties", "patternProperties"):
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not"):
            out[key] = [to_json_schema(s) for s in value] if isinstance(value, list) else to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(s) for s in value]
        else:
            out[key] = value
    if (node.get("x-kubernetes-int-or-string") or node.get("format") == "int-or-string") and "anyOf" not in out:
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable"):
        out = {"anyOf": [{"type": "null"}, out]}
    return out


@functools.lru_cache(maxsize=None)
def _validator(kind: str, api_version: str) -> jsonschema.Draft4Validator:
    return jsonschema.Draft4Validator(to_json_schema(crd_schema(kind, api_version)))


def schema_errors(document: dict) -> list[str]:
    validator = _validator(document["kind"], document["apiVersion"])
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.absolute_path])
    return [f"{'.'.join(str(p) for p in e.absolute_path) or '(top level)'}: {e.message}" for e in errors]


def unknown_fields(value: object, schema: dict, path: str = "") -> list[str]:
    """Keys the schema does not declare where it declares the others. A structural CRD schema never rejects
    them: the API server prunes them and the object is accepted without the setting, so a misspelt
    `shutdownAfterJobFinshes` would quietly leave the cluster running. Objects that take any key
    (additionalProperties, x-kubernetes-preserve-unknown-fields, or no properties listed) are not checked."""
    problems: list[str] = []
    if isinstance(value, dict):
        declared = schema.get("properties")
        extra = schema.get("additionalProperties")
        closed = (
            declared is not None and extra in (None, False) and not schema.get("x-kubernetes-preserve-unknown-fields")
        )
        implicit = {"apiVersion", "kind", "metadata"} if schema.get("x-kubernetes-embedded-resource") else set()
        for key, child in value.items():
            where = f"{path}.{key}" if path else str(key)
            if declared is not None and key in declared:
                problems += unknown_fields(child, declared[key], where)
            elif isinstance(extra, dict):
                problems += unknown_fields(child, extra, where)
            elif closed and key not in implicit:
                close = difflib.get_close_matches(str(key), list(declared), n=1)
                problems.append(f"{where}: unknown field" + (f" (did you mean {close[0]!r}?)" if close else ""))
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(value):
            problems += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return problems


def _job_specs(document: dict) -> list[dict]:
    """The RayJob specs in a document: a RayJob's own, or the one a RayCronJob stamps out."""
    if document["kind"] == "RayJob":
        return [document["spec"]]
    if document["kind"] == "RayCronJob":
        return [document["spec"]["jobTemplate"]]
    return []


def _cluster_specs(document: dict) -> list[dict]:
    if document["kind"] == "RayCluster":
        return [document["spec"]]
    return [spec["rayClusterSpec"] for spec in _job_specs(document) if "rayClusterSpec" in spec]


def _pod_specs(cluster: dict) -> list[dict]:
    return [cluster["headGroupSpec"]["template"]["spec"]] + [
        group["template"]["spec"] for group in cluster.get("workerGroupSpecs", [])
    ]


def _config_maps() -> dict[str, dict[str, str]]:
    return {doc["metadata"]["name"]: doc.get("data", {}) for _, doc in DOCUMENTS if doc.get("kind") == "ConfigMap"}


def _find(node: object, predicate):
    if isinstance(node, dict):
        if predicate(node):
            yield node
        for child in node.values():
            yield from _find(child, predicate)
    elif isinstance(node, list):
        for child in node:
            yield from _find(child, predicate)


def test_manifests_cover_the_nightly_job_and_a_backfill():
    kinds = [doc.get("kind") for _, doc in DOCUMENTS]
    assert "RayCronJob" in kinds and "RayJob" in kinds and "ConfigMap" in kinds, kinds
    for where, doc in DOCUMENTS:
        assert doc.get("apiVersion") and doc.get("kind") and doc.get("metadata", {}).get("name"), where
        assert doc["kind"] in {*CRD_FILES, "ConfigMap", "PodMonitor"}, f"{where}: no check here covers a {doc['kind']}"


# The PodMonitor fields this folder uses (Prometheus Operator's monitoring.coreos.com/v1): a misspelt one would
# be pruned by the API server and the pods silently not scraped.
PODMONITOR_FIELDS = {
    "spec": {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel"},
    "endpoint": {"port", "path", "interval", "scrapeTimeout", "relabelings", "metricRelabelings"},
    "relabeling": {"sourceLabels", "targetLabel", "regex", "replacement", "action", "separator"},
}
# KubeRay's name for the Ray container port of Ray's metrics agent (--metrics-export-port, 8080).
KUBERAY_METRICS_PORT = "metrics"


def test_pod_monitor_scrapes_every_ray_pod_of_the_manifests():
    monitors = [(where, doc) for where, doc in DOCUMENTS if doc.get("kind") == "PodMonitor"]
    assert monitors, "no PodMonitor: nothing tells Prometheus to scrape the pipeline's metrics"
    for where, monitor in monitors:
        assert monitor["apiVersion"] == "monitoring.coreos.com/v1", where
        spec = monitor["spec"]
        assert set(spec) <= PODMONITOR_FIELDS["spec"], f"{where}: {sorted(set(spec) - PODMONITOR_FIELDS['spec'])}"
        for endpoint in spec["podMetricsEndpoints"]:
            assert set(endpoint) <= PODMONITOR_FIELDS["endpoint"], where
            assert endpoint["port"] == KUBERAY_METRICS_PORT, where
            for relabeling in endpoint.get("relabelings", []):
                assert set(relabeling) <= PODMONITOR_FIELDS["relabeling"], where
        wanted = spec["selector"]["matchLabels"]
        # KubeRay labels every Ray pod with ray.io/is-ray-node; the rest must be on each pod template.
        ours = {k: v for k, v in wanted.items() if not k.startswith("ray.io/")}
        assert wanted.get("ray.io/is-ray-node") == "yes", where
        for doc_where, doc in RAY_DOCUMENTS:
            for cluster in _cluster_specs(doc):
                templates = [cluster["headGroupSpec"]["template"]] + [
                    g["template"] for g in cluster["workerGroupSpecs"]
                ]
                for template in templates:
                    labels = template.get("metadata", {}).get("labels", {})
                    assert ours.items() <= labels.items(), f"{doc_where}: a pod template lacks {ours}"
                    annotations = template["metadata"].get("annotations", {})
                    assert annotations.get("prometheus.io/scrape") == "true", doc_where


@pytest.mark.parametrize("item", RAY_DOCUMENTS, ids=_doc_id)
def test_manifest_matches_its_crd(item):
    where, document = item
    assert schema_errors(document) == [], where
    schema = crd_schema(document["kind"], document["apiVersion"])
    assert unknown_fields(document, schema) == [], where


def _dotted(path: tuple) -> str:
    return "".join(f"[{step}]" if isinstance(step, int) else f".{step}" for step in path).lstrip(".")


@pytest.mark.parametrize(
    "kind, parent, key, typo",
    [
        ("RayCronJob", ("spec", "jobTemplate"), "shutdownAfterJobFinishes", "shutdownAfterJobFinshes"),
        (
            "RayJob",
            ("spec", "rayClusterSpec", "workerGroupSpecs", 0, "template", "spec", "containers", 0),
            "envFrom",
            "envfrom",
        ),
    ],
)
def test_a_misspelt_field_is_caught(kind, parent, key, typo):
    document = copy.deepcopy(next(doc for _, doc in RAY_DOCUMENTS if doc["kind"] == kind))
    node = document
    for step in parent:
        node = node[step]
    node[typo] = node.pop(key)

    # The schema alone accepts it, as the API server would, after pruning the field:
    assert schema_errors(document) == []
    problems = unknown_fields(document, crd_schema(kind, document["apiVersion"]))
    assert problems == [f"{_dotted(parent)}.{typo}: unknown field (did you mean {key!r}?)"]


def test_a_wrong_type_is_caught():
    document = copy.deepcopy(next(doc for _, doc in RAY_DOCUMENTS if doc["kind"] == "RayCronJob"))
    template = document["spec"]["jobTemplate"]
    template["backoffLimit"] = "one"
    template["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"][
        "memory"
    ] = ["64Gi"]
    errors = schema_errors(document)
    assert any(e.startswith("spec.jobTemplate.backoffLimit:") for e in errors), errors
    assert any(".resources.limits.memory:" in e for e in errors), errors


def test_no_credentials_are_written_in_manifests():
    for where, doc in DOCUMENTS:
        assert doc.get("kind") != "Secret", f"{where}: Secrets are created by hand (infra/README.md), not committed"
        for env in _find(doc, lambda n: n.get("name") in CREDENTIAL_VARIABLES and "value" in n):
            pytest.fail(f"{where}: {env['name']} has a literal value; take it from a Secret")


def test_job_spec_in_the_configmap_is_valid():
    specs = {(name, key): text for name, data in _config_maps().items() for key, text in data.items()}
    assert specs, "no ConfigMap carries a job spec"
    for (name, key), text in specs.items():
        assert key.endswith((".yaml", ".yml")), f"ConfigMap {name}: {key} is not a job spec"
        job = JobConfig.model_validate(yaml.safe_load(text))
        assert job.output.mode == "resume", f"ConfigMap {name}/{key}: reruns must skip committed shards"
        # A ConfigMap is readable by anyone who can list the namespace: keys belong in the Secret.
        for section in ("input", "output", "model"):
            storage = job.storage_for(section)
            assert storage.access_key_id is None and storage.session_token is None, f"ConfigMap {name}/{key}"


@pytest.mark.parametrize("item", RAY_DOCUMENTS, ids=_doc_id)
def test_entrypoint_runs_the_cli_on_the_mounted_job_spec(item, tmp_path):
    where, document = item
    config_maps = _config_maps()
    for spec in _job_specs(document):
        argv = shlex.split(spec["entrypoint"])
        assert argv[0] == "llava-pipeline", f"{where}: {spec['entrypoint']}"
        try:
            args = build_parser().parse_args(argv[1:])
        except SystemExit:
            pytest.fail(f"{where}: the CLI rejects {spec['entrypoint']!r}")
        assert args.command in ("run", "retry-failed"), f"{where}: {args.command}"

        # Ray Jobs runs the driver on the head when the entrypoint asks for no resources: the job spec
        # must be mounted there.
        assert not any(spec.get(k) for k in ("entrypointNumCpus", "entrypointNumGpus", "entrypointResources"))
        head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
        volumes = {v["name"]: v for v in head.get("volumes", [])}
        mounted = {}
        for container in head["containers"]:
            for mount in container.get("volumeMounts", []):
                config_map = volumes.get(mount["name"], {}).get("configMap")
                if config_map:
                    for key in config_maps.get(config_map["name"], {}):
                        mounted[f"{mount['mountPath'].rstrip('/')}/{key}"] = config_maps[config_map["name"]][key]
        assert args.job in mounted, f"{where}: {args.job} is not a ConfigMap key mounted on the head ({mounted})"

        # The job as the command line makes it, overrides applied, must load.
        local = tmp_path / Path(args.job).name
        local.write_text(mounted[args.job], encoding="utf-8")
        load_job(local, inputs=args.input, output=args.output, model=args.model)


def test_ray_version_and_image_agree_with_constraints():
    pins = dict(line.split("==", 1) for line in (ROOT / "constraints.txt").read_text().splitlines() if "==" in line)
    ray_pin = pins["ray"].strip()
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text(encoding="utf-8")
    assert re.search(rf"^ARG RAY_VERSION={re.escape(ray_pin)}$", dockerfile, re.M), "infra/Dockerfile RAY_VERSION"

    images = set()
    for where, doc in RAY_DOCUMENTS:
        for cluster in _cluster_specs(doc):
            assert cluster.get("rayVersion") == ray_pin, f"{where}: rayVersion {cluster.get('rayVersion')}"
            for pod in _pod_specs(cluster):
                images.update(c["image"] for c in pod["containers"])
    assert len(images) == 1, f"head, workers and jobs must share one image, found {sorted(images)}"


@pytest.mark.parametrize("item", RAY_DOCUMENTS, ids=_doc_id)
def test_clusters_autoscale_far_enough_for_the_model_pool_at_its_maximum(item):
    """`stages.model.concurrency: [min, max]` grows only into pods Ray's autoscaler can add: every cluster
    runs KubeRay's in-tree autoscaler, and its GPU groups can hold the job spec's model pool at its maximum."""
    where, document = item
    jobs = [
        JobConfig.model_validate(yaml.safe_load(text)) for data in _config_maps().values() for text in data.values()
    ]
    for cluster in _cluster_specs(document):
        assert cluster.get("enableInTreeAutoscaling") is True, f"{where}: enableInTreeAutoscaling is not on"
        gpus = 0.0
        for group in cluster.get("workerGroupSpecs", []):
            assert group["minReplicas"] <= group["maxReplicas"], f"{where}: {group['groupName']}"
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            gpus += group["maxReplicas"] * float(limits.get("nvidia.com/gpu", 0))
        for job in jobs:
            model = job.stages.model
            most = model.concurrency if isinstance(model.concurrency, int) else model.concurrency[1]
            assert most * model.num_gpus <= gpus, f"{where}: {most} model actors need {most * model.num_gpus:g} GPUs"
