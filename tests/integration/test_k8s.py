"""The Kubernetes manifests: every overlay builds, validates offline, and keeps the policies."""

from __future__ import annotations

import re
import shutil
import subprocess
import urllib.parse
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).parents[2]
OVERLAYS = ["dev", "production"]
K8S_VERSION = "1.31.0"
CRDS = {"ClusterSPIFFEID", "Cluster"}
STORE_CLUSTER = "credbroker-pg"

# CloudNativePG's Cluster (postgresql.cnpg.io/v1) is not in kubectl's schemas: the spec
# fields we may use, from its API reference (ClusterSpec); anything else is a typo.
CNPG_SPEC_FIELDS = {
    "description", "imageName", "imageCatalogRef", "imagePullPolicy", "instances",
    "minSyncReplicas", "maxSyncReplicas", "postgresql", "bootstrap", "replica", "superuserSecret",
    "enableSuperuserAccess", "certificates", "imagePullSecrets", "storage", "walStorage",
    "tablespaces", "startDelay", "stopDelay", "smartShutdownTimeout", "switchoverDelay",
    "failoverDelay", "affinity", "topologySpreadConstraints", "resources", "priorityClassName",
    "primaryUpdateStrategy", "primaryUpdateMethod", "backup", "nodeMaintenanceWindow",
    "monitoring", "externalClusters", "logLevel", "managed", "env", "envFrom",
    "serviceAccountTemplate", "enablePDB", "inheritedMetadata", "projectedVolumeTemplate",
    "ephemeralVolumeSource", "ephemeralVolumesSizeLimit", "seccompProfile", "probes",
    "livenessProbeTimeout", "plugins", "podSecurityContext", "securityContext",
}
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti)?$")


def check_cnpg_cluster(o: dict[str, Any]) -> None:
    """A CloudNativePG Cluster as the store needs it: three instances, synchronous
    replication that waits rather than loses a commit, sized, bounded, spread over nodes."""
    assert o["apiVersion"] == "postgresql.cnpg.io/v1"
    spec = o["spec"]
    assert set(spec) <= CNPG_SPEC_FIELDS, set(spec) - CNPG_SPEC_FIELDS
    assert spec["instances"] == 3
    sync = spec["postgresql"]["synchronous"]
    assert set(sync) <= {"method", "number", "maxStandbyNamesFromCluster", "standbyNamesPre",
                         "standbyNamesPost", "dataDurability"}
    assert sync["method"] in ("any", "first")
    assert 1 <= sync["number"] < spec["instances"]
    assert sync.get("dataDurability", "required") == "required"
    assert all(isinstance(v, str) for v in spec["postgresql"].get("parameters", {}).values())
    initdb = spec["bootstrap"]["initdb"]
    assert initdb["database"] and initdb["owner"]
    assert _QUANTITY.match(spec["storage"]["size"])
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(spec["resources"][kind])
        assert all(_QUANTITY.match(str(v)) for v in spec["resources"][kind].values())
    affinity = spec["affinity"]
    assert affinity["enablePodAntiAffinity"] is True
    assert affinity["podAntiAffinityType"] == "required"
    assert affinity["topologyKey"] == "kubernetes.io/hostname"
    assert spec.get("enablePDB", True) is True


def check_clusterspiffeid(o: dict[str, Any]) -> None:
    assert o["apiVersion"] == "spire.spiffe.io/v1alpha1"
    assert o["spec"]["spiffeIDTemplate"].startswith("spiffe://{{ .TrustDomain }}/")


def build(overlay: str) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is needed to build the overlays (.ci/run installs it)"
    out = subprocess.run([kubectl, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module", params=OVERLAYS)
def objects(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, build(request.param)


def pod_specs(objs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for o in objs:
        if o["kind"] in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
            yield f"{o['kind']}/{o['metadata']['name']}", o["spec"]["template"]["spec"]


def test_every_object_validates_against_the_kubernetes_schemas(
        objects: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = objects
    for o in objs:
        if o["kind"] in CRDS:
            {"Cluster": check_cnpg_cluster, "ClusterSPIFFEID": check_clusterspiffeid}[
                o["kind"]](o)
            continue
        kubernetes_validate.validate(o, K8S_VERSION, strict=True)


def test_pods_are_restricted_and_bounded(objects: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = objects
    specs = list(pod_specs(objs))
    assert specs
    for name, spec in specs:
        psc = spec.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, name
        assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        assert spec.get("automountServiceAccountToken") is False, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        for c in spec.get("initContainers", []) + spec["containers"]:
            sc = c.get("securityContext", {})
            where = f"{name} container {c['name']}"
            assert sc.get("privileged") is False, where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            limits = c.get("resources", {}).get("limits", {})
            assert "cpu" in limits and "memory" in limits, where
            assert c.get("resources", {}).get("requests"), where


def test_spiffe_csi_and_native_sidecar(objects: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = objects
    by_name = dict(pod_specs(objs))
    for name in ("Deployment/credbroker-broker", "Deployment/triage-agent"):
        drivers = [v["csi"]["driver"] for v in by_name[name]["volumes"] if "csi" in v]
        assert drivers == ["csi.spiffe.io"], name
    agent = by_name["Deployment/triage-agent"]
    sidecar = next(c for c in agent["initContainers"] if c["name"] == "credbroker-sidecar")
    assert sidecar["restartPolicy"] == "Always"  # a Kubernetes native sidecar
    socket_mounts = {m["name"] for c in [sidecar, *agent["containers"]]
                     for m in c["volumeMounts"] if m["mountPath"] == "/run/credbroker"}
    assert socket_mounts == {"credbroker-socket"}
    assert any(v["name"] == "credbroker-socket" and "emptyDir" in v for v in agent["volumes"])
    broker_ids = [o for o in objs if o["kind"] == "ClusterSPIFFEID"
                  and o["metadata"]["name"] == "credbroker-broker"]
    assert broker_ids[0]["spec"]["dnsNameTemplates"] == ["broker.credbroker.internal"]


def test_network_policies(objects: tuple[str, list[dict[str, Any]]]) -> None:
    overlay, objs = objects
    pols = {o["metadata"]["name"]: o for o in objs if o["kind"] == "NetworkPolicy"}
    broker = pols["credbroker-broker"]["spec"]
    assert broker["podSelector"]["matchLabels"] == {"app.kubernetes.io/name": "credbroker-broker"}
    assert set(broker["policyTypes"]) == {"Ingress", "Egress"}
    sources = [f for rule in broker["ingress"] for f in rule["from"]]
    assert {"credbroker.dev/agents": "true"} in [s.get("namespaceSelector", {}).get("matchLabels")
                                                  for s in sources]
    egress_ports = {p["port"] for rule in broker["egress"] for p in rule["ports"]}
    if overlay == "production":  # Vault, DNS and its store, nothing else
        assert egress_ports == {8200, 53, 5432}
        to_store = [rule["to"] for rule in broker["egress"]
                    if {p["port"] for p in rule["ports"]} == {5432}]
        assert to_store == [[{"podSelector": {"matchLabels": {"cnpg.io/cluster":
                                                              STORE_CLUSTER}}}]]
        store = pols[STORE_CLUSTER]["spec"]
        assert store["podSelector"]["matchLabels"] == {"cnpg.io/cluster": STORE_CLUSTER}
        clients = store["ingress"][0]["from"][0]["podSelector"]["matchExpressions"][0]["values"]
        assert set(clients) == {"credbroker-broker", "credbroker-vault-sync"}
    else:
        assert egress_ports == {8200, 53}  # Vault and DNS, nothing else


def test_production_is_highly_available_and_has_no_static_vault_token() -> None:
    objs = build("production")
    deploy = next(o for o in objs if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "credbroker-broker")
    assert deploy["spec"]["replicas"] >= 2
    spec = deploy["spec"]["template"]["spec"]
    assert spec["affinity"]["podAntiAffinity"]
    assert any(o["kind"] == "PodDisruptionBudget" for o in objs)
    text = yaml.safe_dump_all(objs)
    assert "VAULT_TOKEN" not in text  # no static token, not even by reference
    assert not any(o["kind"] == "Secret" for o in objs)
    broker = next(c for c in spec["containers"] if c["name"] == "broker")
    assert "--vault-token-file" in broker["args"]
    agent = next(c for c in spec["initContainers"] if c["name"] == "vault-agent")
    assert agent["restartPolicy"] == "Always"
    policy = next(o for o in objs if o["kind"] == "ConfigMap"
                  and o["metadata"]["name"].startswith("credbroker-vault-policy"))
    hcl = next(iter(policy["data"].values()))
    assert 'path "sys/policies/acl/credbroker-*"' in hcl and 'path "*"' not in hcl


def _env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in container.get("env", [])}


def _config_file(objs: list[dict[str, Any]]) -> dict[str, Any]:
    cm = next(o for o in objs if o["kind"] == "ConfigMap"
              and o["metadata"]["name"].startswith("credbroker-config"))
    config: dict[str, Any] = yaml.safe_load(cm["data"]["broker.yaml"])
    return config


def test_production_brokers_share_a_cloudnativepg_store_and_keep_no_state_on_emptydir(
        ) -> None:
    """The brokers and the sync Job read CREDBROKER_STORE from the Secret CloudNativePG
    generates for the cluster (``<cluster>-app``, key ``uri``); no registry on a pod volume."""
    from broker.config import broker_config_from

    objs = build("production")
    clusters = [o for o in objs if o["kind"] == "Cluster"]
    assert [c["metadata"]["name"] for c in clusters] == [STORE_CLUSTER]
    assert clusters[0]["metadata"]["namespace"] == "credbroker"
    secret_ref = {"name": f"{STORE_CLUSTER}-app", "key": "uri"}
    specs = dict(pod_specs(objs))
    broker_pod = specs["Deployment/credbroker-broker"]
    deploy = next(o for o in objs if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "credbroker-broker")
    assert deploy["spec"]["replicas"] == 3
    pdb = next(o for o in objs if o["kind"] == "PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name":
                                                      "credbroker-broker"}
    assert pdb["spec"]["minAvailable"] == 2
    broker = next(c for c in broker_pod["containers"] if c["name"] == "broker")
    sync = specs["Job/credbroker-vault-sync"]["containers"][0]
    for who in (broker, sync):
        ref = _env(who)["CREDBROKER_STORE"]["valueFrom"]["secretKeyRef"]
        assert ref == secret_ref, who["name"]
    assert "--store" not in broker["args"] + sync["args"]  # never the URL (password) in args
    # No state on emptyDir: the only emptyDirs are small in-memory scratch space.
    for v in broker_pod["volumes"]:
        if "emptyDir" in v:
            assert v["emptyDir"].get("medium") == "Memory", v["name"]
    config = _config_file(objs)
    assert "registry" not in config and "audit_log" not in config  # both in PostgreSQL
    state_dir = str(Path(config["checkpoint_mirror"]).parent.parent)
    mounted = {m["mountPath"]: m["name"] for m in broker["volumeMounts"]}
    state = next(v for v in broker_pod["volumes"] if v["name"] == mounted[state_dir])
    assert "ephemeral" in state
    # The broker accepts that configuration with the store from the Secret and no registry.
    cfg = broker_config_from(
        env={"CREDBROKER_STORE": "postgresql://credbroker:pw@credbroker-pg-rw:5432/credbroker",
             "VAULT_ADDR": "https://vault.vault.svc:8200", "VAULT_TOKEN": "placeholder"},
        flags={}, file=config)
    assert cfg.store_url.startswith("postgresql://")


def test_dev_overlay_takes_its_token_from_a_secret() -> None:
    objs = build("dev")
    deploy = next(o for o in objs if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "credbroker-broker")
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["VAULT_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "credbroker-dev-vault-token"
    assert deploy["spec"]["replicas"] == 1


def test_the_shipped_scope_map_is_the_examples_classes_for_kubernetes_identities() -> None:
    from broker.config import load_scope_map

    shipped = load_scope_map(ROOT / "k8s" / "base" / "scope-map.yaml")
    example = load_scope_map(ROOT / "broker" / "examples" / "soc-scope-map.yaml")
    assert list(shipped.classes) == list(example.classes)
    for name, cls in shipped.classes.items():
        assert cls.vault_policy == example.classes[name].vault_policy, name
        assert cls.approval == example.classes[name].approval, name
        assert all("/ns/" in str(w) and "/sa/" in str(w) for w in cls.workloads), name


def _scope_map_of(objs: list[dict[str, Any]]) -> Any:
    from broker.core.scopemap import parse_scope_map

    cm = next(o for o in objs if o["kind"] == "ConfigMap"
              and o["metadata"]["name"] == "credbroker-scope-map")
    return parse_scope_map(sorted(cm["data"].items()))


def test_every_example_agent_is_allowed_its_intended_classes(
        objects: tuple[str, list[dict[str, Any]]]) -> None:
    """What ClusterSPIFFEID names each agent pod is what the shipped scope map allows."""
    from broker.core.models import CredentialRequest, InitiatingEvent, Outcome
    from broker.core.scopemap import evaluate
    from broker.core.spiffeid import SpiffeId

    _, objs = objects
    scope_map = _scope_map_of(objs)
    registration = next(o for o in objs if o["kind"] == "ClusterSPIFFEID"
                        and o["metadata"]["name"] == "credbroker-agents")
    template = registration["spec"]["spiffeIDTemplate"]
    pod_labels = registration["spec"]["podSelector"]["matchLabels"]
    ns_labels = registration["spec"]["namespaceSelector"]["matchLabels"]
    namespaces = {o["metadata"]["name"]: o["metadata"].get("labels", {})
                  for o in objs if o["kind"] == "Namespace"}
    accounts = {(o["metadata"]["namespace"], o["metadata"]["name"])
                for o in objs if o["kind"] == "ServiceAccount"}
    agents = [o for o in objs if o["kind"] == "Deployment"
              and pod_labels.items() <= o["spec"]["template"]["metadata"]["labels"].items()]
    assert [a["metadata"]["name"] for a in agents] == ["triage-agent"]
    for agent in agents:
        ns, sa = agent["metadata"]["namespace"], agent["spec"]["template"]["spec"][
            "serviceAccountName"]
        assert ns_labels.items() <= namespaces[ns].items(), ns  # SPIRE registers it
        assert (ns, sa) in accounts
        sid = SpiffeId.parse(template.replace("{{ .TrustDomain }}", "example.org")
                             .replace("{{ .PodMeta.Namespace }}", ns)
                             .replace("{{ .PodSpec.ServiceAccountName }}", sa))
        intended = agent["metadata"]["annotations"]["credbroker.dev/action-classes"].split(",")
        for name in intended:
            request = CredentialRequest(
                action_class=name.strip(), target="host-1", justification="triage",
                initiating_event=InitiatingEvent(source="splunk", id="NOTABLE-1"))
            decision = evaluate(scope_map, sid, request, datetime.now(UTC))
            assert decision.outcome is not Outcome.DENY, (sid, name, decision.reasons)


def _credbroker_containers(objs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Containers that run credbroker or talk to its sidecar."""
    for _name, spec in pod_specs(objs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            if c["image"].startswith("credbroker:") or "/run/credbroker" in mounts:
                yield c


_ENV_NAME = re.compile(r"\b(?:CREDBROKER|VAULT|BAO|SPIFFE)_[A-Z0-9_]*[A-Z0-9]\b")


def _names_the_code_reads() -> set[str]:
    text = "".join(p.read_text() for d in ("broker", "sidecar") for p in (ROOT / d).rglob("*.py"))
    return set(re.findall(r'"((?:CREDBROKER|VAULT|BAO|SPIFFE)_[A-Z0-9_]*[A-Z0-9])"', text))


def test_environment_names_agree_between_manifests_code_and_docs(
        objects: tuple[str, list[dict[str, Any]]]) -> None:
    _, objs = objects
    code = _names_the_code_reads()
    assert {"CREDBROKER_SIDECAR_SOCKET", "VAULT_ADDR", "VAULT_CACERT"} <= code
    readme = (ROOT / "README.md").read_text()
    docs = readme + "".join(p.read_text() for p in (ROOT / "docs").glob("*.md"))
    set_in_manifests = {e["name"] for c in _credbroker_containers(objs) for e in c.get("env", [])}
    assert "CREDBROKER_SIDECAR_SOCKET" in set_in_manifests
    for name in set_in_manifests:
        assert name in code, f"{name} is set in k8s/ but credbroker never reads it"
        assert f"`{name}`" in readme, f"{name} is set in k8s/ but the README never names it"
    mentioned = set(_ENV_NAME.findall(docs)) | set(_ENV_NAME.findall(
        "".join(p.read_text() for p in (ROOT / "k8s").rglob("*") if p.is_file())))
    unknown = sorted(n for n in mentioned - code if n.startswith("CREDBROKER_"))
    assert not unknown, f"docs or manifests name variables the code does not read: {unknown}"
    from broker import config

    for name in set(re.findall(r'env\.get\(\s*"([A-Z0-9_]+)"', Path(config.__file__).read_text())):
        assert f"`{name}`" in readme, f"broker/config.py reads {name}; the README must say so"


def test_the_dev_overlay_holds_the_openbao_its_broker_uses() -> None:
    objs = build("dev")
    deploy = next(o for o in objs if o["kind"] == "Deployment"
                  and o["metadata"]["name"] == "credbroker-broker")
    env = {e["name"]: e for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    addr = urllib.parse.urlsplit(env["VAULT_ADDR"]["value"])
    service, namespace = addr.hostname.split(".")[:2]  # type: ignore[union-attr]
    svc = next(o for o in objs if o["kind"] == "Service" and o["metadata"]["name"] == service
               and o["metadata"]["namespace"] == namespace)
    assert addr.port in [p["port"] for p in svc["spec"]["ports"]]
    server = next(o for o in objs if o["kind"] == "Deployment"
                  and o["metadata"]["namespace"] == namespace
                  and svc["spec"]["selector"].items()
                  <= o["spec"]["template"]["metadata"]["labels"].items())
    bao = server["spec"]["template"]["spec"]["containers"][0]
    assert "openbao" in bao["image"] and "-dev" in bao["command"]
    assert any(o["kind"] == "Namespace" and o["metadata"]["name"] == namespace for o in objs)
    doc = (ROOT / "docs" / "deploy-kubernetes.md").read_text()
    assert "in-cluster OpenBao dev server" in doc and "openbao-dev-root-token" in doc


def test_broker_config_file_keys_are_known() -> None:
    from broker.cli.main import serve_file_keys

    for path in ("base/broker-config.yaml", "overlays/production/broker-config.yaml"):
        cfg = yaml.safe_load((ROOT / "k8s" / path).read_text())
        assert set(cfg) <= set(serve_file_keys()), path


def test_every_credbroker_container_command_parses(objects: tuple[str, list[dict[str, Any]]]
                                                   ) -> None:
    from broker.cli.main import build_parser

    _, objs = objects
    seen = 0
    for _name, spec in pod_specs(objs):
        for c in spec.get("initContainers", []) + spec["containers"]:
            if c["image"].startswith("credbroker:"):
                build_parser().parse_args(c["args"])  # SystemExit on a bad command line
                seen += 1
    assert seen >= 3
