"""Every manifest is valid: built-in kinds against the Kubernetes schemas (offline, strict), our custom
resources against the openAPIV3Schema of our own CRDs, Gateway API / Istio / Envoy Gateway / kgateway /
cert-manager objects against the fields we use; each overlay builds with kustomize and holds together
(names, labels, ports, RBAC, certificates, network policy, header stripping, a locked-down container);
the EPP flags parse; the generated files (EPP config, Envoy configs, llm-d CRDs) are current and Envoy
accepts them."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from epp import tls
from epp.cli import parse_args
from epp.pools import POOL_HEADER, PoolSpec, parse_pools
from epp.scheduling.config import BUILTIN_CONFIGS, load_config
from epp.stack.envoy import POLICY_FILTER, STRIP_FILTER, STRIPPED_REQUEST_HEADERS, envoy_binary

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


def _list(items: Obj, min_items: int = 0) -> Obj:
    return {"type": "array", "items": items, "minItems": min_items}


_PORT = {"type": "integer", "minimum": 1, "maximum": 65535}
_HEADER_NAME = {"type": "string", "pattern": r"^[A-Za-z0-9!#$%&'*+\-.^_\x60|~]+$", "maxLength": 256}
_HEADER_FILTER = _strict([], remove=_list(_HEADER_NAME, 1), set=_list(_strict(["name", "value"], name=_HEADER_NAME,
                                                                              value={"type": "string"})),
                         add=_list(_strict(["name", "value"], name=_HEADER_NAME, value={"type": "string"})))
_GATEWAY_TARGETS = _list(_strict(["group", "kind", "name"], group={"const": "gateway.networking.k8s.io"},
                                 kind={"const": "Gateway"}, name=_NAME, sectionName=_NAME), 1)
_DURATION = {"type": "string", "pattern": r"^([0-9]+(\.[0-9]+)?(h|m|s|ms))+$"}
# cert-manager's CRD schemas are large (the Certificate's alone is ~60 KB): not vendored. Instead the
# fields we use, strictly, with the enums of cert-manager.io/v1 (KeyUsage, PrivateKeyAlgorithm, ...).
_CM_USAGES = ["signing", "digital signature", "content commitment", "key encipherment", "key agreement",
              "data encipherment", "cert sign", "crl sign", "encipher only", "decipher only", "any", "server auth",
              "client auth", "code signing", "email protection", "s/mime", "ipsec end system", "ipsec tunnel",
              "ipsec user", "timestamping", "ocsp signing", "microsoft sgc", "netscape sgc"]
CERT_MANAGER = {
    ("cert-manager.io/v1", "Issuer"): {
        **_strict([], selfSigned=_strict([]), ca=_strict(["secretName"], secretName=_NAME)),
        "minProperties": 1, "maxProperties": 1},  # exactly one issuer type
    ("cert-manager.io/v1", "Certificate"): _strict(
        ["secretName", "issuerRef"], secretName=_NAME, isCA={"type": "boolean"},
        commonName={"type": "string", "minLength": 1, "maxLength": 64}, dnsNames=_list(_NAME, 1),
        usages=_list({"enum": _CM_USAGES}, 1), duration=_DURATION, renewBefore=_DURATION,
        privateKey=_strict([], algorithm={"enum": ["RSA", "ECDSA", "Ed25519"]}, size={"type": "integer"},
                           encoding={"enum": ["PKCS1", "PKCS8"]}, rotationPolicy={"enum": ["Never", "Always"]}),
        issuerRef=_strict(["name"], name=_NAME, kind={"enum": ["Issuer", "ClusterIssuer"]},
                          group={"const": "cert-manager.io"})),
}
# KEDA's ScaledObject (keda.sh/v1alpha1), the fields we use, with KEDA's types: trigger metadata is a map of
# strings (a number there is refused by KEDA's CRD), replica counts and periods are integers.
_COUNT = {"type": "integer", "minimum": 0}
_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
KEDA = {
    ("keda.sh/v1alpha1", "ScaledObject"): _strict(
        ["scaleTargetRef", "triggers"],
        scaleTargetRef=_strict(["name"], name=_NAME, apiVersion={"type": "string"}, kind={"type": "string"},
                               envSourceContainerName={"type": "string"}),
        pollingInterval=_COUNT, cooldownPeriod=_COUNT, initialCooldownPeriod=_COUNT, idleReplicaCount=_COUNT,
        minReplicaCount=_COUNT, maxReplicaCount={"type": "integer", "minimum": 1},
        triggers=_list({"allOf": [
            _strict(["type", "metadata"], type={"type": "string", "minLength": 1}, name=_NAME, metadata=_STRINGS,
                    metricType={"enum": ["AverageValue", "Value", "Utilization"]},
                    authenticationRef=_strict(["name"], name=_NAME, kind={"enum": ["TriggerAuthentication",
                                                                               "ClusterTriggerAuthentication"]})),
            {"if": {"properties": {"type": {"const": "prometheus"}}},
             "then": {"properties": {"metadata": {"required": ["serverAddress", "query", "threshold"]}}}}]}, 1)),
}
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
    # No insecureSkipVerify: EPP's certificate is verified.
    ("networking.istio.io/v1", "DestinationRule"): _strict(
        ["host"], host=_NAME, trafficPolicy=_strict([], tls=_strict(
            ["mode"], mode={"enum": ["DISABLE", "SIMPLE", "MUTUAL", "ISTIO_MUTUAL"]},
            caCertificates={"type": "string"}, credentialName=_NAME, subjectAltNames=_list(_NAME, 1), sni=_NAME))),
    ("networking.istio.io/v1alpha3", "EnvoyFilter"): _strict(
        ["configPatches"], workloadSelector=_strict(["labels"], labels={"type": "object", "minProperties": 1}),
        configPatches=_list(_strict(
            ["applyTo", "patch"], applyTo={"enum": ["HTTP_FILTER", "NETWORK_FILTER", "LISTENER", "CLUSTER"]},
            match=_strict([], context={"enum": ["ANY", "SIDECAR_INBOUND", "SIDECAR_OUTBOUND", "GATEWAY"]},
                          listener={"type": "object"}),
            patch=_strict(["operation", "value"], value={"type": "object"}, operation={"enum": [
                "MERGE", "ADD", "REMOVE", "INSERT_BEFORE", "INSERT_AFTER", "INSERT_FIRST", "REPLACE"]})), 1)),
    ("gateway.envoyproxy.io/v1alpha1", "ClientTrafficPolicy"): _strict(
        ["targetRefs"], targetRefs=_GATEWAY_TARGETS, headers=_strict([], earlyRequestHeaders=_HEADER_FILTER)),
    ("gateway.kgateway.dev/v1alpha1", "ListenerPolicy"): _strict(
        ["targetRefs"], targetRefs=_GATEWAY_TARGETS,
        default=_strict([], httpSettings=_strict([], earlyRequestHeaderModifier=_HEADER_FILTER))),
    **CERT_MANAGER,
    **KEDA,
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
    if key[1] == "EndpointPickerConfig":  # an example configuration (examples/): EPP itself is the schema
        load_config(yaml.safe_dump(doc))
        return "epp-config"
    if key in CRDS:
        jsonschema.validate(doc, CRDS[key])
        return "crd"
    if key in GATEWAY_API:
        jsonschema.validate(doc, _kind(*key, GATEWAY_API[key]))
        return "cert-manager" if key in CERT_MANAGER else "gateway-api"
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
    rule = yaml.safe_load((MANIFESTS / "gateways/istio/destinationrule.yaml").read_text())
    rule["spec"]["trafficPolicy"]["tls"]["insecureSkipVerify"] = True
    with pytest.raises(jsonschema.ValidationError):
        validate(rule, "unverified DestinationRule")
    certs = list(yaml.safe_load_all((MANIFESTS / "cert-manager/certificates.yaml").read_text()))
    for mistake in ({"usages": ["server-auth"]}, {"secretNmae": "x"}, {"duration": "90d"},
                    {"issuerRef": {"name": "epp-ca", "kind": "Issuers"}}):
        with pytest.raises(jsonschema.ValidationError):
            validate({**certs[0], "spec": {**certs[0]["spec"], **mistake}}, "bad Certificate")
    issuer = {"apiVersion": "cert-manager.io/v1", "kind": "Issuer", "metadata": {"name": "x"},
              "spec": {"selfSigned": {}, "ca": {"secretName": "y"}}}
    with pytest.raises(jsonschema.ValidationError):
        validate(issuer, "two issuer types")
    policy = yaml.safe_load((MANIFESTS / "gateways/envoy-gateway/clienttrafficpolicy.yaml").read_text())
    policy["spec"]["headers"]["earlyRequestHeaders"]["remove"].append("bad header")
    with pytest.raises(jsonschema.ValidationError):
        validate(policy, "bad ClientTrafficPolicy")
    netpol = yaml.safe_load((MANIFESTS / "base/epp/networkpolicy.yaml").read_text())
    netpol["spec"]["ingress"][0]["form"] = netpol["spec"]["ingress"][0].pop("from")  # a typo: open to all
    with pytest.raises(pytest.fail.Exception):
        validate(netpol, "bad NetworkPolicy")


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


@pytest.mark.parametrize("variant", ["fail-closed", "fail-open", "two-pools"])
def test_envoy_accepts_the_rendered_configs(tmp_path, variant):
    render = _render_module()
    cm = yaml.safe_load((MANIFESTS / f"gateways/envoy/{variant}/envoy.yaml").read_text())
    # The ConfigMap's files and the certificate Secret's, where the paths in the configuration say, but
    # under tmp_path (Envoy checks that the files exist).
    secret = tmp_path / "secret"
    secret.mkdir()
    key, cert = tls.self_signed("epp")
    for name, data in (("ca.crt", cert), ("tls.crt", cert), ("tls.key", key)):
        (secret / name).write_bytes(data)
    config_dir = tmp_path / "config"
    config_dir.mkdir()
    for name, text in cm["data"].items():
        text = text.replace(render.EPP_TLS_DIR, str(secret)).replace(render.CONFIG_DIR, str(config_dir))
        (config_dir / name).write_text(text)
    out = subprocess.run([envoy_binary(), "--mode", "validate", "-c", str(config_dir / "envoy.yaml"),
                          "--disable-hot-restart"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]

    config = yaml.safe_load(cm["data"]["envoy.yaml"])
    filters = {f["name"]: f["typed_config"] for f in config["static_resources"]["listeners"][0]["filter_chains"][0][
        "filters"][0]["typed_config"]["http_filters"]}
    assert filters["envoy.filters.http.ext_proc"]["failure_mode_allow"] is (variant == "fail-open")
    # Clients' control headers stripped, first thing (before ext_proc).
    assert next(iter(filters)) == STRIP_FILTER
    assert [m["remove"] for m in filters[STRIP_FILTER]["mutations"]["request_mutations"]] == list(
        STRIPPED_REQUEST_HEADERS)
    # EPP verified: its certificate must chain to the Secret's CA and name the Service; Envoy presents its own.
    epp = next(c for c in config["static_resources"]["clusters"] if c["name"] == "epp")
    tls_ctx = epp["transport_socket"]["typed_config"]
    common = tls_ctx["common_tls_context"]
    assert "validation_context" not in common
    validation = common["combined_validation_context"]
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "DNS", "matcher": {"exact": render.EPP_SERVICE}}]
    assert tls_ctx["sni"] == render.EPP_SERVICE
    ca_file = validation["validation_context_sds_secret_config"]["sds_config"]["path_config_source"]["path"]
    ca_sds = yaml.safe_load(cm["data"][Path(ca_file).name])["resources"][0]["validation_context"]
    assert ca_sds["trusted_ca"] == {"filename": f"{render.EPP_TLS_DIR}/ca.crt"}
    assert common["tls_certificate_sds_secret_configs"]


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
    served = epp_pools(cfg, configmaps["epp-config"]["data"])  # --pool-name's, or each of --pools-file's
    assert container["readinessProbe"]["grpc"]["port"] == cfg.grpc_health_port
    ports = {p["containerPort"] for p in container["ports"]}
    assert {cfg.grpc_port, cfg.grpc_health_port, cfg.metrics_port} <= ports
    for spec in served:  # each an InferencePool of the overlay, picked by this EPP's Service
        assert spec.cfg.pool_name in pools
        ref = pools[spec.cfg.pool_name]["spec"]["endpointPickerRef"]
        assert ref["port"]["number"] in {p["port"] for p in services[ref["name"]]["spec"]["ports"]}
    assert set(pools) == {s.cfg.pool_name for s in served}  # no pool left without its picker
    # several replicas: active-passive (a Lease) or active-active over the shared store, never neither
    assert bool(cfg.ha_enable_leader_election or cfg.state_store_url) == (deployments["epp"]["spec"]["replicas"] > 1)
    if cfg.state_store_url:  # the store, its Service and its password are in the overlay
        assert "epp-state" in deployments and "epp-state" in services
        assert cfg.state_store_url == "redis://epp-state:6379/0" and cfg.state_store_password_file

    # Every Service selects pods that some Deployment runs; every ConfigMap volume exists.
    for name, svc in services.items():
        selector = svc["spec"]["selector"]
        assert any(selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
                   for d in deployments.values()), f"Service {name} selects nothing"
    for name, d in deployments.items():
        for vol in d["spec"]["template"]["spec"].get("volumes", []):
            if "configMap" in vol:
                assert vol["configMap"]["name"] in configmaps, f"{name}: missing ConfigMap"
    # Each pool selects model-server pods (its own), on the port they serve.
    selected: list[str] = []
    for pool in (p["spec"] for p in pools.values()):
        servers = [name for name, d in deployments.items()
                   if pool["selector"]["matchLabels"].items() <= d["spec"]["template"]["metadata"]["labels"].items()]
        assert servers and all({p["number"] for p in pool["targetPorts"]} <= {
            p["containerPort"] for c in deployments[s]["spec"]["template"]["spec"]["containers"]
            for p in c.get("ports", [])} for s in servers)
        selected += servers
    assert len(selected) == len(set(selected)), "a model server in two pools"
    if len(served) > 1 and "envoy-config" in configmaps:
        check_pool_routes(configmaps["envoy-config"], served)
    # Routes point at this pool.
    for route in by_kind(docs, "HTTPRoute").values():
        for rule in route["spec"]["rules"]:
            assert [b["name"] for b in rule["backendRefs"] if b["kind"] == "InferencePool"] == ["vllm"]

    # RBAC: namespaced, read-only but for the Lease, bound to EPP's service account. The Lease: create
    # (which RBAC cannot limit by name), then get / update of EPP's own Lease only (the verbs of
    # epp/datalayer/k8s/leader.py).
    assert not by_kind(docs, "ClusterRole") and not by_kind(docs, "ClusterRoleBinding")
    roles = by_kind(docs, "Role")
    # the name epp/datalayer/k8s/discovery.py gives it
    lease = f"epp-default-{cfg.pool_name}.gateway-api-inference-extension.sigs.k8s.io"
    for role in roles.values():
        for rule in role["rules"]:
            if rule["resources"] != ["leases"]:
                assert set(rule["verbs"]) <= {"get", "list", "watch"} and "resourceNames" not in rule, rule
            elif "resourceNames" in rule:
                assert rule["resourceNames"] == [lease] and set(rule["verbs"]) == {"get", "update"}, rule
            else:
                assert rule["verbs"] == ["create"], rule
    for binding in by_kind(docs, "RoleBinding").values():
        assert binding["roleRef"]["name"] in roles
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": epp["serviceAccountName"]}]
    assert any(r["resources"] == ["leases"] for role in roles.values() for r in role["rules"]) \
        == cfg.ha_enable_leader_election

    check_locked_down(epp, container)
    certificates = check_certificates(docs, epp, container, cfg)
    check_network_policy(docs, epp, cfg)
    check_headers_stripped(docs)
    # Every gateway that talks to EPP verifies it (CA + name): our Envoy, Istio's DestinationRule.
    if "envoy" in deployments:
        check_envoy_verifies_epp(deployments["envoy"], configmaps["envoy-config"], certificates, cfg)
    for rule in by_kind(docs, "DestinationRule").values():
        policy = rule["spec"]["trafficPolicy"]["tls"]
        assert policy["mode"] in ("SIMPLE", "MUTUAL") and "insecureSkipVerify" not in policy
        assert policy["credentialName"] in certificates
        assert set(policy["subjectAltNames"]) <= set(certificates["epp-tls"]["spec"]["dnsNames"])


def epp_pools(cfg: Any, files: dict[str, str]) -> list[PoolSpec]:
    """The pools EPP serves, each with a configuration that loads; ``files``: the ConfigMap at /etc/epp."""
    specs = [PoolSpec(cfg.pool_name, cfg)]
    if cfg.pools_file:
        assert cfg.pools_file.startswith("/etc/epp/")
        specs = parse_pools(files[Path(cfg.pools_file).name], cfg)
    for spec in specs:
        c = spec.cfg
        assert not c.config_file or c.config_file.startswith("/etc/epp/")
        load_config(files[Path(c.config_file).name] if c.config_file else BUILTIN_CONFIGS.get(c.config_name))
    return specs


def check_pool_routes(cm: Obj, served: list[PoolSpec]) -> None:
    """Several pools: the gateway has a route per pool, each setting x-epp-pool (clients' copies are stripped,
    check_headers_stripped), after the strip and before ext_proc; EPP refuses what the catch-all route sends
    (400 unknown-pool) unless a pool is the default."""
    config = yaml.safe_load(cm["data"]["envoy.yaml"])
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    named: list[str | None] = []
    for route in hcm["route_config"]["virtual_hosts"][0]["routes"]:
        policy = route.get("typed_per_filter_config", {}).get(POLICY_FILTER, {})
        sets = {m["append"]["header"]["key"]: m["append"]["header"]["value"]
                for m in policy.get("mutations", {}).get("request_mutations", [])}
        named.append(sets.get(POOL_HEADER))
    assert sorted(n for n in named if n) == sorted(s.name for s in served)
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters.index(STRIP_FILTER) < filters.index(POLICY_FILTER) < filters.index("envoy.filters.http.ext_proc")


def check_locked_down(pod: Obj, container: Obj) -> None:
    """EPP's container: non-root, no privilege escalation, no capability, read-only root filesystem with
    an emptyDir for /tmp."""
    ctx = container["securityContext"]
    assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
    assert ctx["capabilities"] == {"drop": ["ALL"]}
    assert ctx.get("runAsNonRoot", pod.get("securityContext", {}).get("runAsNonRoot")) is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    assert "emptyDir" in mounts["/tmp"]
    assert all(m.get("readOnly") for m in container["volumeMounts"] if "emptyDir" not in volumes[m["name"]])


def _secret_mounts(pod: Obj, container: Obj) -> dict[str, str]:
    """mount path -> Secret name."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return {m["mountPath"]: volumes[m["name"]]["secret"]["secretName"] for m in container.get("volumeMounts", [])
            if "secret" in volumes[m["name"]]}


def check_certificates(docs: list[Obj], epp: Obj, container: Obj, cfg: Any) -> dict[str, Obj]:
    """EPP serves a certificate cert-manager issues for the Service's name, from a CA Issuer rooted in a
    self-signed one; --client-ca-path (if set) is that Secret's CA. Returns secret name -> Certificate."""
    issuers = by_kind(docs, "Issuer")
    certificates = {c["spec"]["secretName"]: c for c in by_kind(docs, "Certificate").values()}
    mounts = _secret_mounts(epp, container)
    assert cfg.secure_serving and cfg.enable_cert_reload and cfg.cert_path in mounts
    serving = certificates[mounts[cfg.cert_path]]
    assert serving["metadata"]["name"] == "epp" and "epp" in serving["spec"]["dnsNames"]  # the Service
    assert "server auth" in serving["spec"]["usages"] and not serving["spec"].get("isCA")
    ca_issuer = issuers[serving["spec"]["issuerRef"]["name"]]["spec"]["ca"]
    ca = certificates[ca_issuer["secretName"]]
    assert ca["spec"]["isCA"] is True and "selfSigned" in issuers[ca["spec"]["issuerRef"]["name"]]["spec"]
    for cert in certificates.values():  # everything else this CA signs is trusted by --client-ca-path
        assert cert is ca or cert["spec"]["issuerRef"]["name"] == serving["spec"]["issuerRef"]["name"]
    if cfg.client_ca_path:
        assert str(Path(cfg.client_ca_path).parent) == cfg.cert_path  # the CA in EPP's own Secret
    return certificates


def check_network_policy(docs: list[Obj], epp: Obj, cfg: Any) -> None:
    """A policy selects EPP's pods; ext_proc is open to the gateway's pods only, metrics to a namespace
    only; only the health port is open to every source."""
    policies = [p for p in by_kind(docs, "NetworkPolicy").values()
                if p["spec"]["podSelector"]["matchLabels"].items() <= epp_labels(docs).items()]
    assert len(policies) == 1 and policies[0]["spec"]["policyTypes"] == ["Ingress"]
    rules = policies[0]["spec"]["ingress"]
    by_port = {p["port"]: rule for rule in rules for p in rule["ports"]}
    assert set(by_port) == {cfg.grpc_port, cfg.grpc_health_port, cfg.metrics_port}
    assert "from" not in by_port[cfg.grpc_health_port]
    assert [list(peer) for peer in by_port[cfg.metrics_port]["from"]] == [["namespaceSelector"]]
    gateway_peers = by_port[cfg.grpc_port]["from"]
    assert gateway_peers and all(peer.get("podSelector", {}).get("matchLabels") for peer in gateway_peers)
    envoy = by_kind(docs, "Deployment").get("envoy")
    if envoy:  # our standalone Envoy carries the label the policy admits
        labels = envoy["spec"]["template"]["metadata"]["labels"]
        assert any(peer["podSelector"]["matchLabels"].items() <= labels.items() and "namespaceSelector" not in peer
                   for peer in gateway_peers)


def epp_labels(docs: list[Obj]) -> dict[str, str]:
    return by_kind(docs, "Deployment")["epp"]["spec"]["template"]["metadata"]["labels"]


def check_headers_stripped(docs: list[Obj]) -> None:
    """The gateway removes clients' copies of STRIPPED_REQUEST_HEADERS before ext_proc, by its own means."""
    removed: list[set[str]] = []
    for cm in by_kind(docs, "ConfigMap").values():
        if "envoy.yaml" in cm["data"]:
            hcm = yaml.safe_load(cm["data"]["envoy.yaml"])["static_resources"]["listeners"][0]["filter_chains"][0][
                "filters"][0]["typed_config"]
            first = hcm["http_filters"][0]
            assert first["name"] == STRIP_FILTER
            removed.append({m["remove"] for m in first["typed_config"]["mutations"]["request_mutations"]})
    for policy in by_kind(docs, "ClientTrafficPolicy").values():  # Envoy Gateway
        removed.append(set(policy["spec"]["headers"]["earlyRequestHeaders"]["remove"]))
    for policy in by_kind(docs, "ListenerPolicy").values():  # kgateway
        removed.append(set(policy["spec"]["default"]["httpSettings"]["earlyRequestHeaderModifier"]["remove"]))
    for envoy_filter in by_kind(docs, "EnvoyFilter").values():  # Istio
        for patch in envoy_filter["spec"]["configPatches"]:
            assert patch["applyTo"] == "HTTP_FILTER" and patch["patch"]["operation"] == "INSERT_FIRST"
            mutations = patch["patch"]["value"]["typed_config"]["mutations"]["request_mutations"]
            removed.append({m["remove"] for m in mutations})
    for gateway in by_kind(docs, "Gateway").values():
        name = gateway["metadata"]["name"]
        policies = [*by_kind(docs, "ClientTrafficPolicy").values(), *by_kind(docs, "ListenerPolicy").values()]
        targets = [p for p in policies if any(t["name"] == name for t in p["spec"]["targetRefs"])]
        selected = [f for f in by_kind(docs, "EnvoyFilter").values()
                    if f["spec"]["workloadSelector"]["labels"] == {"gateway.networking.k8s.io/gateway-name": name}]
        assert len(targets) + len(selected) == 1, f"Gateway {gateway['metadata']['name']}: no strip policy"
    assert removed and all(r == set(STRIPPED_REQUEST_HEADERS) for r in removed), removed


def check_envoy_verifies_epp(envoy: Obj, cm: Obj, certificates: dict[str, Obj], cfg: Any) -> None:
    """Our Envoy mounts the gateway's client certificate Secret where its SDS files read the CA and its
    client certificate, and checks a name EPP's certificate has."""
    pod = envoy["spec"]["template"]["spec"]
    mounts = _secret_mounts(pod, pod["containers"][0])
    ca_sds = yaml.safe_load(cm["data"]["sds-epp-ca.yaml"])["resources"][0]["validation_context"]
    tls_dir = str(Path(ca_sds["trusted_ca"]["filename"]).parent)
    client = certificates[mounts[tls_dir]]
    assert "client auth" in client["spec"]["usages"]
    assert client["spec"]["issuerRef"] == certificates["epp-tls"]["spec"]["issuerRef"]  # the CA EPP trusts
    config = yaml.safe_load(cm["data"]["envoy.yaml"])
    epp = next(c for c in config["static_resources"]["clusters"] if c["name"] == "epp")
    sans = epp["transport_socket"]["typed_config"]["common_tls_context"]["combined_validation_context"][
        "default_validation_context"]["match_typed_subject_alt_names"]
    assert {s["matcher"]["exact"] for s in sans} <= set(certificates["epp-tls"]["spec"]["dnsNames"])


def test_scale_from_zero_with_keda():
    """The KEDA example scales the Deployment the pool selects from zero, on metrics EPP exports, and EPP holds
    requests while there is no pod (flow control, noEndpointRequestTTL) for less than the gateway's timeout."""
    from epp.datalayer.pool import EndpointPool
    from epp.director import Director
    from epp.observability.metrics import EppMetrics

    docs = kustomize(MANIFESTS / "overlays" / "envoy-scale-from-zero")
    scaled = by_kind(docs, "ScaledObject")["vllm"]["spec"]
    target = by_kind(docs, "Deployment")[scaled["scaleTargetRef"]["name"]]
    pool = by_kind(docs, "InferencePool")["vllm"]["spec"]
    assert pool["selector"]["matchLabels"].items() <= target["spec"]["template"]["metadata"]["labels"].items()
    assert scaled["minReplicaCount"] == 0 and scaled["maxReplicaCount"] >= 1
    trigger = scaled["triggers"][0]
    assert trigger["type"] == "prometheus" and trigger["metadata"]["activationThreshold"] == "0"
    epp = by_kind(docs, "Deployment")["epp"]["spec"]["template"]["spec"]["containers"][0]
    cfg = parse_args(epp["args"])
    picker = load_config(by_kind(docs, "ConfigMap")["epp-config"]["data"][Path(cfg.config_file).name])
    fc = picker.admission.flow_control
    assert fc is not None and fc.no_endpoint_ttl > 0
    envoy = yaml.safe_load(by_kind(docs, "ConfigMap")["envoy-config"]["data"]["envoy.yaml"])
    hcm = envoy["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    timeouts = [float(r["route"]["timeout"].rstrip("s")) for vh in hcm["route_config"]["virtual_hosts"]
                for r in vh["routes"] if "timeout" in r.get("route", {})]
    assert timeouts and fc.no_endpoint_ttl < min(timeouts)  # the client gets EPP's answer, not a gateway timeout
    # Every metric the query names is one EPP exports (with flow control configured).
    pool_ = EndpointPool()
    metrics = EppMetrics(pool_)
    Director(pool_, picker, metrics=metrics)
    exported = {s.name for fam in metrics.registry.collect() for s in fam.samples} | \
        {fam.name for fam in metrics.registry.collect()}
    named = set(re.findall(r"[a-z_]+(?=[{)\s])", trigger["metadata"]["query"])) - {"sum", "or", "vector"}
    assert named == {"inference_extension_flow_control_queue_size", "inference_objective_running_requests"}
    assert named <= exported, named - exported
    # The schema catches what KEDA would refuse.
    doc = by_kind(docs, "ScaledObject")["vllm"]
    for mistake in ({"threshold": 8}, {"query": None}):
        bad = yaml.safe_load(yaml.safe_dump(doc))
        bad["spec"]["triggers"][0]["metadata"].update(mistake)
        bad["spec"]["triggers"][0]["metadata"] = {k: v for k, v in bad["spec"]["triggers"][0]["metadata"].items()
                                                  if v is not None}
        with pytest.raises(jsonschema.ValidationError):
            validate(bad, "bad ScaledObject")


def test_crds_build():
    docs = kustomize(MANIFESTS / "crds")
    assert len(docs) == 5 and all(d["kind"] == "CustomResourceDefinition" for d in docs)


def test_model_server_commands_parse():
    from epp_sim.__main__ import build_parser

    sim = yaml.safe_load((MANIFESTS / "model-servers/sim/deployment.yaml").read_text())
    container = sim["spec"]["template"]["spec"]["containers"][0]
    import tomllib

    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert container["command"] == ["epp-sim"] and "epp-sim" in scripts
    args = build_parser().parse_args(container["args"])
    assert args.base_port == 8000 and args.host == "0.0.0.0"


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
