#!/usr/bin/env bash
# Render the Helm chart with its default values into plain manifests, for `kubectl apply`
# without Helm: deploy/manifests/ketch.yaml (release "ketch", namespace "default").
#   scripts/render_manifests.sh            write the file
#   scripts/render_manifests.sh --stdout   print it (tests/deploy compares the two)
set -euo pipefail
cd "$(dirname "$0")/.."
helm=$(scripts/infra.sh tool-path helm)
[ -x "$helm" ] || scripts/infra.sh tools
render() {
  echo "# Rendered from deploy/helm/ketch with its default values by scripts/render_manifests.sh:"
  echo "# do not edit (change the chart, then run the script). kubectl apply -f deploy/manifests/"
  "$helm" template ketch deploy/helm/ketch --namespace default --kube-version 1.31.0
}
if [ "${1:-}" = --stdout ]; then
  render
else
  mkdir -p deploy/manifests
  render > deploy/manifests/ketch.yaml
  echo "wrote deploy/manifests/ketch.yaml"
fi
