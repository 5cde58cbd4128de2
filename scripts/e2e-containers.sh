#!/usr/bin/env bash
# e2e-containers.sh: Ketch's images, compose stack and Helm chart, end to end, on a Debian 12
# machine without an image registry (docs/deploy.md, "What is tested"). It installs what it
# needs, starts its own container engine, and:
#
#  1. builds every image (scripts/images.sh) and records sizes and build times;
#  2. serves a model from each framework image and from `ketch model build` images
#     (scikit-learn, ONNX, a Python function with a requirement, TorchScript, R) against a
#     broker on 127.0.0.1, every answer compared with the framework's own;
#  3. runs docker/compose.yaml (broker + gateway, iris on scikit-learn and linear on Java,
#     two replicas each) on free 127.0.0.1 ports: 2,000 queries through the native client and
#     2,000 through the gateway, each equal to the model computed here; then kills one model
#     container under load (0 lost, 0 wrong);
#  4. brings up a real one-node Kubernetes cluster inside a network namespace of its own
#     (scripts/infra.sh), installs the chart with iris (scikit-learn) and linear (Java),
#     reports the time from `helm install` to the first right prediction through the gateway
#     Service, then under load upgrades the iris Deployment (a rolling update) and deletes a
#     linear pod: 0 lost, 0 wrong;
#  5. stops every daemon it started, by pid, and checks that the machine's network
#     interfaces, routes, iptables rules and forwarding settings are as it found them.
#
#   scripts/e2e-containers.sh [--no-cluster] [--no-compose] [--keep-engine]
#
# Slow installs are cached under $KETCH_INFRA_CACHE (default ~/.cache/ketch-infra): the
# Kubernetes binaries take 15-25 minutes to build once on 2 cores. Results (a summary and
# logs) go to $KETCH_E2E_OUT (default $KETCH_INFRA_CACHE/e2e/<time>). Needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export KETCH_INFRA_CACHE=${KETCH_INFRA_CACHE:-$HOME/.cache/ketch-infra}
C=$KETCH_INFRA_CACHE
OUT=${KETCH_E2E_OUT:-$C/e2e/$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
do_cluster=1 do_compose=1 keep_engine=0
for a in "$@"; do
  case $a in
    --no-cluster) do_cluster=0 ;;
    --no-compose) do_compose=0 ;;
    --keep-engine) keep_engine=1 ;;
    -h|--help) sed -n '2,30p' "$0"; exit 0 ;;
    *) echo "e2e: unknown option $a" >&2; exit 2 ;;
  esac
done
[ "$(id -u)" = 0 ] || { echo "e2e: needs root (a container engine and a kubelet)" >&2; exit 1; }
exec 9> "$C/e2e.lock"
flock -n 9 || { echo "e2e: another run holds $C/e2e.lock" >&2; exit 1; }

T0=$SECONDS
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
PY="$ROOT/.venv/bin/python"
INFRA="$ROOT/scripts/infra.sh"
log() { echo "[$(date +%T)] e2e: $*" >&2; }
fail() { log "FAILED: $*"; exit 1; }
summary() { echo "$*" | tee -a "$OUT/summary.txt"; }

# ---------------------------------------------------------------- the machine as found
net_state() {
  {
    echo "## links"; ip -o link show | awk -F': ' '{print $2}' | sort
    echo "## addresses"; ip -o addr show | awk '{print $2, $3, $4}' | sort
    echo "## routes"; ip route show table all | sort
    echo "## ip_forward $(cat /proc/sys/net/ipv4/ip_forward) $(cat /proc/sys/net/ipv6/conf/all/forwarding)"
    echo "## bridge-nf $(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null || echo -)"
    echo "## iptables"; iptables-save 2>/dev/null | grep -v '^#' | sed 's/\[[0-9]*:[0-9]*\]//' || true
    echo "## netns"; ls /run/netns 2>/dev/null || true
  }
}

started_engine=0
compose_up=0
cleanup() {
  local code=$?
  set +e
  trap - EXIT INT TERM
  if [ "$compose_up" = 1 ]; then
    log "compose down"
    compose down -v --timeout 20 > "$OUT/compose-down.log" 2>&1
  fi
  if [ -f "$C/run/netns.pid" ]; then
    log "cluster down"
    "$INFRA" cluster-down >> "$OUT/cluster-down.log" 2>&1
  fi
  if [ "$started_engine" = 1 ] && [ "$keep_engine" = 0 ]; then
    log "engine stop"
    "$INFRA" engine-stop >> "$OUT/engine.log" 2>&1
  fi
  if [ -f "$OUT/net.before" ]; then
    net_state > "$OUT/net.after"
    if diff -u "$OUT/net.before" "$OUT/net.after" > "$OUT/net.diff"; then
      summary "networking: as found (links, addresses, routes, iptables, forwarding)"
    else
      summary "networking: CHANGED, see $OUT/net.diff"
      cat "$OUT/net.diff" >&2
      [ "$code" = 0 ] && code=1
    fi
  fi
  summary "total: $((SECONDS - T0)) s; result: $([ "$code" = 0 ] && echo PASSED || echo "FAILED ($code)")"
  log "summary and logs in $OUT"
  exit "$code"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- installs
log "installing what is missing (Debian packages, the project's venv, Go tools, Kubernetes binaries)"
"$INFRA" apt > "$OUT/install.log" 2>&1 || fail "apt install (log: $OUT/install.log)"
net_state > "$OUT/net.before"
scripts/setup.sh --test >> "$OUT/install.log" 2>&1 || fail "scripts/setup.sh --test"
"$PY" -c 'import onnx' 2>/dev/null || "$PY" -m pip install -q 'onnx>=1.16' >> "$OUT/install.log" 2>&1
if [ "$do_cluster" = 1 ]; then
  t=$SECONDS
  "$INFRA" cluster-tools >> "$OUT/install.log" 2>&1 || fail "Go tools (log: $OUT/install.log)"
  "$INFRA" k8sbin >> "$OUT/install.log" 2>&1 || fail "Kubernetes binaries (log: $OUT/install.log)"
  log "tools ready in $((SECONDS - t)) s"
else
  "$INFRA" tools >> "$OUT/install.log" 2>&1 || fail "helm"
fi
HELM=$("$INFRA" tool-path helm)

# ---------------------------------------------------------------- engine and images
export DOCKER_HOST="unix://$C/engine/docker.sock"
if ! docker info >/dev/null 2>&1; then
  started_engine=1
fi
eval "$("$INFRA" engine-start 2>> "$OUT/engine.log")"
t=$SECONDS
log "building every image (scripts/images.sh)"
rm -f "$OUT/images.jsonl"
scripts/images.sh --report "$OUT/images.jsonl" 2> "$OUT/images.log" || { tail -30 "$OUT/images.log" >&2; fail "images"; }
summary "images built in $((SECONDS - t)) s:"
"$PY" - "$OUT/images.jsonl" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"  {r['tag']:34} {r['bytes'] / 1e6:7.0f} MB  {r['seconds']:4d} s")
PY
sk=$(docker image inspect -f '{{.Size}}' "ketch/python-sklearn:$VERSION")
[ "$sk" -lt 600000000 ] || fail "the scikit-learn image is $((sk / 1000000)) MB, over 600 MB"

log "framework images and ketch model build"
"$PY" scripts/e2e_check.py images --workdir "$OUT/models" --tag "$VERSION" --out "$OUT/images-check.json" \
  > "$OUT/images-check.log" 2>&1 || { cat "$OUT/images-check.log" >&2; fail "framework images"; }
summary "models served from images (each answer equal to the framework's own):"
"$PY" - "$OUT/images-check.json" <<'PY' | tee -a "$OUT/summary.txt"
import json, sys
for name, r in json.load(open(sys.argv[1])).items():
    print(f"  {name:14} {r['right']}/{r['queries']} right, health {r['health']}, model image made in {r['build_s']} s")
PY

# ---------------------------------------------------------------- compose
free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
COMPOSE_PROJECT=ketch-e2e
compose() {
  if docker compose version >/dev/null 2>&1; then docker compose -p "$COMPOSE_PROJECT" -f docker/compose.yaml "$@"
  else docker-compose -p "$COMPOSE_PROJECT" -f docker/compose.yaml "$@"; fi
}
if [ "$do_compose" = 1 ]; then
  export KETCH_BACKEND_PORT=$(free_port) KETCH_FRONTEND_PORT=$(free_port) KETCH_ADMIN_PORT=$(free_port) KETCH_HTTP_PORT=$(free_port)
  ADMIN="tcp://127.0.0.1:$KETCH_ADMIN_PORT"
  log "compose up (backend :$KETCH_BACKEND_PORT, frontend :$KETCH_FRONTEND_PORT, admin :$KETCH_ADMIN_PORT, http :$KETCH_HTTP_PORT)"
  compose_up=1
  compose up -d > "$OUT/compose-up.log" 2>&1 || { cat "$OUT/compose-up.log" >&2; fail "compose up"; }
  registered() { # model replicas
    "$ROOT/.venv/bin/ketch" --admin "$ADMIN" model show "$1" 2>/dev/null \
      | "$PY" -c 'import json,sys; print(json.load(sys.stdin)["figures"]["replicas"])' 2>/dev/null || echo 0
  }
  for i in $(seq 240); do
    [ "$(registered iris)" = 2 ] && [ "$(registered linear)" = 2 ] && break
    sleep 0.5
  done
  [ "$(registered iris)" = 2 ] && [ "$(registered linear)" = 2 ] || { compose ps >&2; compose logs --tail 30 >&2; fail "compose: 2+2 replicas did not register"; }
  for i in $(seq 60); do
    [ "$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$(compose ps -q apps)")" = "exited 0" ] && break
    sleep 0.5
  done
  # Docker's HEALTHCHECK: `ketch broker status` for the broker, `ketch-probe ready` for the models
  healthy() { docker ps --filter "label=com.docker.compose.project=$COMPOSE_PROJECT" --filter health=healthy -q | wc -l; }
  for i in $(seq 120); do [ "$(healthy)" = 5 ] && break; sleep 0.5; done
  compose ps > "$OUT/compose-ps.txt" 2>&1
  [ "$(healthy)" = 5 ] || { cat "$OUT/compose-ps.txt" >&2; fail "compose: $(healthy) of 5 containers healthy"; }
  summary "compose: broker + gateway, iris x2 (scikit-learn), linear x2 (Java) registered, apps applied, 5 of 5 containers healthy"
  "$PY" scripts/e2e_check.py verify --http "http://127.0.0.1:$KETCH_HTTP_PORT" \
    --frontend "tcp://127.0.0.1:$KETCH_FRONTEND_PORT" --queries 2000 --out "$OUT/compose-verify.json" \
    > "$OUT/compose-verify.log" 2>&1 || { cat "$OUT/compose-verify.log" >&2; fail "compose queries"; }
  summary "compose queries: $(cat "$OUT/compose-verify.json")"

  log "compose: killing one iris container under load"
  rm -f "$OUT/compose-stop" "$OUT/compose-started"
  "$PY" scripts/e2e_check.py load --http "http://127.0.0.1:$KETCH_HTTP_PORT" \
    --frontend "tcp://127.0.0.1:$KETCH_FRONTEND_PORT" --stop-file "$OUT/compose-stop" \
    --started-file "$OUT/compose-started" --max-s 120 --out "$OUT/compose-kill.json" > "$OUT/compose-kill.log" 2>&1 &
  load_pid=$!
  for i in $(seq 100); do [ -f "$OUT/compose-started" ] && break; sleep 0.1; done
  sleep 3
  victim=$(compose ps -q iris | head -1)
  docker kill "$victim" > /dev/null
  log "killed $victim (SIGKILL); load goes on"
  sleep 8
  touch "$OUT/compose-stop"
  wait "$load_pid" || { cat "$OUT/compose-kill.log" >&2; fail "queries were lost or wrong when a container was killed"; }
  summary "compose, one iris container SIGKILLed under load: $(cat "$OUT/compose-kill.json")"
  compose down -v --timeout 20 > "$OUT/compose-down.log" 2>&1
  compose_up=0
fi

# ---------------------------------------------------------------- Kubernetes
if [ "$do_cluster" = 1 ]; then
  t=$SECONDS
  log "cluster up (network namespace, kwokctl control plane, containerd, kubelet, kube-proxy, CoreDNS)"
  "$INFRA" cluster-up "ketch/ketch:$VERSION" "ketch/python-sklearn:$VERSION" "ketch/java:$VERSION" \
    > "$OUT/cluster-up.log" 2>&1 || { tail -30 "$OUT/cluster-up.log" >&2; fail "cluster up"; }
  summary "cluster: one node Ready in $((SECONDS - t)) s ($(grep -o 'Kubernetes v[0-9.]*' "$OUT/cluster-up.log" | tail -1))"
  k() { "$INFRA" in-cluster kubectl "$@"; }
  h() { "$INFRA" in-cluster "$HELM" "$@"; }
  # the broker's state: a PersistentVolume on a folder of the node (there is no provisioner)
  mkdir -p "$C/run/pv"; chown 10001:10001 "$C/run/pv"
  printf '%s\n' 'apiVersion: v1' 'kind: PersistentVolume' 'metadata: {name: ketch-e2e-state}' 'spec:' \
    '  capacity: {storage: 1Gi}' '  accessModes: [ReadWriteOnce]' '  storageClassName: manual' \
    "  hostPath: {path: $C/run/pv, type: Directory}" | k apply -f - > /dev/null

  log "helm install"
  t_install=$("$PY" -c 'import time; print(time.time())')
  chart=(deploy/helm/ketch -f deploy/helm/ketch/ci/e2e-values.yaml --set-file 'models[1].files.linear\.json=docker/models/linear.json')
  h install ketch "${chart[@]}" > "$OUT/helm-install.log" 2>&1 \
    || { cat "$OUT/helm-install.log" >&2; fail "helm install"; }
  GW=$(k get svc ketch-gateway -o jsonpath='{.spec.clusterIP}')
  FE=$(k get svc ketch-broker -o jsonpath='{.spec.clusterIP}')
  "$INFRA" in-cluster "$PY" scripts/e2e_check.py first --http "http://$GW:8080" --timeout 600 \
    --out "$OUT/k8s-first.json" > "$OUT/k8s-first.log" 2>&1 || { k get pods -o wide >&2; k describe pods > "$OUT/k8s-describe.txt" 2>&1; fail "no prediction from the cluster"; }
  first_s=$("$PY" -c "import json,time; print(round(time.time() - $t_install, 1))")
  summary "helm install -> first right prediction through the gateway Service: ${first_s} s"
  k wait --for=condition=Available deploy --all --timeout=300s > /dev/null || fail "deployments not available"
  k wait --for=condition=Ready pod -l app.kubernetes.io/component=model --timeout=300s > /dev/null || fail "model pods not ready"
  k get pods -o wide > "$OUT/k8s-pods.txt"
  "$INFRA" in-cluster "$PY" scripts/e2e_check.py verify --http "http://$GW:8080" --frontend "tcp://$FE:7001" \
    --queries 1000 --out "$OUT/k8s-verify.json" > "$OUT/k8s-verify.log" 2>&1 || { cat "$OUT/k8s-verify.log" >&2; fail "cluster queries"; }
  summary "cluster queries (gateway Service and broker Service): $(cat "$OUT/k8s-verify.json")"

  log "under load: helm upgrade (rolling update of the iris Deployment), then a linear pod deleted"
  rm -f "$OUT/k8s-stop" "$OUT/k8s-started"
  "$INFRA" in-cluster "$PY" scripts/e2e_check.py load --http "http://$GW:8080" --frontend "tcp://$FE:7001" \
    --stop-file "$OUT/k8s-stop" --started-file "$OUT/k8s-started" --max-s 600 --out "$OUT/k8s-load.json" \
    > "$OUT/k8s-load.log" 2>&1 &
  load_pid=$!
  for i in $(seq 100); do [ -f "$OUT/k8s-started" ] && break; sleep 0.1; done
  sleep 3
  old=$(k get pods -l ketch.io/model=iris -o jsonpath='{.items[*].metadata.name}')
  t=$SECONDS
  h upgrade ketch "${chart[@]}" \
    --set-string 'models[0].podAnnotations.ketch\.io/rollout=2' > "$OUT/helm-upgrade.log" 2>&1 || fail "helm upgrade"
  k rollout status deploy/ketch-iris-v1 --timeout=300s > "$OUT/rollout.log" 2>&1 || fail "rolling update"
  k wait --for=delete pod $old --timeout=120s > /dev/null 2>&1 || true   # the last old pod drains
  new=$(k get pods -l ketch.io/model=iris -o jsonpath='{.items[*].metadata.name}')
  rollout_s=$((SECONDS - t))
  victim=$(k get pods -l ketch.io/model=linear -o jsonpath='{.items[0].metadata.name}')
  t=$SECONDS
  k delete pod "$victim" --wait=true > /dev/null
  k rollout status deploy/ketch-linear-v1 --timeout=300s >> "$OUT/rollout.log" 2>&1 || fail "linear did not recover"
  k wait --for=condition=Ready pod -l ketch.io/model=linear --timeout=300s > /dev/null
  delete_s=$((SECONDS - t))
  sleep 3
  touch "$OUT/k8s-stop"
  wait "$load_pid" || { cat "$OUT/k8s-load.log" >&2; fail "queries lost or wrong during the rolling update / pod deletion"; }
  summary "cluster under load: rolling update of iris in ${rollout_s} s (pods $old -> $new), linear pod $victim deleted and replaced in ${delete_s} s: $(cat "$OUT/k8s-load.json")"
  k get pods -o wide > "$OUT/k8s-pods-after.txt"

  # the cost of losing the one broker (docs/deploy.md, "Past one broker"): its pod deleted,
  # Recreate starts another on the same claim; apps come back from SQLite, replicas say
  # Hello again by themselves. Timed to the first right prediction.
  log "broker pod deleted: time until predictions are back"
  t_broker=$("$PY" -c 'import time; print(time.time())')
  k delete pod -l app.kubernetes.io/component=broker --wait=false > /dev/null
  sleep 1
  "$INFRA" in-cluster "$PY" scripts/e2e_check.py first --http "http://$GW:8080" --timeout 300 \
    --out "$OUT/k8s-broker-restart.json" > "$OUT/k8s-broker-restart.log" 2>&1 || fail "no prediction after the broker restart"
  restart_s=$("$PY" -c "import time; print(round(time.time() - $t_broker, 1))")
  k get events --sort-by=.metadata.creationTimestamp > "$OUT/k8s-events.txt" 2>&1 || true
  # where the time went: the new broker pod's creation, container start and readiness
  steps=$(k get pods -l app.kubernetes.io/component=broker -o json | "$PY" -c "
import json, sys, datetime as d
t0 = $t_broker
ts = lambda s: d.datetime.fromisoformat(s.replace('Z', '+00:00')).timestamp() - t0
p = json.load(sys.stdin)['items'][-1]
ready = [c for c in p['status']['conditions'] if c['type'] == 'Ready'][0]
started = p['status']['containerStatuses'][0]['state'].get('running', {}).get('startedAt')
print(f\"new pod created +{ts(p['metadata']['creationTimestamp']):.0f} s, started +{ts(started):.0f} s, ready +{ts(ready['lastTransitionTime']):.0f} s\")
" 2>/dev/null || echo "timeline unavailable")
  summary "broker pod deleted -> first right prediction again: ${restart_s} s ($steps; apps from the claim, replicas re-registered)"
  h uninstall ketch > /dev/null 2>&1 || true
fi
log "all checks passed"
