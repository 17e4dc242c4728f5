"""deploy/k8s: every manifest validates offline, the overlay composes, and the objects agree with each other."""

from __future__ import annotations

import argparse
import copy
import importlib
import pathlib
import re
import shutil
import subprocess
import urllib.parse
from typing import Any

import kubernetes_validate
import pytest
import yaml

from projections import registry
from projections.base import Projection
from projections.reactor import Reactor
from store import errors
from tests.deploy import crds
from tests.deploy.support import (
    BASE,
    OVERLAY,
    ROOT,
    SYNTHETIC,
    Doc,
    by_kind,
    compose,
    containers,
    exported_series_names,
    key,
    kustomization,
    load_docs,
    metric_names,
    patch_targets,
    pod_spec,
    resource_files,
    selects,
)
from workers import cli
from workers.config import Settings

#: The oldest Kubernetes minor these manifests support, and the newest the validator knows.
K8S_VERSIONS = ("1.28", kubernetes_validate.latest_version())
#: Custom resources: kubernetes-validate has no schema for them; tests/deploy/crds.py has a minimal one.
CUSTOM_KINDS = set(crds.SCHEMAS)

SOURCE_DOCS = [
    (f"{path.relative_to(ROOT / 'deploy' / 'k8s')}:{doc['kind']}/{doc['metadata']['name']}", doc)
    for path in sorted({*resource_files(BASE), *resource_files(OVERLAY)})
    for doc in load_docs(path)
]


def kubectl_kustomize(directory: pathlib.Path) -> list[Doc]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed: the Python composition is checked without it")
    out = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60,
                         check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def validate(doc: Doc) -> None:
    """Against the Kubernetes schemas (strict: unknown fields fail), or ours for custom resources."""
    if (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
        crds.validate(doc)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(doc, version, strict=True)


@pytest.mark.parametrize(("source", "doc"), SOURCE_DOCS, ids=[s for s, _ in SOURCE_DOCS])
def test_every_source_manifest_validates(source: str, doc: Doc) -> None:
    validate(doc)


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_every_composed_manifest_validates(directory: pathlib.Path) -> None:
    for doc in compose(directory):
        validate(doc)


def test_the_validators_reject_what_admission_would() -> None:
    """Guards against a validator that silently accepts everything."""
    deployment = next(d for _, d in SOURCE_DOCS if d["kind"] == "Deployment")
    typo = copy.deepcopy(deployment)
    typo["spec"]["replica"] = 2
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(typo, K8S_VERSIONS[0], strict=True)
    wrong_type = copy.deepcopy(deployment)
    wrong_type["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "30"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSIONS[0], strict=True)
    scaled = copy.deepcopy(next(d for _, d in SOURCE_DOCS if d["kind"] == "ScaledObject"))
    scaled["spec"]["triggers"][0]["metadata"]["threshold"] = 1000
    with pytest.raises(crds.ValidationError):
        crds.validate(scaled)


def test_kubernetes_validate_has_no_schema_for_our_custom_kinds() -> None:
    """If it ever gains one, use it instead of crds.py."""
    kinds = {(d["apiVersion"], d["kind"]) for _, d in SOURCE_DOCS}
    assert kinds >= CUSTOM_KINDS
    for api_version, kind in CUSTOM_KINDS:
        with pytest.raises(kubernetes_validate.SchemaNotFoundError):
            kubernetes_validate.validate({"apiVersion": api_version, "kind": kind, "metadata": {"name": "x"}},
                                         K8S_VERSIONS[-1], strict=True)


# --- composition ---


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_kustomization_lists_existing_files_and_nothing_is_forgotten(directory: pathlib.Path) -> None:
    k = kustomization(directory)
    assert k["apiVersion"] == "kustomize.config.k8s.io/v1beta1"
    assert k["kind"] == "Kustomization"
    listed = set()
    for entry in k.get("resources", []):
        path = (directory / entry).resolve()
        assert path.is_file() or (path / "kustomization.yaml").is_file(), entry
        listed.add(path)
    for patch in k.get("patches", []):
        assert ("path" in patch) != ("patch" in patch), patch
        if "path" in patch:
            assert (directory / patch["path"]).is_file(), patch["path"]
            listed.add((directory / patch["path"]).resolve())
    on_disk = {p.resolve() for p in directory.rglob("*.yaml") if p.name != "kustomization.yaml"}
    on_disk -= {p for p in on_disk if any(parent in listed for parent in p.parents)}
    assert on_disk <= listed, f"manifests not listed in {directory}/kustomization.yaml: {on_disk - listed}"


def test_overlay_patches_and_images_target_existing_objects() -> None:
    base = compose(BASE)
    k = kustomization(OVERLAY)
    for patch in k["patches"]:
        assert patch_targets(OVERLAY, patch, base), f"patch matches nothing: {patch}"
    images = {c["image"] for d in base for c in containers(d)}
    for image in k["images"]:
        assert image["name"] in images


def test_composition_leaves_names_unique() -> None:
    docs = compose(OVERLAY)
    keys = [key(d) for d in docs]
    assert len(keys) == len(set(keys))


@pytest.mark.parametrize("directory", [BASE, OVERLAY], ids=["base", "overlay"])
def test_kubectl_kustomize_renders_what_the_python_composition_does(directory: pathlib.Path) -> None:
    rendered = kubectl_kustomize(directory)
    for doc in rendered:
        validate(doc)
    assert sorted(rendered, key=key) == sorted(compose(directory), key=key)


def test_overlay_composes_the_patched_values() -> None:
    docs = {key(d): d for d in compose(OVERLAY)}
    orders = docs["ScaledObject", "eventfleet-worker-orders"]
    assert orders["spec"]["maxReplicaCount"] == 12
    for name in ("eventfleet-worker-orders", "eventfleet-worker-customers"):
        address = docs["ScaledObject", name]["spec"]["triggers"][0]["metadata"]["serverAddress"]
        assert address == "http://kube-prometheus-stack-prometheus.monitoring.svc:9090"
    assert docs["ServiceMonitor", "eventfleet"]["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    worker = docs["Deployment", "eventfleet-worker-orders"]["spec"]["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["memory"] == "512Mi"
    assert worker["livenessProbe"]["httpGet"]["path"] == "/healthz"  # merged, not replaced
    for doc in docs.values():
        for container in containers(doc):
            assert container["image"] == "registry.example.com/eventfleet:0.1.0"


# --- the objects agree with each other and with the program (overlay = what gets deployed) ---


@pytest.fixture(scope="module")
def deployed() -> dict[tuple[str, str], Doc]:
    return {key(d): d for d in compose(OVERLAY)}


def workloads(deployed: dict[tuple[str, str], Doc]) -> list[Doc]:
    return [d for d in deployed.values() if pod_spec(d) is not None]


def config(deployed: dict[tuple[str, str], Doc]) -> dict[str, str]:
    data: dict[str, str] = deployed["ConfigMap", "eventfleet-config"]["data"]
    return data


def test_everything_lives_in_one_namespace(deployed: dict[tuple[str, str], Doc]) -> None:
    namespaces = {d["metadata"].get("namespace") for d in deployed.values() if d["kind"] != "Namespace"}
    assert namespaces == {deployed["Namespace", "eventfleet"]["metadata"]["name"]}


def test_the_configmap_is_a_valid_configuration(deployed: dict[tuple[str, str], Doc]) -> None:
    secret = deployed["Secret", "eventfleet-urls"]["stringData"]
    for url in DATABASE_URL_KEYS.values():
        env = {**config(deployed), "EVENTFLEET_DATABASE_URL": secret[url], "EVENTFLEET_AMQP_URL": secret["amqp-url"]}
        settings = Settings.from_env(env)
        assert settings.http_port == 9108
    with pytest.raises(errors.ConfigError):  # the check above can fail
        Settings.from_env({**env, "EVENTFLEET_SCHEMA": "not a schema"})


def test_no_worker_group_scales_beyond_the_partitions(deployed: dict[tuple[str, str], Doc]) -> None:
    # A worker beyond P would hold no partition: it would only cost a pod and a rebalance.
    partitions = Settings.from_env(config(deployed)).partitions
    assert partitions is not None
    scaled = {obj["metadata"]["name"]: obj["spec"]["maxReplicaCount"]
              for obj in by_kind(list(deployed.values()), "ScaledObject")}
    assert scaled
    assert {name: n for name, n in scaled.items() if n > partitions} == {}


def test_every_reference_from_a_pod_resolves(deployed: dict[tuple[str, str], Doc]) -> None:
    for workload in workloads(deployed):
        for container in containers(workload):
            for source in container.get("envFrom", []):
                assert ("ConfigMap", source["configMapRef"]["name"]) in deployed
            for var in container.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in deployed["Secret", ref["name"]]["stringData"], var
            names = {v["name"] for v in container.get("env", [])}
            assert len(names) == len(container.get("env", []))
            mounts = {m["name"] for m in container.get("volumeMounts", [])}
            assert mounts <= {v["name"] for v in pod_spec(workload)["volumes"]}  # type: ignore[index]


def test_every_container_runs_a_real_command(deployed: dict[tuple[str, str], Doc]) -> None:
    parser = cli.build_parser()
    for workload in workloads(deployed):
        for container in containers(workload):
            assert "command" not in container, "the image's entrypoint is eventfleet"
            args = parser.parse_args(container["args"])
            assert isinstance(args, argparse.Namespace)


def test_pods_are_restricted(deployed: dict[tuple[str, str], Doc]) -> None:
    """The Pod Security Standard "restricted", which the Namespace enforces."""
    namespace = deployed["Namespace", "eventfleet"]["metadata"]["labels"]
    assert namespace["pod-security.kubernetes.io/enforce"] == "restricted"
    for workload in workloads(deployed):
        spec = pod_spec(workload)
        assert spec is not None
        assert spec["securityContext"]["runAsNonRoot"] is True
        assert spec["securityContext"]["runAsUser"] == 10001  # the image's USER
        assert spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
        assert spec["automountServiceAccountToken"] is False
        assert "hostNetwork" not in spec
        assert "hostPID" not in spec
        for container in containers(workload):
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            assert "privileged" not in context
            for kind in ("requests", "limits"):
                assert set(container["resources"][kind]) == {"cpu", "memory"}, workload["metadata"]["name"]


def test_long_running_pods_probe_the_http_server(deployed: dict[tuple[str, str], Doc]) -> None:
    port = int(config(deployed)["EVENTFLEET_HTTP_PORT"])
    for deployment in by_kind(list(deployed.values()), "Deployment"):
        (container,) = containers(deployment)
        (declared,) = container["ports"]
        assert declared == {"name": "metrics", "containerPort": port, "protocol": "TCP"}
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_grace_period_exceeds_the_stop_bound(deployed: dict[tuple[str, str], Doc]) -> None:
    stop_timeout = Settings.from_env(config(deployed)).stop_timeout
    assert stop_timeout == 10
    for deployment in by_kind(list(deployed.values()), "Deployment"):
        assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= stop_timeout + 10


def worker_projections(deployment: Doc) -> list[str]:
    args = cli.build_parser().parse_args(containers(deployment)[0]["args"])
    assert args.command == "worker"
    projections: list[str] = args.projection
    return projections


def worker_deployments(deployed: dict[tuple[str, str], Doc]) -> list[Doc]:
    return [d for d in by_kind(list(deployed.values()), "Deployment")
            if d["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/component"] == "worker"]


def loaded_projections(deployed: dict[tuple[str, str], Doc]) -> dict[str, type[Projection]]:
    """The projections the ConfigMap's modules declare, by name (read from the modules, not the process's
    registry, which other tests change)."""
    found: dict[str, type[Projection]] = {}
    registered = dict(registry.REGISTRY)
    try:
        for name in config(deployed)["EVENTFLEET_PROJECTION_MODULES"].split(","):
            module = importlib.import_module(name)
            found.update({obj.name: obj for obj in vars(module).values() if isinstance(obj, type)
                          and issubclass(obj, Projection) and obj.__module__ == module.__name__})
    finally:  # importing a module registers its projections for every later test of this process: undone
        registry.REGISTRY.clear()
        registry.REGISTRY.update(registered)
    return found


def test_each_registered_projection_runs_in_exactly_one_worker_group(deployed: dict[tuple[str, str], Doc]) -> None:
    deployed_projections = [p for d in worker_deployments(deployed) for p in worker_projections(d)]
    loaded = loaded_projections(deployed)
    assert sorted(deployed_projections) == sorted(loaded)
    assert any(issubclass(cls, Reactor) for cls in loaded.values()), "the example's reactor runs too"
    for deployment in worker_deployments(deployed):
        assert worker_projections(deployment), "no --projection runs every projection: name them"


def literal_env(workload: Doc) -> dict[str, str]:
    """The variables its container sets to a literal value."""
    (container,) = containers(workload)
    return {v["name"]: v["value"] for v in container.get("env", []) if "value" in v}


def test_each_worker_deployment_is_the_worker_group_of_its_label_and_the_relay_declares_one(
        deployed: dict[tuple[str, str], Doc]) -> None:
    labels = [d["spec"]["template"]["metadata"]["labels"]["eventfleet.io/projection-group"]
              for d in worker_deployments(deployed)]
    groups = [literal_env(d).get("EVENTFLEET_GROUP", "(unset)") for d in worker_deployments(deployed)]
    assert groups == labels
    assert len(set(groups)) == len(groups)  # two Deployments in one group would split its read models' feed
    for group in groups:
        assert Settings.from_env({**config(deployed), "EVENTFLEET_GROUP": group}).group == group
    # Its queues exist from the relay's start: the partitions exchange routes from the first publish.
    assert literal_env(deployed["Deployment", "eventfleet-relay"])["EVENTFLEET_GROUP"] in groups
    # Per Deployment, never shared: a worker of the ConfigMap's group would feed another group's read models.
    assert "EVENTFLEET_GROUP" not in config(deployed)


def test_relay_and_migrate_job(deployed: dict[tuple[str, str], Doc]) -> None:
    relay = deployed["Deployment", "eventfleet-relay"]
    assert relay["spec"]["replicas"] == 2
    assert containers(relay)[0]["args"] == ["relay"]
    job = deployed["Job", "eventfleet-migrate"]
    assert containers(job)[0]["args"] == ["migrate", "--roles"]
    assert job["spec"]["template"]["spec"]["restartPolicy"] == "OnFailure"
    assert job["spec"]["ttlSecondsAfterFinished"] > 0  # so the next deploy can re-create it
    assert job["metadata"]["annotations"]["argocd.argoproj.io/hook"] == "PreSync"


#: The Secret key of the Postgres URL each kind of pod logs in with: its role's login (migrate-job.yaml).
DATABASE_URL_KEYS = {"migrate": "owner-database-url", "relay": "relay-database-url",
                     "worker": "worker-database-url", "reactor": "reactor-database-url"}


def database_url_key(workload: Doc) -> str:
    (container,) = containers(workload)
    (ref,) = [v["valueFrom"]["secretKeyRef"] for v in container["env"] if v["name"] == "EVENTFLEET_DATABASE_URL"]
    assert ref["name"] == "eventfleet-urls"
    key_: str = ref["key"]
    return key_


def test_each_pod_logs_in_as_the_least_privileged_role_it_needs(deployed: dict[tuple[str, str], Doc]) -> None:
    """Only the migrate Job is the owner (and it grants the roles); each Deployment logs in as its role's login."""
    loaded = loaded_projections(deployed)
    expected = {("Job", "eventfleet-migrate"): DATABASE_URL_KEYS["migrate"],
                ("Deployment", "eventfleet-relay"): DATABASE_URL_KEYS["relay"]}
    for deployment in worker_deployments(deployed):
        reacts = any(issubclass(loaded[p], Reactor) for p in worker_projections(deployment))
        expected[key(deployment)] = DATABASE_URL_KEYS["reactor" if reacts else "worker"]
    assert {key(w): database_url_key(w) for w in workloads(deployed)} == expected
    assert sorted(expected.values()).count(DATABASE_URL_KEYS["reactor"]) == 1, "the reactors have a group of their own"
    secret = deployed["Secret", "eventfleet-urls"]["stringData"]
    users = {k: urllib.parse.urlsplit(secret[k]).username for k in DATABASE_URL_KEYS.values()}
    assert len(set(users.values())) == len(users), f"one login per role: {users}"


def test_selectors_pick_exactly_their_pods(deployed: dict[tuple[str, str], Doc]) -> None:
    pods = {d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"] for d in workloads(deployed)}
    for deployment in by_kind(list(deployed.values()), "Deployment"):
        chosen = [n for n, labels in pods.items() if selects(deployment["spec"]["selector"]["matchLabels"], labels)]
        assert chosen == [deployment["metadata"]["name"]]
    for pdb in by_kind(list(deployed.values()), "PodDisruptionBudget"):
        chosen = [n for n, labels in pods.items() if selects(pdb["spec"]["selector"]["matchLabels"], labels)]
        assert chosen == [pdb["metadata"]["name"]], pdb["metadata"]["name"]
    assert {p["metadata"]["name"] for p in by_kind(list(deployed.values()), "PodDisruptionBudget")} == {
        d["metadata"]["name"] for d in by_kind(list(deployed.values()), "Deployment")}
    service = deployed["Service", "eventfleet"]
    scraped = sorted(n for n, labels in pods.items() if selects(service["spec"]["selector"], labels))
    assert scraped == sorted(d["metadata"]["name"] for d in by_kind(list(deployed.values()), "Deployment"))


def test_servicemonitor_scrapes_the_service_with_the_alert_labels(deployed: dict[tuple[str, str], Doc]) -> None:
    monitor = deployed["ServiceMonitor", "eventfleet"]
    service = deployed["Service", "eventfleet"]
    assert selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "eventfleet"  # job="eventfleet"
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in {p["name"] for p in service["spec"]["ports"]}
    assert endpoint["path"] == "/metrics"
    pod_labels = {k for d in workloads(deployed) for k in d["spec"]["template"]["metadata"]["labels"]}
    targets = {}
    for relabel in endpoint["relabelings"]:
        (source,) = relabel["sourceLabels"]
        label = source.removeprefix("__meta_kubernetes_pod_label_")
        assert label in {re.sub(r"[^a-zA-Z0-9_]", "_", k) for k in pod_labels}, source
        targets[relabel["targetLabel"]] = label
    assert targets["component"] == "app_kubernetes_io_component"


def test_scaledobjects_scale_each_worker_group_on_its_own_lag(deployed: dict[tuple[str, str], Doc]) -> None:
    namespace = deployed["Namespace", "eventfleet"]["metadata"]["name"]
    exported = exported_series_names()
    scaled = by_kind(list(deployed.values()), "ScaledObject")
    assert sorted(s["spec"]["scaleTargetRef"]["name"] for s in scaled) == sorted(
        d["metadata"]["name"] for d in worker_deployments(deployed))
    for obj in scaled:
        target = deployed["Deployment", obj["spec"]["scaleTargetRef"]["name"]]
        assert "replicas" not in target["spec"], "the HPA owns the count; apply must not reset it"
        assert obj["spec"]["minReplicaCount"] >= 1, "the workers export the lag: never scale to zero"
        assert obj["spec"]["maxReplicaCount"] > obj["spec"]["minReplicaCount"]
        (trigger,) = obj["spec"]["triggers"]
        query = trigger["metadata"]["query"]
        assert metric_names(query) == {"eventfleet_projection_lag_events"}
        assert set(metric_names(query)) <= set(exported)
        assert f'namespace="{namespace}"' in query, "kustomize does not rewrite queries: patch them"
        assert 'job="eventfleet"' in query
        regex = re.search(r'projection=~"([^"]*)"', query)
        assert regex is not None
        assert sorted(regex.group(1).split("|")) == sorted(worker_projections(target))
        validate(equivalent_hpa(obj))


def equivalent_hpa(obj: Doc) -> Doc:
    """The HPA KEDA creates for a ScaledObject: validates the behavior block against Kubernetes' schema."""
    spec = obj["spec"]
    metadata: dict[str, Any] = trigger_metadata(obj)
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": f"keda-hpa-{obj['metadata']['name']}"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                               "name": spec["scaleTargetRef"]["name"]},
            "minReplicas": spec["minReplicaCount"],
            "maxReplicas": spec["maxReplicaCount"],
            "behavior": spec["advanced"]["horizontalPodAutoscalerConfig"]["behavior"],
            "metrics": [{"type": "External", "external": {
                "metric": {"name": "s0-prometheus"},
                "target": {"type": "AverageValue", "averageValue": metadata["threshold"]}}}],
        },
    }


def trigger_metadata(obj: Doc) -> dict[str, Any]:
    metadata: dict[str, Any] = obj["spec"]["triggers"][0]["metadata"]
    return metadata


def test_queries_in_manifests_use_only_exported_metrics(deployed: dict[tuple[str, str], Doc]) -> None:
    exported = set(exported_series_names()) | SYNTHETIC
    for obj in by_kind(list(deployed.values()), "ScaledObject"):
        assert metric_names(trigger_metadata(obj)["query"]) <= exported


def test_the_migrate_phase_is_self_sufficient(deployed: dict[tuple[str, str], Doc]) -> None:
    """`kubectl apply -l eventfleet.io/phase=migrate` (README) creates the Job and all it needs, nothing more."""
    phase = {k for k, d in deployed.items() if d["metadata"].get("labels", {}).get("eventfleet.io/phase") == "migrate"}
    job = deployed["Job", "eventfleet-migrate"]
    (container,) = containers(job)
    needs = {("Job", "eventfleet-migrate"), ("Namespace", job["metadata"]["namespace"])}
    needs |= {("ConfigMap", s["configMapRef"]["name"]) for s in container["envFrom"]}
    needs |= {("Secret", v["valueFrom"]["secretKeyRef"]["name"]) for v in container["env"] if "valueFrom" in v}
    assert phase == needs
