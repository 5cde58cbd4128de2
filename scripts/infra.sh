#!/usr/bin/env bash
# infra.sh: the container engine, tools and single-node Kubernetes cluster that
# scripts/e2e-containers.sh and docs/deploy.md use on a Debian 12 machine without an image
# registry. Everything slow is cached under $KETCH_INFRA_CACHE (default ~/.cache/ketch-infra).
#
#   scripts/infra.sh apt                 Debian packages: docker.io, docker-compose, debootstrap, etcd, CNI
#   scripts/infra.sh tools               helm (go install, cached)
#   scripts/infra.sh cluster-tools       helm, kwokctl, coredns (go install, cached)
#   scripts/infra.sh k8sbin              kube-apiserver ... kube-proxy and a pause binary (cached; ~15 min once)
#   scripts/infra.sh engine-start        a private dockerd on a unix socket; prints the DOCKER_HOST to export
#   scripts/infra.sh engine-stop         stop it (by its pid)
#   scripts/infra.sh cluster-up IMAGE..  a real one-node cluster inside a network namespace of its own,
#                                        with IMAGEs (from the engine) loaded into its containerd
#   scripts/infra.sh cluster-down        stop every cluster daemon by pid, delete the namespace, cgroups
#   scripts/infra.sh in-cluster CMD...   run CMD inside the cluster's network namespace with KUBECONFIG set
#
# Nothing here changes the machine's own networking: dockerd runs with --bridge=none
# --iptables=false --ip-forward=false (builds and containers use the host network), and the
# cluster's bridge, pod addresses, iptables rules and sysctls live in a network namespace
# that cluster-up creates and cluster-down deletes.
set -euo pipefail

KETCH_INFRA_CACHE=${KETCH_INFRA_CACHE:-$HOME/.cache/ketch-infra}
C=$KETCH_INFRA_CACHE
K8S_VERSION=${K8S_VERSION:-1.31.4}
HELM_VERSION=${HELM_VERSION:-v3.18.6}
KWOK_VERSION=${KWOK_VERSION:-v0.7.0}
COREDNS_VERSION=${COREDNS_VERSION:-v1.12.0}
NICE=${NICE:-nice -n 10}
K8SBIN="$C/k8s/v$K8S_VERSION"
ENGINE="$C/engine"             # dockerd state (images are kept between runs)
RUN="$C/run"                   # state of the running cluster (removed by cluster-down)
NETNS=${KETCH_NETNS:-ketch-node}
NODE_IP=10.244.0.1
export GOFLAGS="-buildvcs=false"

log() { echo "[$(date +%T)] infra: $*" >&2; }
die() { echo "infra: $*" >&2; exit 1; }

tool() { # path of a cached tool binary
  case $1 in
    helm) echo "$C/bin/helm-$HELM_VERSION" ;;
    kwokctl) echo "$C/bin/kwokctl-$KWOK_VERSION" ;;
    coredns) echo "$C/bin/coredns-$COREDNS_VERSION" ;;
    *) die "no tool $1" ;;
  esac
}

need_go() {
  command -v go >/dev/null || [ -x /usr/local/go/bin/go ] || die "needs Go 1.24+ (go) to build helm and the Kubernetes tools"
  command -v go >/dev/null || export PATH="/usr/local/go/bin:$PATH"
}

go_install() { # module@version -> cached binary
  local mod=$1 out=$2
  [ -x "$out" ] && return 0
  need_go
  log "building $mod (once; cached as $out)"
  local tmp; tmp=$(mktemp -d)
  GOBIN="$tmp" $NICE go install "$mod"
  mkdir -p "$(dirname "$out")"
  mv "$tmp/$(basename "${mod%@*}")" "$out"
  rm -rf "$tmp"
}

do_apt() {
  local want=(docker.io docker-compose debootstrap etcd-server containernetworking-plugins iptables conntrack)
  local missing=()
  for p in "${want[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "apt-get install ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -o DPkg::Lock::Timeout=600 --no-install-recommends \
    "${missing[@]}" >/dev/null
}

do_tools() {
  go_install "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" "$(tool helm)"
}

do_cluster_tools() {
  do_tools
  go_install "sigs.k8s.io/kwok/cmd/kwokctl@$KWOK_VERSION" "$(tool kwokctl)"
  go_install "github.com/coredns/coredns@$COREDNS_VERSION" "$(tool coredns)"
}

do_k8sbin() {
  # `go install k8s.io/kubernetes/cmd/...` is refused (its go.mod replaces k8s.io/* with ./staging,
  # which the module zip lacks): build the module as the main module with those replaces
  # pointed at the published k8s.io/* v0.X.Y modules.
  local c
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy pause; do
    [ -x "$K8SBIN/$c" ] || break
    [ "$c" = pause ] && return 0
  done
  need_go
  local V=$K8S_VERSION src="$C/src/kubernetes-$K8S_VERSION"
  log "building Kubernetes v$V binaries (once, about 15 minutes on 2 cores; cached in $K8SBIN)"
  go mod download "k8s.io/kubernetes@v$V"
  rm -rf "$src"; mkdir -p "$C/src"
  cp -r "$(go env GOMODCACHE)/k8s.io/kubernetes@v$V" "$src"; chmod -R u+w "$src"
  rm -rf "$src/vendor" "$src/go.work" "$src/go.work.sum"
  sed -i -E "s#^\s*(k8s.io/[a-z0-9-]+) => ./staging/src/k8s.io/[a-z0-9-]+#\t\1 => \1 v0.${V#*.}#" "$src/go.mod"
  local minor; minor=$(echo "$V" | cut -d. -f2)
  local ld="-s -w -X k8s.io/component-base/version.gitVersion=v$V -X k8s.io/component-base/version.gitMajor=${V%%.*}"
  ld="$ld -X k8s.io/component-base/version.gitMinor=$minor -X k8s.io/component-base/version.gitTreeState=clean"
  ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=v$V"
  mkdir -p "$K8SBIN"
  for c in kube-apiserver kube-controller-manager kube-scheduler kubelet kube-proxy; do
    [ -x "$K8SBIN/$c" ] && continue
    log "building $c"
    (cd "$src" && GOFLAGS="-mod=mod -buildvcs=false" $NICE go build -trimpath -ldflags "$ld" -o "$K8SBIN/$c.tmp" "./cmd/$c")
    mv "$K8SBIN/$c.tmp" "$K8SBIN/$c"
  done
  # the pod sandbox ("pause") image's binary: no registry to pull it from
  command -v gcc >/dev/null || die "needs gcc for the pause binary"
  gcc -Os -static -o "$K8SBIN/pause.tmp" "$src/build/pause/linux/pause.c" -DVERSION=ketch
  strip "$K8SBIN/pause.tmp"; mv "$K8SBIN/pause.tmp" "$K8SBIN/pause"
  rm -rf "$src"
}

engine_env() { echo "export DOCKER_HOST=unix://$ENGINE/docker.sock"; }

do_engine_start() {
  export DOCKER_HOST="unix://$ENGINE/docker.sock"
  if [ -f "$ENGINE/dockerd.pid" ] && kill -0 "$(cat "$ENGINE/dockerd.pid")" 2>/dev/null && docker info >/dev/null 2>&1; then
    engine_env; return 0
  fi
  command -v dockerd >/dev/null || die "no dockerd: run scripts/infra.sh apt"
  mkdir -p "$ENGINE"
  # what dockerd and its containerd add outside $ENGINE, removed by engine-stop if new
  : > "$ENGINE/created"
  [ -e /run/containerd ] || echo /run/containerd >> "$ENGINE/created"
  [ -e /etc/docker/key.json ] || echo /etc/docker/key.json >> "$ENGINE/created"
  [ -e /etc/docker ] || echo /etc/docker >> "$ENGINE/created"
  # --bridge=none --iptables=false --ip-forward=false: no docker0, no iptables chains, no
  # sysctl changes; builds and containers use --network host
  # niced: image builds and containers (its children) yield to other work on the machine
  setsid $NICE dockerd --data-root "$ENGINE/data" --exec-root "$ENGINE/exec" --pidfile "$ENGINE/dockerd.pid" \
    -H "$DOCKER_HOST" --bridge=none --iptables=false --ip-forward=false --ip-masq=false \
    --log-level warn > "$ENGINE/dockerd.log" 2>&1 < /dev/null &
  echo $! > "$ENGINE/dockerd.launch.pid"
  local i
  for i in $(seq 120); do
    docker info >/dev/null 2>&1 && break
    kill -0 "$(cat "$ENGINE/dockerd.launch.pid")" 2>/dev/null || { tail -20 "$ENGINE/dockerd.log" >&2; die "dockerd exited"; }
    sleep 0.5
  done
  docker info >/dev/null 2>&1 || die "dockerd did not answer in 60 s (log: $ENGINE/dockerd.log)"
  log "engine $(docker info --format '{{.ServerVersion}} {{.Driver}} cgroup {{.CgroupDriver}}/v{{.CgroupVersion}}') on $DOCKER_HOST"
  engine_env
}

stop_pid() { # pidfile [grace seconds]: SIGTERM, wait, SIGKILL
  local f=$1 grace=${2:-20} p i
  [ -f "$f" ] || return 0
  p=$(cat "$f")
  if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
    kill "$p" 2>/dev/null || true
    for i in $(seq $((grace * 5))); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -0 "$p" 2>/dev/null && { log "pid $p ($f) did not stop in ${grace}s: SIGKILL"; kill -9 "$p" 2>/dev/null || true; }
  fi
  rm -f "$f"
}

do_engine_stop() {
  export DOCKER_HOST="unix://$ENGINE/docker.sock"
  if docker info >/dev/null 2>&1; then
    docker ps -q | xargs -r docker stop -t 10 >/dev/null 2>&1 || true
  fi
  stop_pid "$ENGINE/dockerd.launch.pid" 30
  rm -f "$ENGINE/dockerd.pid"
  # dockerd leaves its network namespace file mounted under its exec-root
  if mountpoint -q "$ENGINE/exec/netns/default" 2>/dev/null; then umount "$ENGINE/exec/netns/default" || true; fi
  if [ -f "$ENGINE/created" ]; then
    grep -qx /etc/docker/key.json "$ENGINE/created" && rm -f /etc/docker/key.json
    grep -qx /etc/docker "$ENGINE/created" && rmdir /etc/docker 2>/dev/null
    grep -qx /run/containerd "$ENGINE/created" && ! [ -f "$RUN/netns.pid" ] \
      && { rmdir /run/containerd/s 2>/dev/null; rmdir /run/containerd 2>/dev/null; }
    rm -f "$ENGINE/created"
  fi
  return 0
}

# ---------------------------------------------------------------- the one-node cluster
#
# Every cluster daemon runs inside a network namespace of its own, held by a `sleep` process
# (`unshare --net`): the bridge kcbr0 (10.244.0.1/24), the pod addresses, kube-proxy's
# Service rules, CoreDNS, the API server and the queries sent to Services all live there and
# vanish with it. containerd and the kubelet also get a private mount namespace, where tmpfs
# hides /run/containerd and /var/log from the machine, and files holding the values the
# kubelet wants shadow the kernel settings it would otherwise change (kernel.panic, ...).

in_ns() { nsenter --net="/proc/$(cat "$RUN/netns.pid")/ns/net" "$@"; }

ns_daemon() { # pidfile logfile command...: started in the namespace, its own pid recorded
  local pidfile=$1 logfile=$2
  shift 2
  nsenter --net="/proc/$(cat "$RUN/netns.pid")/ns/net" setsid "$@" > "$logfile" 2>&1 < /dev/null &
  echo $! > "$pidfile"
}

do_in_cluster() {
  [ -f "$RUN/netns.pid" ] || die "no cluster (scripts/infra.sh cluster-up)"
  export KUBECONFIG="$RUN/kubeconfig"
  in_ns "$@"
}

wait_for() { # seconds description command...
  local limit=$1 what=$2 i
  shift 2
  for i in $(seq $((limit * 4))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.25; done
  die "timed out after ${limit}s waiting for $what"
}

write_node_files() {
  local r=$1
  printf '%s\n' \
    'apiVersion: config.kwok.x-k8s.io/v1alpha1' \
    'kind: KwokctlConfiguration' \
    'componentsPatches:' \
    '- name: kube-apiserver' \
    '  extraArgs:' \
    '  - {key: kubelet-preferred-address-types, value: InternalIP}' > "$r/kwokctl.yaml"
  printf '%s\n' \
    '{"cniVersion": "0.4.0", "name": "ketch", "plugins": [' \
    '  {"type": "bridge", "bridge": "kcbr0", "isGateway": true, "ipMasq": false, "hairpinMode": true,' \
    "   \"ipam\": {\"type\": \"host-local\", \"dataDir\": \"$r/cni-ipam\"," \
    '            "ranges": [[{"subnet": "10.244.0.0/24"}]], "routes": [{"dst": "0.0.0.0/0"}]}},' \
    '  {"type": "portmap", "capabilities": {"portMappings": true}}]}' > "$r/cni/10-ketch.conflist"
  printf '%s\n' \
    'version = 2' \
    "root = \"$r/containerd/root\"" \
    "state = \"$r/containerd/state\"" \
    '[grpc]' \
    "  address = \"$r/containerd.sock\"" \
    '[ttrpc]' \
    "  address = \"$r/containerd.sock.ttrpc\"" \
    '[plugins."io.containerd.grpc.v1.cri"]' \
    '  sandbox_image = "docker.io/ketch/pause:3.10"' \
    '  stream_server_address = "127.0.0.1"' \
    '  stream_server_port = "0"' \
    '  # root may lack CAP_SYS_RESOURCE here: runc then fails "cannot get final child PID"' \
    '  restrict_oom_score_adj = true' \
    '  # pod network namespaces are mounted under the state folder, not /run/netns' \
    '  netns_mounts_under_state_dir = true' \
    '  [plugins."io.containerd.grpc.v1.cri".containerd]' \
    '    snapshotter = "overlayfs"' \
    '    default_runtime_name = "runc"' \
    '    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]' \
    '      runtime_type = "io.containerd.runc.v2"' \
    '  [plugins."io.containerd.grpc.v1.cri".cni]' \
    '    bin_dir = "/usr/lib/cni"' \
    "    conf_dir = \"$r/cni\"" > "$r/containerd.toml"
  printf '%s\n' \
    'apiVersion: kubelet.config.k8s.io/v1beta1' \
    'kind: KubeletConfiguration' \
    'cgroupDriver: cgroupfs' \
    'failSwapOn: false' \
    "containerRuntimeEndpoint: unix://$r/containerd.sock" \
    "address: $NODE_IP" \
    'port: 20250' \
    'readOnlyPort: 0' \
    'healthzBindAddress: 127.0.0.1' \
    'healthzPort: 20248' \
    'authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}' \
    'authorization: {mode: AlwaysAllow}' \
    "podLogsDir: $r/podlogs" \
    'protectKernelDefaults: false' \
    'makeIPTablesUtilChains: false' \
    'imageGCHighThresholdPercent: 100' \
    'evictionHard: {memory.available: "100Mi", nodefs.available: "1%", imagefs.available: "1%"}' \
    'maxPods: 30' \
    "clusterDNS: [$NODE_IP]" \
    'clusterDomain: cluster.local' \
    'serializeImagePulls: false' > "$r/kubelet.yaml"
  printf '%s\n' \
    'apiVersion: kubeproxy.config.k8s.io/v1alpha1' \
    'kind: KubeProxyConfiguration' \
    "clientConnection: {kubeconfig: $r/kubeconfig}" \
    'mode: iptables' \
    'clusterCIDR: 10.244.0.0/24' \
    'hostnameOverride: ketch-node' \
    'bindAddress: 127.0.0.1' \
    'healthzBindAddress: 127.0.0.1:20256' \
    'metricsBindAddress: 127.0.0.1:20249' \
    'iptables: {masqueradeAll: true, localhostNodePorts: false}' \
    'conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}' > "$r/kube-proxy.yaml"
  printf '%s\n' \
    '.:53 {' \
    "  bind $NODE_IP" \
    '  errors' \
    '  kubernetes cluster.local in-addr.arpa ip6.arpa {' \
    "    kubeconfig $r/kubeconfig" \
    '    fallthrough in-addr.arpa ip6.arpa' \
    '  }' \
    '}' > "$r/Corefile"
  # the values the kubelet would write into the machine's kernel settings
  printf '1\n' > "$r/fake/panic_on_oops"; printf '10\n' > "$r/fake/panic"
  printf '1\n' > "$r/fake/overcommit_memory"; printf '0\n' > "$r/fake/panic_on_oom"
  printf '1000000\n' > "$r/fake/root_maxkeys"; printf '25000000\n' > "$r/fake/root_maxbytes"
  # containerd and the kubelet, run by cluster-up in a private mount namespace
  printf '%s\n' \
    '#!/bin/bash' \
    'set -e' \
    "R=$r" \
    'mount -t tmpfs -o mode=0700 tmpfs /run/containerd' \
    'mount -t tmpfs tmpfs /var/log' \
    'for f in kernel/panic_on_oops kernel/panic vm/overcommit_memory vm/panic_on_oom kernel/keys/root_maxkeys kernel/keys/root_maxbytes; do' \
    '  mount --bind "$R/fake/$(basename "$f")" "/proc/sys/$f"' \
    'done' \
    '/usr/bin/containerd --config "$R/containerd.toml" > "$R/containerd.log" 2>&1 &' \
    'echo $! > "$R/containerd.pid"' \
    'for i in $(seq 240); do [ -S "$R/containerd.sock" ] && break; sleep 0.25; done' \
    'ctr -a "$R/containerd.sock" -n k8s.io images import "$R/images.tar" > "$R/images-import.log" 2>&1' \
    'rm -f "$R/images.tar"' \
    "\"$K8SBIN/kubelet\" --config \"\$R/kubelet.yaml\" --kubeconfig \"\$R/kubeconfig\" --root-dir \"\$R/kubelet\" --hostname-override ketch-node --node-ip $NODE_IP > \"\$R/kubelet.log\" 2>&1 &" \
    'echo $! > "$R/kubelet.pid"' \
    'wait' > "$r/run-node.sh"
  chmod +x "$r/run-node.sh"
}

do_cluster_up() {
  [ -x "$K8SBIN/kubelet" ] || die "no Kubernetes binaries: scripts/infra.sh k8sbin"
  [ -x "$(tool kwokctl)" ] && [ -x "$(tool coredns)" ] || die "no kwokctl or coredns: scripts/infra.sh cluster-tools"
  [ ! -f "$RUN/netns.pid" ] || die "a cluster is up already ($RUN): scripts/infra.sh cluster-down first"
  command -v kubectl >/dev/null || die "needs kubectl"
  [ -d /run/containerd ] || die "/run/containerd is missing (start the engine first: scripts/infra.sh engine-start)"
  export DOCKER_HOST="unix://$ENGINE/docker.sock"
  case "$RUN" in */ketch-infra/run) ;; *) die "unexpected run folder $RUN" ;; esac
  rm -rf "$RUN"
  mkdir -p "$RUN"/{cni,cni-ipam,containerd,kubelet,podlogs,fake,kwok}
  # the cluster's cgroups are removed at the end only if the machine had none before
  for d in /sys/fs/cgroup/*/kubepods; do [ -d "$d" ] && echo "$d"; done > "$RUN/cgroups.before" || true
  write_node_files "$RUN"

  log "network namespace"
  # the holder writes its own pid (from inside the namespace), then becomes `sleep`
  setsid unshare --net sh -c "echo \$\$ > '$RUN/netns.pid.tmp'; exec sleep infinity" < /dev/null > /dev/null 2>&1 &
  wait_for 10 "the network namespace" test -s "$RUN/netns.pid.tmp"
  mv "$RUN/netns.pid.tmp" "$RUN/netns.pid"
  [ "$(readlink "/proc/$(cat "$RUN/netns.pid")/ns/net")" != "$(readlink /proc/self/ns/net)" ] || die "no new network namespace"
  in_ns ip link set lo up
  in_ns ip link add kcbr0 type bridge
  in_ns ip addr add "$NODE_IP/24" dev kcbr0
  in_ns ip link set kcbr0 up
  # Service addresses route to the bridge; kube-proxy's DNAT sends them on to pods
  in_ns ip route add default dev kcbr0
  # this namespace's own settings
  in_ns sysctl -qw net.ipv4.ip_forward=1
  in_ns sysctl -qw net.bridge.bridge-nf-call-iptables=1 2>/dev/null || true

  log "control plane: etcd, kube-apiserver, kube-controller-manager, kube-scheduler (kwokctl)"
  KWOK_WORKDIR="$RUN/kwok" in_ns "$(tool kwokctl)" create cluster --name ketch --runtime binary \
    --kube-apiserver-binary "$K8SBIN/kube-apiserver" --kube-controller-manager-binary "$K8SBIN/kube-controller-manager" \
    --kube-scheduler-binary "$K8SBIN/kube-scheduler" --etcd-binary "$(command -v etcd)" \
    --disable kwok-controller --config "$RUN/kwokctl.yaml" --kubeconfig "$RUN/kubeconfig" --wait 3m \
    > "$RUN/kwokctl.log" 2>&1 || { tail -30 "$RUN/kwokctl.log" >&2; die "kwokctl create failed"; }
  export KUBECONFIG="$RUN/kubeconfig"

  log "node images: $*"
  local pausefs
  pausefs=$(mktemp -d)
  cp "$K8SBIN/pause" "$pausefs/pause"
  tar -C "$pausefs" -c pause | docker import -c 'ENTRYPOINT ["/pause"]' - ketch/pause:3.10 >/dev/null
  rm -rf "$pausefs"
  docker save -o "$RUN/images.tar" ketch/pause:3.10 "$@"

  log "containerd and kubelet"
  ns_daemon "$RUN/node.pid" "$RUN/run-node.log" unshare --mount --propagation private "$RUN/run-node.sh"
  ns_daemon "$RUN/coredns.pid" "$RUN/coredns.log" "$(tool coredns)" -conf "$RUN/Corefile"
  ns_daemon "$RUN/kube-proxy.pid" "$RUN/kube-proxy.log" "$K8SBIN/kube-proxy" --config "$RUN/kube-proxy.yaml"

  wait_for 300 "node ketch-node to register" in_ns kubectl get node ketch-node
  in_ns kubectl wait --for=condition=Ready node/ketch-node --timeout=240s >/dev/null \
    || { tail -20 "$RUN/kubelet.log" >&2; die "the node did not turn Ready"; }
  log "node ketch-node Ready, Kubernetes $(in_ns kubectl get node ketch-node -o jsonpath='{.status.nodeInfo.kubeletVersion}')"
}

do_cluster_down() {
  [ -d "$RUN" ] || return 0
  export KUBECONFIG="$RUN/kubeconfig"
  local p d f ns holder
  holder=$(cat "$RUN/netns.pid" 2>/dev/null || true)
  if [ -n "$holder" ] && kill -0 "$holder" 2>/dev/null && [ -f "$RUN/kubelet.pid" ]; then
    # the pods first, gracefully, while the kubelet runs
    in_ns kubectl delete deploy,statefulset,job,pod,svc,pvc,pdb,hpa --all --wait=false >/dev/null 2>&1 || true
    in_ns kubectl wait --for=delete pod --all --timeout=60s >/dev/null 2>&1 || true
  fi
  stop_pid "$RUN/kube-proxy.pid" 10
  stop_pid "$RUN/kubelet.pid" 20
  stop_pid "$RUN/coredns.pid" 10
  if [ -S "$RUN/containerd.sock" ] && [ -f "$RUN/containerd.pid" ]; then   # pods left: killed by containerd
    for f in $(ctr -a "$RUN/containerd.sock" -n k8s.io tasks ls -q 2>/dev/null); do
      ctr -a "$RUN/containerd.sock" -n k8s.io tasks kill -s SIGKILL "$f" >/dev/null 2>&1 || true
    done
    sleep 1
  fi
  stop_pid "$RUN/containerd.pid" 20
  if [ -d "$RUN/kwok/clusters/ketch" ]; then
    KWOK_WORKDIR="$RUN/kwok" "$(tool kwokctl)" delete cluster --name ketch --kubeconfig "$RUN/kubeconfig" >/dev/null 2>&1 || true
    for f in "$RUN"/kwok/clusters/ketch/pids/*.pid; do [ -f "$f" ] && stop_pid "$f" 10; done
  fi
  # what is left in the cluster's cgroups (pod processes, shims) is the cluster's own
  for d in /sys/fs/cgroup/pids/kubepods; do
    [ -d "$d" ] && ! grep -qx "$d" "$RUN/cgroups.before" 2>/dev/null || continue
    for p in $(find "$d" -name cgroup.procs -exec cat {} + 2>/dev/null); do
      log "stopping leftover pod process $p"; kill -9 "$p" 2>/dev/null || true
    done
  done
  # and so is anything still in its network namespace (started there by this script)
  if [ -n "$holder" ]; then
    ns=$(readlink "/proc/$holder/ns/net" 2>/dev/null || true)
    if [ -n "$ns" ] && [ "$ns" != "$(readlink /proc/self/ns/net)" ]; then
      for p in /proc/[0-9]*; do
        p=${p#/proc/}
        [ "$p" != "$holder" ] && [ "$(readlink "/proc/$p/ns/net" 2>/dev/null)" = "$ns" ] || continue
        log "stopping leftover pid $p ($(tr '\0' ' ' < "/proc/$p/cmdline" 2>/dev/null | cut -c1-70))"
        kill "$p" 2>/dev/null || true
      done
    fi
  fi
  stop_pid "$RUN/node.pid" 10
  stop_pid "$RUN/netns.pid" 5
  # the kubelet's cgroups, when the machine had none before
  for d in /sys/fs/cgroup/*/kubepods; do
    [ -d "$d" ] || continue
    grep -qx "$d" "$RUN/cgroups.before" 2>/dev/null && continue
    find "$d" -depth -type d -exec rmdir {} \; 2>/dev/null || log "could not remove all of $d"
  done
  case "$RUN" in */ketch-infra/run) rm -rf "$RUN" ;; esac
  log "cluster down"
}

case "${1:-help}" in
  cluster-up) shift; do_cluster_up "$@" ;;
  cluster-down) do_cluster_down ;;
  in-cluster) shift; do_in_cluster "$@" ;;
  tool-path) tool "$2" ;;
  engine-start) do_engine_start ;;
  engine-stop) do_engine_stop ;;
  apt) do_apt ;;
  tools) do_tools ;;
  cluster-tools) do_cluster_tools ;;
  k8sbin) do_k8sbin ;;
  *) sed -n '2,22p' "$0"; exit 2 ;;
esac
