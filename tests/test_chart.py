"""helm/gemmguard: lint, render and validate every profile and CI scenario; check what renders.

Runs the real helm and kubernetes-validate (`make tools` installs them). The Kubernetes schemas ship
inside kubernetes-validate, so validation needs no network. CRD kinds (LeaderWorkerSet,
ServiceMonitor, PrometheusRule) have no schema there: their pod templates are validated as Pods,
their rules by promtool in test_alerts.py, and the rest by the assertions below.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from conftest import tool

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10, which pyproject.toml still allows
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "gemmguard"
PROFILES = sorted(p.name for p in CHART.glob("values-*.yaml"))
SCENARIOS = sorted(p.name for p in (CHART / "ci").glob("*-values.yaml"))
KUBERNETES_VERSION = "1.31.0"

# Each CI scenario is rendered on top of this profile, as an operator would combine them.
SCENARIO_BASE = "values-blackwell.yaml"
GPU_RESOURCE = {
    "values-blackwell.yaml": "nvidia.com/gpu",
    "values-ampere.yaml": "nvidia.com/gpu",
    "values-gfx950.yaml": "amd.com/gpu",
    "values-cpu.yaml": None,
}


def _run(args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        args, input=stdin, capture_output=True, text=True, timeout=120, check=False
    )


def _value_files(case: str) -> list[str]:
    """-f arguments for a profile, or for a CI scenario on top of SCENARIO_BASE."""
    if case in PROFILES:
        return ["-f", str(CHART / case)]
    return ["-f", str(CHART / SCENARIO_BASE), "-f", str(CHART / "ci" / case)]


def _template_text(*args: str) -> str:
    result = _run([tool("helm"), "template", "llm", str(CHART), *args])
    assert result.returncode == 0, f"helm template {' '.join(args)} failed:\n{result.stderr}"
    return result.stdout


def render(*args: str) -> list[dict[str, Any]]:
    """`helm template llm <chart> ARGS` as a list of manifests."""
    return [doc for doc in yaml.safe_load_all(_template_text(*args)) if doc]


def _one(manifests: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [m for m in manifests if m["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, rendered {[m['kind'] for m in manifests]}"
    return found[0]


def _server_pods(manifests: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Pod specs that serve the API: the Deployment's, or the LeaderWorkerSet leader's."""
    specs = [m["spec"]["template"]["spec"] for m in manifests if m["kind"] == "Deployment"]
    specs += [
        m["spec"]["leaderWorkerTemplate"]["leaderTemplate"]["spec"]
        for m in manifests
        if m["kind"] == "LeaderWorkerSet"
    ]
    assert specs, "no Deployment or LeaderWorkerSet rendered"
    return specs


def _container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    (container,) = [c for c in pod_spec["containers"] if c["name"] == "gemmguard"]
    return container


# --- lint and Kubernetes schema validation ---------------------------------------------------


def test_default_values_lint() -> None:
    result = _run([tool("helm"), "lint", "--strict", str(CHART)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", PROFILES + SCENARIOS)
def test_lint(case: str) -> None:
    result = _run([tool("helm"), "lint", "--strict", str(CHART), *_value_files(case)])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("case", ["values.yaml", *PROFILES, *SCENARIOS])
def test_rendered_manifests_are_valid_kubernetes(case: str) -> None:
    manifests = render(*([] if case == "values.yaml" else _value_files(case)))
    # kubernetes-validate has no schema for the LeaderWorkerSet CRD: check its pods as Pods.
    for lws in (m for m in manifests if m["kind"] == "LeaderWorkerSet"):
        for role in ("leaderTemplate", "workerTemplate"):
            template = lws["spec"]["leaderWorkerTemplate"][role]
            manifests.append(
                {
                    "apiVersion": "v1",
                    "kind": "Pod",
                    "metadata": {"name": f"lws-{role.lower()}", **template["metadata"]},
                    "spec": template["spec"],
                }
            )
    stream = yaml.safe_dump_all(manifests)
    result = _run(
        [tool("kubernetes-validate"), "--strict", "-k", KUBERNETES_VERSION, "-"], stdin=stream
    )
    assert result.returncode == 0, (
        f"kubernetes-validate failed for {case}:\n{result.stdout}{result.stderr}"
    )


# --- what the server pod looks like ----------------------------------------------------------


@pytest.mark.parametrize("case", PROFILES + SCENARIOS)
def test_probes_gate_on_the_selfcheck(case: str) -> None:
    for pod in _server_pods(render(*_value_files(case))):
        container = _container(pod)
        assert container["startupProbe"]["httpGet"]["path"] == "/gemmguard/ready"
        assert container["readinessProbe"]["httpGet"]["path"] == "/gemmguard/ready"
        assert container["livenessProbe"]["httpGet"]["path"] in {"/health", "/gemmguard/live"}
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        assert budget >= 3600, f"start-up budget {budget} s is too short for a large model's load"


def test_liveness_can_use_the_canary() -> None:
    (pod,) = _server_pods(render("--set", "probes.liveness.path=/gemmguard/live"))
    assert _container(pod)["livenessProbe"]["httpGet"]["path"] == "/gemmguard/live"


@pytest.mark.parametrize("case", PROFILES + SCENARIOS)
def test_runs_non_root_with_read_only_root(case: str) -> None:
    for pod in _server_pods(render(*_value_files(case))):
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["runAsUser"] != 0
        context = _container(pod)["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"]["drop"] == ["ALL"]
        mounts = {m["mountPath"]: m["name"] for m in _container(pod)["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        for path in ("/cache", "/tmp", "/home/gemmguard", "/dev/shm"):
            assert path in mounts, f"{path} must be a writable volume under a read-only root"
        assert volumes[mounts["/dev/shm"]]["emptyDir"]["medium"] == "Memory"


@pytest.mark.parametrize("profile", PROFILES)
def test_gpu_request_follows_the_profile(profile: str) -> None:
    assert set(GPU_RESOURCE) == set(PROFILES), "add the new profile to GPU_RESOURCE"
    (pod,) = _server_pods(render(*_value_files(profile), "--set", "engine.tensorParallelSize=4"))
    limits = _container(pod)["resources"].get("limits", {})
    expected = GPU_RESOURCE[profile]
    gpu_keys = {k for k in limits if k.endswith("/gpu")}
    if expected is None:
        assert gpu_keys == set(), f"{profile} must request no GPU, got {limits}"
    else:
        assert gpu_keys == {expected}
        assert limits[expected] == 4, "the GPU request follows engine.tensorParallelSize"


def test_gpu_count_overrides_tensor_parallel_size() -> None:
    (pod,) = _server_pods(
        render(
            "--set",
            "engine.tensorParallelSize=2",
            "--set",
            "gpu.count=4",
            "--set",
            "resources.requests.memory=1Gi",
        )
    )
    resources = _container(pod)["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == 4
    # Kubernetes requires requests == limits for extended resources when both are given.
    assert resources["requests"]["nvidia.com/gpu"] == 4


def test_image_tag_defaults_to_app_version_and_pyproject() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert chart["appVersion"] == project["version"], (
        "Chart appVersion must be the gemmguard version"
    )
    (pod,) = _server_pods(render())
    assert _container(pod)["image"].endswith(f":{chart['appVersion']}")
    (pod,) = _server_pods(render("--set", "image.digest=sha256:" + "a" * 64))
    assert _container(pod)["image"].endswith("@sha256:" + "a" * 64)


def test_serve_arguments() -> None:
    (pod,) = _server_pods(render())
    container = _container(pod)
    assert container["command"] == ["gemmguard", "serve"]
    assert container["args"] == [
        "--host", "0.0.0.0", "--port", "8000", "--tensor-parallel-size", "1",
        "--selfcheck-policy", "fallback",
    ]  # fmt: skip
    (pod,) = _server_pods(
        render(
            "--set",
            "engine.model=Qwen/Qwen3-0.6B",
            "--set",
            "gemmguard.selfcheckPolicy=fail",
            "--set",
            "gemmguard.denyKernels={KernelA,KernelB}",
            "--set",
            "gemmguard.perLayerMetrics=false",
            "--set",
            "engine.extraArgs={--max-model-len=4096,--enforce-eager}",
        )  # fmt: skip
    )
    args = _container(pod)["args"]
    assert args[0] == "Qwen/Qwen3-0.6B", "the model is the positional argument of gemmguard serve"
    assert args[args.index("--selfcheck-policy") + 1] == "fail"
    assert [args[i + 1] for i, a in enumerate(args) if a == "--deny-kernel"] == [
        "KernelA",
        "KernelB",
    ]
    assert "--no-per-layer-metrics" in args
    assert args[-2:] == ["--max-model-len=4096", "--enforce-eager"], "extraArgs go last, unchanged"


def test_secrets_are_referenced_not_copied() -> None:
    manifests = render(
        "--set", "apiKey.existingSecret=api", "--set", "huggingface.existingSecret=hf"
    )  # fmt: skip
    assert not [m for m in manifests if m["kind"] == "Secret"]
    (pod,) = _server_pods(manifests)
    env = {e["name"]: e for e in _container(pod)["env"]}
    assert env["VLLM_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "api", "key": "api-key"}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf", "key": "token"}
    test_pod = next(m for m in manifests if m["kind"] == "Pod")
    (curl,) = test_pod["spec"]["containers"]
    assert curl["env"][0]["name"] == "VLLM_API_KEY", "helm test must authenticate too"


def test_cache_volume_is_a_claim_only_with_persistence() -> None:
    manifests = render()
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    (pod,) = _server_pods(manifests)
    assert {"name": "cache", "emptyDir": {}} in pod["volumes"]

    manifests = render("--set", "persistence.enabled=true")
    pvc = _one(manifests, "PersistentVolumeClaim")
    assert "storageClassName" not in pvc["spec"], "null storageClass means the cluster default"
    (pod,) = _server_pods(manifests)
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"]["claimName"] == pvc["metadata"]["name"]

    manifests = render(
        "--set", "persistence.enabled=true", "--set", "persistence.existingClaim=models"
    )
    assert not [m for m in manifests if m["kind"] == "PersistentVolumeClaim"]
    (pod,) = _server_pods(manifests)
    cache = next(v for v in pod["volumes"] if v["name"] == "cache")
    assert cache["persistentVolumeClaim"]["claimName"] == "models"


def test_selector_labels_are_minimal() -> None:
    manifests = render("--set", "podLabels.team=ml")
    deployment = _one(manifests, "Deployment")
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector == {"app.kubernetes.io/name": "gemmguard", "app.kubernetes.io/instance": "llm"}
    assert deployment["spec"]["template"]["metadata"]["labels"]["team"] == "ml"
    assert _one(manifests, "Service")["spec"]["selector"] == selector
    assert _one(manifests, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector


# --- optional objects ------------------------------------------------------------------------


def test_defaults_leave_optional_objects_off() -> None:
    kinds = {m["kind"] for m in render()}
    assert kinds == {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "Pod"}


def test_multinode_renders_a_leaderworkerset_running_ray() -> None:
    manifests = render(*_value_files("multinode-values.yaml"))
    kinds = [m["kind"] for m in manifests]
    assert "Deployment" not in kinds
    lws = _one(manifests, "LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"

    leader = _container(template["leaderTemplate"]["spec"])
    script = leader["command"][2]
    assert "ray start --head --port=6379" in script
    assert 'exec gemmguard serve "$@"' in script
    args = leader["args"]
    assert args[args.index("--distributed-executor-backend") + 1] == "ray"
    assert args[args.index("--pipeline-parallel-size") + 1] == "2"
    assert args[args.index("--tensor-parallel-size") + 1] == "8"

    worker = _container(template["workerTemplate"]["spec"])
    assert 'ray start --address="${LWS_LEADER_ADDRESS}:6379" --block' in worker["command"][2]
    assert "readinessProbe" not in worker, "workers run Ray only; they serve no API"
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 8

    service = _one(manifests, "Service")
    assert service["spec"]["selector"]["app.kubernetes.io/component"] == "leader"
    assert (
        template["leaderTemplate"]["metadata"]["labels"]["app.kubernetes.io/component"] == "leader"
    )


def test_full_observability_renders_every_optional_object() -> None:
    manifests = render(*_value_files("full-observability-values.yaml"))
    kinds = {m["kind"] for m in manifests}
    assert {
        "ServiceMonitor", "PrometheusRule", "ConfigMap", "HorizontalPodAutoscaler",
        "NetworkPolicy", "PersistentVolumeClaim",
    } <= kinds  # fmt: skip
    monitor = _one(manifests, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["endpoints"][0]["path"] == "/metrics"
    hpa = _one(manifests, "HorizontalPodAutoscaler")
    assert "replicas" not in _one(manifests, "Deployment")["spec"], "the HPA owns the replica count"
    assert hpa["spec"]["scaleTargetRef"]["kind"] == "Deployment"


def test_prometheus_rule_ships_the_alerts_file_unchanged() -> None:
    manifests = render("--set", "prometheusRule.enabled=true")
    rule = _one(manifests, "PrometheusRule")
    alerts = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    assert rule["spec"] == alerts


def test_prometheus_rule_runbook_url_is_configurable() -> None:
    url = "https://wiki.example.com/gemmguard/RUNBOOK.md"
    rule = _one(
        render("--set", "prometheusRule.enabled=true", "--set", f"prometheusRule.runbookUrl={url}"),
        "PrometheusRule",
    )
    urls = [r["annotations"]["runbook_url"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert urls and all(u.startswith(url + "#") for u in urls), urls


def test_dashboard_configmap_carries_the_kernel_panels() -> None:
    manifests = render("--set", "dashboard.enabled=true")
    configmap = _one(manifests, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["gemmguard.json"])
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p.get("targets", []))
    for metric in (
        "gemmguard_kernel_layers",
        "gemmguard_kernel_fallback_total",
        "gemmguard_selfcheck_passed",
        "gemmguard_selfcheck_layers",
        "gemmguard_engine_fix_info",
    ):
        assert metric in exprs, f"the dashboard has no panel on {metric}"


def test_hpa_without_metrics_is_refused() -> None:
    result = _run(
        [tool("helm"), "template", "llm", str(CHART), "--set", "autoscaling.enabled=true"]
    )
    assert result.returncode != 0
    assert "autoscaling.metrics" in result.stderr


def test_helm_test_hook_sends_a_chat_completion() -> None:
    pod = next(m for m in render() if m["kind"] == "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (container,) = pod["spec"]["containers"]
    repository, tag = container["image"].rsplit(":", 1)
    assert tag[0].isdigit(), f"the test image must be pinned, got {container['image']}"
    script = container["command"][-1]
    assert "/v1/models" in script and "/v1/chat/completions" in script


def test_notes_print_port_forward_and_curl(tmp_path: Path) -> None:
    # `helm template` never renders NOTES.txt and `helm install --dry-run` needs a cluster, so
    # render it through tpl inside a copy of the chart.
    chart = tmp_path / "gemmguard"
    shutil.copytree(CHART, chart)
    (chart / "files" / "notes.txt").write_text((CHART / "templates" / "NOTES.txt").read_text())
    (chart / "templates" / "notes-under-test.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: notes\n"
        'data:\n  notes: {{ tpl (.Files.Get "files/notes.txt") . | toJson }}\n'
    )
    result = _run(
        [
            tool("helm"),
            "template",
            "llm",
            str(chart),
            "--show-only",
            "templates/notes-under-test.yaml",
        ]
    )
    assert result.returncode == 0, result.stderr
    notes = yaml.safe_load(result.stdout)["data"]["notes"]
    assert "kubectl --namespace default port-forward svc/llm-gemmguard 8000:8000" in notes
    assert "curl http://127.0.0.1:8000/v1/models" in notes


# --- values schema ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "replicaCount=abc",
        "gemmguard.selfcheckPolicy=sometimes",
        "image.bogus=1",
        "probes.liveness.path=/v1/models",
        "engine.tensorParallelSize=0",
        "typo=1",
    ],
)
def test_schema_rejects_bad_values(setting: str) -> None:
    result = _run([tool("helm"), "template", "llm", str(CHART), "--set", setting])
    assert result.returncode != 0, f"--set {setting} was accepted"
    assert "don't meet the specifications of the schema" in result.stderr, result.stderr


def test_schema_is_generated_from_values_yaml() -> None:
    result = _run([sys.executable, str(ROOT / "scripts" / "chart_schema.py"), "--check"])
    assert result.returncode == 0, result.stderr


def test_schema_documents_every_property() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(values)

    def walk(node: dict[str, Any], path: str) -> None:
        for key, prop in node.get("properties", {}).items():
            for field in ("description", "type", "default"):
                assert field in prop, f"values.schema.json: '{path}{key}' has no {field}"
            if "properties" in prop:
                assert prop.get("additionalProperties") is False, f"'{path}{key}' must be closed"
                walk(prop, f"{path}{key}.")

    walk(schema, "")


@pytest.mark.parametrize("case", PROFILES + SCENARIOS)
def test_value_files_fit_the_schema(case: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    directory = CHART if case in PROFILES else CHART / "ci"
    jsonschema.Draft7Validator(schema).validate(yaml.safe_load((directory / case).read_text()))
