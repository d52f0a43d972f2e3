"""Every manifest is valid: built-in kinds against the Kubernetes schemas (offline, strict), our custom
resources against the openAPIV3Schema of our own CRDs, Gateway API / Istio objects against the fields we
use; each overlay builds with kustomize and holds together (names, labels, ports, RBAC); the EPP flags
parse; the generated files (EPP config, Envoy configs, llm-d CRDs) are current and Envoy accepts them."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from epp.cli import parse_args
from epp.scheduling.config import load_config
from epp.stack.envoy import envoy_binary

ROOT = Path(__file__).resolve().parents[2]
MANIFESTS = ROOT / "manifests"
K8S_VERSIONS = ("1.32.0", kubernetes_validate.latest_version())  # oldest we document, newest known
NOT_OBJECTS = {"kustomization.yaml", "envoy-gateway-values.yaml"}
OVERLAYS = sorted(p.name for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())

Obj = dict[str, Any]

# The Gateway API and Istio fields our manifests use (no offline schema ships for them): unknown fields
# are refused, so a typo cannot pass.
_NAME = {"type": "string", "minLength": 1, "maxLength": 253}
_META = {"type": "object", "required": ["name"], "properties": {"name": _NAME, "namespace": _NAME,
                                                                 "labels": {"type": "object"},
                                                                 "annotations": {"type": "object"}},
         "additionalProperties": False}


def _kind(api_version: str, kind: str, spec: Obj) -> Obj:
    return {"type": "object", "required": ["apiVersion", "kind", "metadata", "spec"], "additionalProperties": False,
            "properties": {"apiVersion": {"const": api_version}, "kind": {"const": kind}, "metadata": _META,
                           "spec": spec}}


def _strict(required: list[str], **props: Obj) -> Obj:
    return {"type": "object", "required": required, "properties": props, "additionalProperties": False}


_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
GATEWAY_API = {
    ("gateway.networking.k8s.io/v1", "GatewayClass"): _strict(["controllerName"], controllerName=_NAME),
    ("gateway.networking.k8s.io/v1", "Gateway"): _strict(
        ["gatewayClassName", "listeners"], gatewayClassName=_NAME,
        listeners={"type": "array", "minItems": 1, "items": _strict(
            ["name", "port", "protocol"], name=_NAME, port=_PORT,
            protocol={"enum": ["HTTP", "HTTPS", "TLS", "TCP", "UDP"]}, hostname=_NAME)}),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): _strict(
        ["parentRefs", "rules"], hostnames={"type": "array"},
        parentRefs={"type": "array", "items": _strict(["name"], group=_NAME, kind=_NAME, name=_NAME,
                                                       namespace=_NAME, sectionName=_NAME, port=_PORT)},
        rules={"type": "array", "items": _strict(
            [], matches={"type": "array", "items": _strict([], path=_strict(
                ["type", "value"], type={"enum": ["Exact", "PathPrefix", "RegularExpression"]},
                value={"type": "string"}))},
            backendRefs={"type": "array", "items": _strict(["name"], group={"type": "string"}, kind=_NAME,
                                                            name=_NAME, namespace=_NAME, port=_PORT,
                                                            weight={"type": "integer", "minimum": 0})},
            timeouts=_strict([], request={"type": "string", "pattern": r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"},
                             backendRequest={"type": "string"}))}),
    ("networking.istio.io/v1", "DestinationRule"): _strict(
        ["host"], host=_NAME, trafficPolicy=_strict([], tls=_strict(
            ["mode"], mode={"enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]},
            insecureSkipVerify={"type": "boolean"}, caCertificates={"type": "string"}, sni=_NAME))),
}


def crd_schemas() -> dict[tuple[str, str], Obj]:
    out = {}
    for path in (MANIFESTS / "crds").rglob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") != "CustomResourceDefinition":
            continue
        for version in doc["spec"]["versions"]:
            out[(f"{doc['spec']['group']}/{version['name']}", doc["spec"]["names"]["kind"])] = \
                version["schema"]["openAPIV3Schema"]
    return out


CRDS = crd_schemas()


def validate(doc: Obj, where: str) -> str:
    """Validate one object; returns which schema judged it."""
    key = (doc.get("apiVersion", ""), doc.get("kind", ""))
    if key in CRDS:
        jsonschema.validate(doc, CRDS[key])
        return "crd"
    if key in GATEWAY_API:
        jsonschema.validate(doc, _kind(*key, GATEWAY_API[key]))
        return "gateway-api"
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            pytest.fail(f"{where}: no schema for {key}: add one or do not ship it")
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{where}: invalid {key[1]} for Kubernetes {version}: {e.message} at "
                        f"{'/'.join(map(str, e.path))}")
    return "kubernetes"


def manifest_files() -> list[Path]:
    return sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name not in NOT_OBJECTS)


@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_manifest_file_is_valid(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs, f"{path} holds no object"
    for doc in docs:
        validate(doc, str(path.relative_to(MANIFESTS)))


def test_schemas_catch_mistakes():
    pool = yaml.safe_load((MANIFESTS / "base/pool/inferencepool.yaml").read_text())
    bad = {**pool, "spec": {**pool["spec"], "targetPorts": [{"number": 0}]}}
    with pytest.raises(jsonschema.ValidationError):
        validate(bad, "bad pool")
    route = yaml.safe_load((MANIFESTS / "gateways/httproute/httproute.yaml").read_text())
    route["spec"]["rules"][0]["backendRef"] = route["spec"]["rules"][0].pop("backendRefs")  # a typo
    with pytest.raises(jsonschema.ValidationError):
        validate(route, "bad route")


def test_crd_files_are_valid_crds():
    assert set(CRDS) == {("inference.networking.k8s.io/v1", "InferencePool"),
                         ("inference.networking.x-k8s.io/v1alpha2", "InferenceObjective"),
                         ("inference.networking.x-k8s.io/v1alpha2", "InferenceModelRewrite"),
                         ("llm-d.ai/v1alpha2", "InferenceObjective"), ("llm-d.ai/v1alpha2", "InferenceModelRewrite")}
    for schema in CRDS.values():
        jsonschema.Draft7Validator.check_schema(schema)


def _render_module():
    spec = importlib.util.spec_from_file_location("manifests_render", MANIFESTS / "render.py")
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_generated_files_are_current():
    render = _render_module()
    stale = [str(p.relative_to(MANIFESTS)) for p, text in render.rendered().items()
             if not p.exists() or p.read_text() != text]
    assert not stale, f"run `python manifests/render.py`: out of date: {stale}"


@pytest.mark.parametrize("variant", ["fail-closed", "fail-open"])
def test_envoy_accepts_the_rendered_configs(tmp_path, variant):
    cm = yaml.safe_load((MANIFESTS / f"gateways/envoy/{variant}/envoy.yaml").read_text())
    path = tmp_path / "envoy.yaml"
    path.write_text(cm["data"]["envoy.yaml"])
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(path), "--disable-hot-restart"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    config = yaml.safe_load(cm["data"]["envoy.yaml"])
    ext_proc = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"][
        "http_filters"][1]["typed_config"]
    assert ext_proc["failure_mode_allow"] is (variant == "fail-open")


def kustomize(path: Path) -> list[Obj]:
    kubectl = shutil.which("kubectl")
    if kubectl:
        argv = [kubectl, "kustomize", str(path)]
    elif shutil.which("kustomize"):
        argv = [shutil.which("kustomize") or "kustomize", "build", str(path)]
    else:
        pytest.skip("neither kubectl nor kustomize is installed")
    out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def by_kind(docs: list[Obj], kind: str) -> dict[str, Obj]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_builds_and_holds_together(overlay):
    docs = kustomize(MANIFESTS / "overlays" / overlay)
    for doc in docs:
        validate(doc, f"overlays/{overlay}: {doc['kind']}/{doc['metadata']['name']}")
    deployments, services = by_kind(docs, "Deployment"), by_kind(docs, "Service")
    configmaps, pools = by_kind(docs, "ConfigMap"), by_kind(docs, "InferencePool")

    # EPP: flags parse, config loads, the pool and Service it serves exist, probes hit its health port.
    epp = deployments["epp"]["spec"]["template"]["spec"]
    container = epp["containers"][0]
    cfg = parse_args(container["args"])  # SystemExit on a flag EPP does not know
    assert cfg.pool_name in pools and cfg.config_file.startswith("/etc/epp/")
    load_config(configmaps["epp-config"]["data"][Path(cfg.config_file).name])
    assert container["readinessProbe"]["grpc"]["port"] == cfg.grpc_health_port
    ports = {p["containerPort"] for p in container["ports"]}
    assert {cfg.grpc_port, cfg.grpc_health_port, cfg.metrics_port} <= ports
    ref = pools[cfg.pool_name]["spec"]["endpointPickerRef"]
    assert ref["port"]["number"] in {p["port"] for p in services[ref["name"]]["spec"]["ports"]}
    assert cfg.ha_enable_leader_election == (deployments["epp"]["spec"]["replicas"] > 1)

    # Every Service selects pods that some Deployment runs; every ConfigMap volume exists.
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments.values()), f"Service {name} selects nothing"
    for name, d in deployments.items():
        for vol in d["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps, f"{name}: missing ConfigMap"
    # The pool selects the model-server pods, on the port they serve.
    pool = pools["vllm"]["spec"]
    servers = [d for d in deployments.values()
               if pool["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
    assert servers and all({p["number"] for p in pool["targetPorts"]} <= {
        p["containerPort"] for c in s["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
        for s in servers)
    # Routes point at this pool.
    for route in by_kind(docs, "HTTPRoute").values():
        for rule in route["spec"]["rules"]:
            assert [b["name"] for b in rule["backendRefs"] if b["kind"] == "InferencePool"] == ["vllm"]

    # RBAC: namespaced, read-only but for the Lease, bound to EPP's service account.
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = by_kind(docs, "Role")
    for role in roles.values():
        for rule in role["rules"]:
            allowed = {"get", "create", "update"} if rule["resources"] == ["leases"] else {"get", "list", "watch"}
            assert set(rule["verbs"]) <= allowed, rule
    for binding in by_kind(docs, "RoleBinding").values():
        assert binding["roleRef"]["name"] in roles
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": epp["serviceAccountName"]}]
    assert any(r["resources"] == ["leases"] for role in roles.values() for r in role["rules"]) \
        == cfg.ha_enable_leader_election


def test_crds_build():
    docs = kustomize(MANIFESTS / "crds")
    assert len(docs) == 5 and all(d["kind"] == "CustomResourceDefinition" for d in docs)


def test_model_server_commands_parse():
    from sim.__main__ import build_parser

    sim = yaml.safe_load((MANIFESTS / "model-servers/sim/deployment.yaml").read_text())
    container = sim["spec"]["template"]["spec"]["containers"][0]
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert container["command"] == ["epp-sim"] and "epp-sim" in scripts
    args = build_parser().parse_args(container["args"])
    assert args.base_port == 8000 and args.host == "0.0.0.0"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
