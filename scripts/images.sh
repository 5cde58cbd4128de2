#!/usr/bin/env bash
# images.sh: build Ketch's container images with the docker engine that DOCKER_HOST names
# (or the default one), from a Debian base image made here with debootstrap: no registry.
#
#   scripts/images.sh [IMAGE ...] [--no-cache] [--ca-certs DIR] [--report FILE]
#
# IMAGE is any of: base ketch python python-sklearn python-onnx python-torch java r
# (default: all, in that order). Each is tagged $KETCH_IMAGE_PREFIX<name>:<ketch version>
# (prefix default "ketch/"), e.g. ketch/python-sklearn:0.1.0. The base image
# (ketch/debian:bookworm) is made once with `debootstrap --variant=minbase` from the
# machine's own Debian mirror and reused; `base` in the list makes it again.
#
# --ca-certs DIR: extra CA certificates (*.crt) that package downloads during the build must
#   trust (a TLS-inspecting proxy). They are used in the build stages only and never reach a
#   final image. Default: $KETCH_CA_CERTS, else the machine's locally added CAs
#   (/usr/local/share/ca-certificates) when it has any.
# --report FILE: append one JSON line per image: name, tag, seconds, bytes.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

PREFIX=${KETCH_IMAGE_PREFIX:-ketch/}
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml | head -1)
BASE_TAG="${PREFIX}debian:bookworm"
ALL=(ketch python python-sklearn python-onnx python-torch java r)
# framework versions: pinned here, written into each image's labels, checked in its build
SKLEARN_VERSION=1.9.1
ONNXRUNTIME_VERSION=1.23.2
TORCH_VERSION=1.13.1      # Debian bookworm's python3-torch (CPU)
JAVA_VERSION=17           # Debian bookworm's OpenJDK, as a jlink runtime
R_VERSION=4.2             # Debian bookworm's r-base-core

want=() no_cache=() report="" ca_dir=${KETCH_CA_CERTS:-}
while [ $# -gt 0 ]; do
  case $1 in
    --no-cache) no_cache=(--no-cache) ;;
    --ca-certs) ca_dir=$2; shift ;;
    --report) report=$2; shift ;;
    -h|--help) sed -n '2,21p' "$0"; exit 0 ;;
    -*) echo "images.sh: unknown option $1" >&2; exit 2 ;;
    *) want+=("$1") ;;
  esac
  shift
done
[ ${#want[@]} -gt 0 ] || want=("${ALL[@]}")
if [ -z "$ca_dir" ] && compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
  ca_dir=/usr/local/share/ca-certificates
fi
NICE=${NICE:-nice -n 10}

log() { echo "[$(date +%T)] images: $*" >&2; }

docker info >/dev/null 2>&1 || { echo "images.sh: no docker engine answers (DOCKER_HOST=${DOCKER_HOST:-default}); on a machine without one: eval \"\$(scripts/infra.sh engine-start)\"" >&2; exit 1; }

record() { # name tag seconds
  local bytes; bytes=$(docker image inspect -f '{{.Size}}' "$2")
  printf '%-16s %-34s %5ss %6s MB\n' "$1" "$2" "$3" "$((bytes / 1000000))" >&2
  [ -z "$report" ] || printf '{"image": "%s", "tag": "%s", "seconds": %s, "bytes": %s}\n' "$1" "$2" "$3" "$bytes" >> "$report"
}

build_base() {
  # debootstrap minbase from the mirror apt already uses; docs, man pages and locales are
  # kept out of every later layer by a dpkg filter (copyright files stay).
  command -v debootstrap >/dev/null || { echo "images.sh: needs debootstrap (scripts/infra.sh apt)" >&2; exit 1; }
  local mirror rootfs t0=$SECONDS
  mirror=$(awk '/^URIs:/{print $2; exit}' /etc/apt/sources.list.d/debian.sources 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)
  [ -n "$mirror" ] || mirror=http://deb.debian.org/debian
  rootfs=$(mktemp -d "${TMPDIR:-/tmp}/ketch-rootfs.XXXXXX")
  trap 'rm -rf "$rootfs"' RETURN
  log "debootstrap bookworm from $mirror"
  $NICE debootstrap --variant=minbase bookworm "$rootfs" "$mirror" > "$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; rm -f "$rootfs.log"; exit 1; }
  rm -f "$rootfs.log"
  if [ -f /etc/apt/sources.list.d/debian.sources ]; then
    cp /etc/apt/sources.list.d/debian.sources "$rootfs/etc/apt/sources.list.d/"
    rm -f "$rootfs/etc/apt/sources.list"
  fi
  cat > "$rootfs/etc/dpkg/dpkg.cfg.d/90-ketch-slim" <<'EOF'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
path-exclude /usr/share/lintian/*
EOF
  # no recommends, and no package caches left in any layer (as Debian's official images do)
  cat > "$rootfs/etc/apt/apt.conf.d/90-ketch-slim" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
Acquire::Languages "none";
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb || true"; };
EOF
  find "$rootfs/usr/share/doc" -mindepth 2 ! -name copyright ! -type d -delete 2>/dev/null || true
  rm -rf "$rootfs"/usr/share/man/* "$rootfs"/usr/share/info/* "$rootfs"/usr/share/locale/* \
    "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/*.log
  # update-alternatives (e.g. of a JDK) fails without the folders of the man pages it links
  mkdir -p "$rootfs"/usr/share/man/man{1,5,7,8}
  tar -C "$rootfs" -c . | docker import \
    -c 'ENV LANG=C.UTF-8 PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    -c 'CMD ["/bin/bash"]' -m "debootstrap --variant=minbase bookworm" - "$BASE_TAG" >/dev/null
  record base "$BASE_TAG" $((SECONDS - t0))
}

# The build context: the project's files (tracked and untracked, not ignored), the image
# helpers and the extra CAs, in a temporary folder.
context=$(mktemp -d "${TMPDIR:-/tmp}/ketch-context.XXXXXX")
cleanup() { rm -rf "$context"; }
trap cleanup EXIT
trap 'exit 130' INT TERM
make_context() {
  mkdir -p "$context/src" "$context/certs"
  git ls-files -co --exclude-standard -- pyproject.toml README.md broker sdk/python sdk/java sdk/r \
    | while IFS= read -r f; do [ -e "$f" ] && printf '%s\n' "$f"; done \
    | tar -C "$ROOT" -c -T - | tar -C "$context/src" -x
  install -m 0755 docker/ketch-probe "$context/ketch-probe"
  if [ -n "$ca_dir" ]; then
    find "$ca_dir" -maxdepth 1 -name '*.crt' -exec cp {} "$context/certs/" \;
    log "build stages trust the CAs in $ca_dir ($(ls "$context/certs" | wc -l) files)"
  fi
  touch "$context/certs/.keep"
}

build() { # name dockerfile [build-arg ...]
  local name=$1 file=$2 tag="${PREFIX}$1:$VERSION" t0=$SECONDS
  shift 2
  local args=(--build-arg "BASE=$BASE_TAG" --build-arg "KETCH_VERSION=$VERSION")
  local a
  for a in "$@"; do args+=(--build-arg "$a"); done
  log "building $tag"
  if ! $NICE docker build --network host --force-rm "${no_cache[@]}" "${args[@]}" -f "$file" \
      -t "$tag" "$context" > "$context/build-$name.log" 2>&1; then
    tail -40 "$context/build-$name.log" >&2
    echo "images.sh: building $tag failed" >&2
    exit 1
  fi
  record "$name" "$tag" $((SECONDS - t0))
}

for name in "${want[@]}"; do
  [ "$name" = base ] && { build_base; continue; }
  docker image inspect "$BASE_TAG" >/dev/null 2>&1 || build_base
  [ -d "$context/src" ] || make_context
  case $name in
    ketch) build ketch docker/ketch/Dockerfile ;;
    python) build python docker/python/Dockerfile FRAMEWORK=python FRAMEWORK_VERSION=3.11 ;;
    python-sklearn) build python-sklearn docker/python/Dockerfile FRAMEWORK=scikit-learn \
      "FRAMEWORK_VERSION=$SKLEARN_VERSION" "PIP_PACKAGES=scikit-learn==$SKLEARN_VERSION" ;;
    python-onnx) build python-onnx docker/python/Dockerfile FRAMEWORK=onnxruntime \
      "FRAMEWORK_VERSION=$ONNXRUNTIME_VERSION" "PIP_PACKAGES=onnxruntime==$ONNXRUNTIME_VERSION" ;;
    python-torch) build python-torch docker/python/Dockerfile FRAMEWORK=torch \
      "FRAMEWORK_VERSION=$TORCH_VERSION" "APT_PACKAGES=python3-torch" "PIP_PACKAGES=numpy<2" \
      "VENV_FLAGS=--system-site-packages" ;;
    java) build java docker/java/Dockerfile "FRAMEWORK_VERSION=$JAVA_VERSION" ;;
    r) build r docker/r/Dockerfile "FRAMEWORK_VERSION=$R_VERSION" ;;
    *) echo "images.sh: no image named $name (one of: base ${ALL[*]})" >&2; exit 2 ;;
  esac
done
