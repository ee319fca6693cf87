"""helm/gemmguard: lint, render and validate every profile and CI scenario; check what renders.

Runs the real helm and kubernetes-validate (`make tools` installs them). The Kubernetes schemas ship
inside kubernetes-validate, so validation needs no network. CRD kinds (LeaderWorkerSet,
ServiceMonitor, PrometheusRule) have no schema there: their pod templates are validated as Pods,
their rules by promtool in test_alerts.py, and the rest by the assertions below.
"""

from __future__ import annotations

import json
import re
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


# What an operator must add to a profile on the command line (the profile cannot know it).
PROFILE_SETTINGS = {"values-gfx950.yaml": ["--set", "gpu.deviceGroups={44,109}"]}


def _value_files(case: str) -> list[str]:
    """-f arguments for a profile, or for a CI scenario on top of SCENARIO_BASE."""
    if case in PROFILES:
        return ["-f", str(CHART / case), *PROFILE_SETTINGS.get(case, [])]
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
        "--selfcheck-policy", "fallback", "--selfcheck-refusal-linger", "600",
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
    # Without a limit a download fills the node's disk; with one the kubelet evicts just this pod.
    assert {"name": "cache", "emptyDir": {"sizeLimit": "200Gi"}} in pod["volumes"]

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


def _lws_pod_specs(manifests: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    template = _one(manifests, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    return {"leader": template["leaderTemplate"]["spec"],
            "worker": template["workerTemplate"]["spec"]}


# What LWS and the kubelet give a group's pods at run time: LWS's env, the downward API's values.
LWS_ENV = {"LWS_LEADER_ADDRESS": "llm-gemmguard-0.llm-gemmguard.llm", "LWS_GROUP_SIZE": "2"}
WORKER_INDEX = "metadata.labels['leaderworkerset.sigs.k8s.io/worker-index']"


def _process(pod_spec: dict[str, Any], worker_index: int) -> tuple[list[str], dict[str, str]]:
    """argv and environment of the server container's process, as the kubelet starts it."""
    container = _container(pod_spec)
    env = dict(LWS_ENV)
    for item in container.get("env", []):
        if "value" in item:
            env[item["name"]] = item["value"]
        elif "fieldRef" in item["valueFrom"]:
            path = item["valueFrom"]["fieldRef"]["fieldPath"]
            env[item["name"]] = {"status.podIP": f"10.0.0.{worker_index + 1}",
                                 WORKER_INDEX: str(worker_index)}[path]
        else:
            env[item["name"]] = "from-a-secret"
    # The kubelet expands $(VAR) from the container's environment in command and args.
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), arg)
            for arg in container["command"] + container["args"]]
    return argv, env


def test_multinode_runs_vllms_multiprocessing_executor_on_every_node() -> None:
    manifests = render(*_value_files("multinode-values.yaml"))
    assert "Deployment" not in [m["kind"] for m in manifests]
    lws = _one(manifests, "LeaderWorkerSet")
    assert lws["apiVersion"] == "leaderworkerset.x-k8s.io/v1"
    template = lws["spec"]["leaderWorkerTemplate"]
    assert template["size"] == 2
    assert template["restartPolicy"] == "RecreateGroupOnPodRestart"
    assert "ray" not in json.dumps(manifests).lower().replace("array", ""), "no Ray anywhere"

    specs = _lws_pod_specs(manifests)
    leader, worker = _container(specs["leader"]), _container(specs["worker"])
    for container in (leader, worker):
        assert container["command"] == ["gemmguard", "serve"]
        args = container["args"]
        assert args[args.index("--distributed-executor-backend") + 1] == "mp"
        assert args[args.index("--nnodes") + 1] == "2"
        assert args[args.index("--pipeline-parallel-size") + 1] == "2"
        assert args[args.index("--tensor-parallel-size") + 1] == "8"
        assert args[args.index("--master-addr") + 1] == "$(LWS_LEADER_ADDRESS)"
        assert args[args.index("--master-port") + 1] == "29501"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 8
    assert leader["args"][leader["args"].index("--node-rank") + 1] == "0"
    assert "--headless" not in leader["args"]
    assert worker["args"][worker["args"].index("--node-rank") + 1] == "$(GEMMGUARD_NODE_RANK)"
    assert "--headless" in worker["args"]
    assert "readinessProbe" not in worker, "workers serve no API"
    assert [p["name"] for p in worker["ports"]] == ["http"], "a worker's pod serves /metrics"

    services = {s["metadata"]["name"]: s for s in manifests if s["kind"] == "Service"}
    api = services.pop("llm-gemmguard")
    assert api["spec"]["selector"]["app.kubernetes.io/component"] == "leader"
    leader_labels = template["leaderTemplate"]["metadata"]["labels"]
    assert leader_labels["app.kubernetes.io/component"] == "leader"


def _selects(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def test_multinode_scrapes_every_pod_that_runs_a_rank_and_serves_the_api_from_leaders() -> None:
    manifests = render(*_value_files("multinode-values.yaml"))
    template = _one(manifests, "LeaderWorkerSet")["spec"]["leaderWorkerTemplate"]
    pods = {role: template[f"{role}Template"]["metadata"]["labels"]
            for role in ("leader", "worker")}
    services = [m for m in manifests if m["kind"] == "Service"]
    monitor = _one(manifests, "ServiceMonitor")
    scraped = [s for s in services
               if _selects(monitor["spec"]["selector"]["matchLabels"], s["metadata"]["labels"])]
    assert len(scraped) == 1, "one Service scraped: no pod twice"
    (metrics,) = scraped
    for role, labels in pods.items():
        assert _selects(metrics["spec"]["selector"], labels), f"{role} pods are not scraped"
    assert metrics["spec"]["clusterIP"] == "None" and metrics["spec"]["publishNotReadyAddresses"]
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == ["http"]
    # Requests go to leaders only: a worker has no API server.
    (api,) = [s for s in services if s is not metrics]
    assert _selects(api["spec"]["selector"], pods["leader"])
    assert not _selects(api["spec"]["selector"], pods["worker"])


def test_a_single_node_release_scrapes_its_api_service() -> None:
    manifests = render("--set", "metrics.serviceMonitor.enabled=true")
    (service,) = [m for m in manifests if m["kind"] == "Service"]
    monitor = _one(manifests, "ServiceMonitor")
    assert _selects(monitor["spec"]["selector"]["matchLabels"], service["metadata"]["labels"])


def _vllm_parse(argv: list[str]) -> Any:
    """vLLM's own `serve` parser on `argv`: the options must exist in the installed vLLM."""
    from gemmguard import vllm_adapter

    parser_cls = vllm_adapter.flexible_argument_parser()
    parser = parser_cls(prog="gemmguard serve")
    subparsers = parser.add_subparsers(dest="subparser", parser_class=parser_cls)
    vllm_adapter.serve_subcommand()().subparser_init(subparsers)
    return parser.parse_args(["serve", *argv])


def test_gemmguard_settings_reach_the_processes_of_every_node() -> None:
    from conftest import free_port
    from gemmguard.serve_plan import plan_serve

    manifests = render(
        *_value_files("multinode-values.yaml"),
        "--set", f"engine.port={free_port()}",
        "--set", "gemmguard.selfcheckPolicy=fail",
        "--set", "gemmguard.denyKernels={DeepGemmFp8BlockScaledMMKernel}",
        "--set", "gemmguard.perLayerMetrics=false",
        "--set", "engine.env[0].name=GEMMGUARD_CANARY_INTERVAL",
        "--set-string", "engine.env[0].value=15",
    )  # fmt: skip
    specs = _lws_pod_specs(manifests)
    plans = {}
    for role, index in (("leader", 0), ("worker", 1)):
        argv, env = _process(specs[role], index)
        assert argv[:2] == ["gemmguard", "serve"]
        # `gemmguard serve` turns its options into the environment of the vLLM processes it starts
        # (API server, engine core, workers): the plan is what they inherit.
        plans[role] = plan_serve(argv[2:], environ=env)

    def gemmguard_env(role: str) -> dict[str, str]:
        return {k: v for k, v in plans[role].env.items()
                if k.startswith("GEMMGUARD_") and k != "GEMMGUARD_NODE_RANK"
                or k in ("VLLM_PLUGINS", "VLLM_DISABLED_KERNELS")}

    worker_env = gemmguard_env("worker")
    assert worker_env == gemmguard_env("leader")
    assert worker_env["GEMMGUARD_SELFCHECK_POLICY"] == "fail"
    assert worker_env["GEMMGUARD_DENY_KERNELS"] == "DeepGemmFp8BlockScaledMMKernel"
    assert "DeepGemmFp8BlockScaledMMKernel" in worker_env["VLLM_DISABLED_KERNELS"]
    assert worker_env["GEMMGUARD_PER_LAYER_METRICS"] == "0"
    assert worker_env["GEMMGUARD_CANARY_INTERVAL"] == "15"
    assert worker_env["GEMMGUARD_STATE_DIR"] == "/var/lib/gemmguard"
    assert "gemmguard" in worker_env["VLLM_PLUGINS"].split(",")

    for role, index in (("leader", 0), ("worker", 1)):
        plan = plans[role]
        parsed = _vllm_parse([plan.model, *plan.vllm_args])
        assert parsed.headless is (role == "worker")
        assert (parsed.nnodes, parsed.node_rank) == (2, index)
        assert parsed.master_addr == LWS_ENV["LWS_LEADER_ADDRESS"]
        assert parsed.distributed_executor_backend == "mp"
        assert parsed.worker_extension_cls == plans["leader"].vllm_args[
            plans["leader"].vllm_args.index("--worker-extension-cls") + 1]


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


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    return [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]


def test_dashboard_configmap_carries_the_kernel_panels() -> None:
    manifests = render("--set", "dashboard.enabled=true")
    configmap = _one(manifests, "ConfigMap")
    assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(configmap["data"]["gemmguard.json"])
    shipped = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert shipped == _dashboard_exprs()
    metrics = {m for e in shipped for m in re.findall(r"\b(gemmguard_[a-z_]+)", e)}
    for metric in (
        "gemmguard_kernel_layers",
        "gemmguard_kernel_fallback_total",
        "gemmguard_selfcheck_passed",
        "gemmguard_selfcheck_layers",
        "gemmguard_engine_fix_info",
        "gemmguard_canary_failures_total",
        "gemmguard_server_restarts_total",
        "gemmguard_selfcheck_refusals_total",
    ):
        assert metric in metrics, f"the dashboard has no panel on {metric}"


def test_dashboard_queries_name_series_that_exist() -> None:
    from test_alerts import CONTRACT_METRICS

    histograms = {"gemmguard_canary_latency_seconds"}
    # Written once when the engine loads, i.e. born at their final value: increase()/rate() read 0.
    born_at_final_value = {"gemmguard_kernel_fallback_total", "gemmguard_selfcheck_refusals_total"}
    for expr in _dashboard_exprs():
        for name in re.findall(r"\b(gemmguard_[a-z_]+)", expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            if base in histograms:
                # A histogram has no series under its bare name: only _bucket, _sum, _count.
                assert name != base, f"{expr!r} queries the histogram {base} by its bare name"
                assert "histogram_quantile" in expr or name.endswith(("_sum", "_count"))
            else:
                assert name in CONTRACT_METRICS, f"{expr!r} names {name}, which nothing exports"
            if name in born_at_final_value:
                assert not re.search(rf"(increase|rate|irate)\(\s*{name}", expr), (
                    f"{expr!r}: {name} is born at its final value, so its increase is always 0")


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


@pytest.mark.parametrize("case", ["values.yaml", *PROFILES, *SCENARIOS])
def test_pods_request_cpu_and_memory(case: str) -> None:
    # A pod without requests is BestEffort: the first the kubelet evicts under memory pressure.
    manifests = render(*([] if case == "values.yaml" else _value_files(case)))
    specs = _server_pods(manifests) + [
        s for m in manifests if m["kind"] == "LeaderWorkerSet"
        for s in [m["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]]
    ]
    for spec in specs:
        requests = _container(spec)["resources"].get("requests", {})
        assert {"cpu", "memory"} <= set(requests), f"{case}: requests {requests}"


@pytest.mark.parametrize("case", ["values.yaml", *PROFILES, *SCENARIOS])
def test_counters_persist_in_a_pod_lifetime_volume(case: str) -> None:
    manifests = render(*([] if case == "values.yaml" else _value_files(case)))
    specs = _server_pods(manifests) + [
        m["spec"]["leaderWorkerTemplate"]["workerTemplate"]["spec"]
        for m in manifests if m["kind"] == "LeaderWorkerSet"
    ]
    for spec in specs:
        container = _container(spec)
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volume = next(v for v in spec["volumes"] if v["name"] == mounts[env["GEMMGUARD_STATE_DIR"]])
        # emptyDir: lives through container restarts, dies with the pod (not a shared claim).
        assert set(volume) == {"name", "emptyDir"} and volume["emptyDir"].get("medium") != "Memory"


def test_amd_gpus_need_the_device_groups_from_values() -> None:
    result = _run([tool("helm"), "template", "llm", str(CHART),
                   "-f", str(CHART / "values-gfx950.yaml")])
    assert result.returncode != 0
    assert "gpu.deviceGroups" in result.stderr and "getent group video render" in result.stderr
    (pod,) = _server_pods(render(*_value_files("values-gfx950.yaml")))
    assert pod["securityContext"]["supplementalGroups"] == [44, 109]
    (pod,) = _server_pods(render("--set", "gpu.deviceGroups={39}"))
    assert pod["securityContext"]["supplementalGroups"] == [39]


def test_refusal_linger_stays_inside_the_startup_budget() -> None:
    # The refusing server answers /gemmguard/ready with 503; the kubelet must not kill it first.
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    startup = values["probes"]["startup"]
    linger = values["gemmguard"]["selfcheckRefusalLinger"]
    assert 0 < linger < startup["periodSeconds"] * startup["failureThreshold"]
    (pod,) = _server_pods(render("--set", "gemmguard.selfcheckRefusalLinger=0"))
    args = _container(pod)["args"]
    assert args[args.index("--selfcheck-refusal-linger") + 1] == "0"


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
        "prometheusRule.alertFor.GemmguardCanaryFailing=soon",
        "prometheusRule.alertFor.GemmguardTypo=1m",
        "gpu.deviceGroups={video}",
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


HPA_METRICS = ('autoscaling.metrics=[{"type": "Pods", "pods": {"metric": {"name": '
               '"vllm_num_requests_waiting"}, "target": {"type": "AverageValue", '
               '"averageValue": "5"}}}]')


@pytest.mark.parametrize(
    ("settings", "accepted"),
    [
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=4"], False),
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=1"], True),
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=4",
          "--set", "persistence.accessModes={ReadWriteMany}"], True),
        (["--set", "autoscaling.enabled=true", "--set", "autoscaling.maxReplicas=4",
          "--set", "persistence.accessModes={ReadWriteOncePod}"], False),
        (["--set", "replicaCount=2"], False),
        (["--set", "replicaCount=2", "--set", "persistence.accessModes={ReadWriteMany}"], True),
        (["--set", "multiNode.enabled=true"], False),
        (["--set", "multiNode.enabled=true", "--set", "persistence.accessModes={ReadWriteMany}"],
         True),
    ],
)
def test_schema_rejects_several_pods_on_one_readwriteonce_claim(
    settings: list[str], accepted: bool
) -> None:
    args = ["--set", "persistence.enabled=true", "--set-json", HPA_METRICS, *settings]
    result = _run([tool("helm"), "template", "llm", str(CHART), *args])
    if accepted:
        assert result.returncode == 0, result.stderr
    else:
        assert result.returncode != 0, f"{settings} was accepted"
        assert "don't meet the specifications of the schema" in result.stderr, result.stderr
    # Without a claim the pods share nothing: any count is fine.
    result = _run([tool("helm"), "template", "llm", str(CHART), "--set-json", HPA_METRICS,
                   *settings])
    assert result.returncode == 0, result.stderr


def test_alert_for_durations_come_from_values() -> None:
    rule = _one(render("--set", "prometheusRule.enabled=true",
                       "--set", "prometheusRule.alertFor.GemmguardCanaryFailing=7s"),
                "PrometheusRule")
    durations = {r["alert"]: r["for"] for g in rule["spec"]["groups"] for r in g["rules"]}
    assert durations["GemmguardCanaryFailing"] == "7s"
    values = yaml.safe_load((CHART / "values.yaml").read_text())["prometheusRule"]["alertFor"]
    shipped = yaml.safe_load((CHART / "files" / "alerts.yaml").read_text())
    in_file = {r["alert"]: r["for"] for g in shipped["groups"] for r in g["rules"]}
    # promtool's unit tests run on files/alerts.yaml: its durations must be the shipped defaults.
    assert values == in_file
