#!/usr/bin/env bash
# Build, once per machine, the real Kubernetes components the tests run.
#
#   bash tests/infra/build_bins.sh                 # helm, etcd, kube-apiserver (the fast tests' set)
#   bash tests/infra/build_bins.sh node            # everything tests/infra/node.py starts, plus helm
#   bash tests/infra/build_bins.sh kubelet coredns # just some (tool names or the groups below)
#
# Tools: helm etcd kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy kubectl
# coredns training-operator minio toxiproxy-server. Groups: base (the default), node, all.
#
# Versions come from tests/infra/versions.env. Binaries are cached under
#   ${CLUSTERFIT_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clusterfit/bin}/<tool>-<version>/<tool>
# and a tool is skipped when its cached binary runs and reports the expected version. Everything is
# built from the Go module proxy (GOPROXY as configured); the script prints the final paths on stdout,
# progress and build times (wall and CPU) on stderr. The Kubernetes binaries come from one throwaway
# wrapper module and one `go build`, so the packages they share compile once.
#
# Cold (empty module, build and binary caches; `all`, in this order, 2 cores shared with other work,
# 2026-12-01): kube-apiserver + kubelet + kube-controller-manager + kube-scheduler + kube-proxy +
# kubectl 996 s wall / 1106 CPU-s, helm 232 s / 227, etcd 90 s / 97, coredns 224 s / 240,
# training-operator 307 s / 282 (reuses the k8s.io packages above), minio 348 s / 402: 37 min wall,
# 39 CPU-min, 2.7 GB of modules and 5.9 GB of Go build cache. Warm: `base` 0.4 s, `node` 2 s.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${CLUSTERFIT_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clusterfit/bin}

# -mod=mod lets `go build` write the throwaway wrapper modules' go.mod/go.sum; -trimpath and no VCS
# stamping keep the builds independent of where they ran (and let their compiled packages be shared
# through the Go build cache).
export GOFLAGS="-mod=mod -trimpath -buildvcs=false"
export GOWORK=off
export CGO_ENABLED=0

KUBE_TOOLS=(kube-apiserver kubelet kube-controller-manager kube-scheduler kube-proxy kubectl)
BASE_TOOLS=(helm etcd kube-apiserver)
NODE_TOOLS=(helm etcd "${KUBE_TOOLS[@]}" coredns training-operator minio toxiproxy-server)
ALL_TOOLS=("${NODE_TOOLS[@]}")
# CoreDNS plugins compiled in: what tests/infra/node_config.py's Corefile uses, and a few small ones
# (cache, hosts, log, loop, reload) for debugging; the full set drags in three cloud SDKs.
COREDNS_PLUGINS=(bind cache errors forward health hosts kubernetes loadbalance log loop ready reload)

log() { echo "build_bins: $*" >&2; }

# Sets CPU to the CPU seconds (user + sys) of this shell's finished children so far: bash's `times`,
# run in this shell (in a $(...) subshell it would count the subshell's children only).
read_cpu() {
  times >"$tmp/times"
  CPU=$(awk 'NR == 2 { for (i = 1; i <= 2; i++) { split($i, t, "m"); sub("s", "", t[2]); s += t[1] * 60 + t[2] }
    printf "%d", s }' "$tmp/times")
}
command -v go >/dev/null || { log "needs Go (1.26 or newer) on PATH"; exit 1; }

# Path of a module's go.mod in the module cache (downloading it if needed).
gomod_of() {
  go mod download -json "$1" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p'
}

# The `go` line and any `godebug` lines (single or block form) of a go.mod: GODEBUG defaults come
# from the main module, so a wrapper module must carry the wrapped project's own.
go_directives() {
  awk '/^go /{print} /^godebug \(/{blk=1} blk{print} blk&&/^\)/{blk=0; next} /^godebug [^(]/{print}' "$1"
}

is_kube_tool() {
  local t
  for t in "${KUBE_TOOLS[@]}"; do [[ $t == "$1" ]] && return 0; done
  return 1
}

version_of() {
  case $1 in
    helm) echo "$HELM_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    coredns) echo "$COREDNS_VERSION" ;;
    training-operator) echo "$TRAINING_OPERATOR_VERSION" ;;
    minio) echo "$MINIO_VERSION" ;;
    toxiproxy-server) echo "$TOXIPROXY_VERSION" ;;
    *) if is_kube_tool "$1"; then echo "$KUBERNETES_VERSION"; else
         log "unknown tool '$1' (expected one of: ${ALL_TOOLS[*]}, or a group: base node all)"; exit 2; fi ;;
  esac
}

# The version a binary reports (or, for tools without a version flag, the main module's version in
# its build info after checking that it runs at all).
reported_version() {
  local tool=$1 bin=$2
  case $tool in
    helm) "$bin" version --template '{{.Version}}' ;;
    etcd) "$bin" --version | sed -n 's/^etcd Version: /v/p' ;;
    kubectl) "$bin" version --client | sed -n 's/^Client Version: //p' ;;
    coredns) "$bin" -version | sed -n 's/^CoreDNS-/v/p' ;;
    toxiproxy-server) "$bin" -version | awk '{print $NF}' ;;
    training-operator | minio)
      "$bin" --help >/dev/null 2>&1 || return 1
      go version -m "$bin" | awk '$1 == "mod" {print $3}' ;;
    *) "$bin" --version | sed -n 's/^Kubernetes //p' ;;
  esac
}

# Does the cached binary run and report the version we want?
is_current() {
  local tool=$1 bin=$2 want=$3 out
  [[ -x $bin ]] || return 1
  out=$(reported_version "$tool" "$bin" 2>/dev/null) || return 1
  [[ $out == "$want" ]]
}

build_helm() {  # $1: output dir
  local gomod client_go minor
  gomod=$(gomod_of "helm.sh/helm/v3@$HELM_VERSION")
  # Helm's own Makefile derives the Kubernetes version it assumes from its client-go (v0.36 -> 1.36);
  # unstamped it believes the cluster is 1.20.
  client_go=$(awk '$1 == "k8s.io/client-go" {print $2; exit}' "$gomod")
  minor=$(echo "$client_go" | cut -d. -f2)
  local ldflags="-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION
    -X helm.sh/helm/v3/internal/version.gitTreeState=clean
    -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/chartutil.k8sVersionMinor=$minor
    -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMajor=1 -X helm.sh/helm/v3/pkg/lint/rules.k8sVersionMinor=$minor"
  # helm's go.mod has no replace lines, so `go install m@v` builds it as the main module.
  GOBIN=$1 go install -ldflags "${ldflags//$'\n'/ }" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_etcd() {  # $1: output dir
  local work gomod
  work=$(mktemp -d "$tmp/etcd.XXXX")
  gomod=$(gomod_of "go.etcd.io/etcd/server/v3@$ETCD_VERSION")
  # etcd's go.mod files carry replace lines, so it is not `go install`-able; its sibling modules are
  # published at the same tag, so a wrapper that just requires the server module resolves them.
  {
    echo "module clusterfit.test/build/etcd"
    go_directives "$gomod"
    echo "require go.etcd.io/etcd/server/v3 $ETCD_VERSION"
  } >"$work/go.mod"
  (cd "$work" && go build -ldflags "-s -w" -o "$1/etcd" go.etcd.io/etcd/server/v3)
}

# $1: output dir; $2...: Kubernetes tools (kube-apiserver, kubelet, ...), built in ONE `go build` so
# the packages they share compile once and both cores stay busy across all of them.
build_kube() {
  local out=$1 work gomod staging_version major minor m t pkgs=() ldflags=(-s -w)
  shift
  work=$(mktemp -d "$tmp/kube.XXXX")
  gomod=$(gomod_of "k8s.io/kubernetes@$KUBERNETES_VERSION")
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging/...;
  # a wrapper replaces each with the published v0.X.Y of the same release instead.
  staging_version="v0.${KUBERNETES_VERSION#v1.}"
  {
    echo "module clusterfit.test/build/kubernetes"
    go_directives "$gomod"
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo "replace ("
    awk -v v="$staging_version" '$2 == "=>" && $3 ~ /^\.\/staging\// {print "\t" $1 " => " $1 " " v}' "$gomod"
    echo ")"
  } >"$work/go.mod"
  log "kubernetes wrapper replaces $(grep -c ' => ' "$work/go.mod") staging modules with $staging_version"
  # Stamp the version the way hack/lib/version.sh does, or /version says v0.0.0 and clients balk.
  major=$(echo "$KUBERNETES_VERSION" | cut -d. -f1 | tr -d v)
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  for m in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=(-X "$m.gitVersion=$KUBERNETES_VERSION" -X "$m.gitMajor=$major" -X "$m.gitMinor=$minor"
      -X "$m.gitTreeState=clean" -X "$m.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
  done
  for t in "$@"; do pkgs+=("k8s.io/kubernetes/cmd/$t"); done
  (cd "$work" && go build -ldflags "${ldflags[*]}" -o "$out/" "${pkgs[@]}")
}

build_coredns() {  # $1: output dir
  local work gomod p
  work=$(mktemp -d "$tmp/coredns.XXXX")
  gomod=$(gomod_of "github.com/coredns/coredns@$COREDNS_VERSION")
  # CoreDNS's own main imports every plugin (route53, azure and clouddns bring three cloud SDKs);
  # a wrapper main with just the plugins our Corefile uses builds in a fraction of the time. The
  # plugins register themselves in init(); dnsserver.Directives keeps the upstream order.
  {
    echo "module clusterfit.test/build/coredns"
    go_directives "$gomod"
    echo "require github.com/coredns/coredns $COREDNS_VERSION"
  } >"$work/go.mod"
  {
    echo "package main"
    echo "import ("
    echo "	\"github.com/coredns/coredns/coremain\""
    for p in "${COREDNS_PLUGINS[@]}"; do echo "	_ \"github.com/coredns/coredns/plugin/$p\""; done
    echo ")"
    echo "func main() { coremain.Run() }"
  } >"$work/main.go"
  (cd "$work" && go build -ldflags "-s -w" -o "$1/coredns" .)
}

build_training_operator() {  # $1: output dir
  # Its go.mod has no replace lines: `go install` builds it as the main module (build info then
  # carries the module version, which is_current reads back).
  GOBIN=$1 go install -ldflags "-s -w" \
    "github.com/kubeflow/training-operator/cmd/training-operator.v1@$TRAINING_OPERATOR_VERSION"
  mv "$1/training-operator.v1" "$1/training-operator"
}

build_minio() {  # $1: output dir
  GOBIN=$1 go install -ldflags "-s -w" "github.com/minio/minio@$MINIO_VERSION"
}

build_toxiproxy_server() {  # $1: output dir
  # The fault tests' network faults (resets, stalls, latency) between the steps and MinIO.
  GOBIN=$1 go install -ldflags "-s -w -X github.com/Shopify/toxiproxy/v2.Version=$TOXIPROXY_VERSION" \
    "github.com/Shopify/toxiproxy/v2/cmd/server@$TOXIPROXY_VERSION"
  mv "$1/server" "$1/toxiproxy-server"
}

# Move a freshly built binary into its cache slot and check it.
install_tool() {
  local tool=$1 built=$2 version bin
  version=$(version_of "$tool")
  bin="$cache/$tool-$version/$tool"
  mkdir -p "$(dirname "$bin")"
  mv -f "$built" "$bin.new" && mv -f "$bin.new" "$bin"
  is_current "$tool" "$bin" "$version" || { log "$tool: built binary does not report $version"; exit 1; }
}

expand_groups() {
  local arg
  for arg in "$@"; do
    case $arg in
      base) printf '%s\n' "${BASE_TOOLS[@]}" ;;
      node) printf '%s\n' "${NODE_TOOLS[@]}" ;;
      all) printf '%s\n' "${ALL_TOOLS[@]}" ;;
      *) echo "$arg" ;;
    esac
  done | awk '!seen[$0]++'
}

# Build one unit, a tool or the Kubernetes tools together, under that unit's own lock: a run that needs
# only some tools (the fast tests' base set) waits for those, not for a parallel run's whole list.
build_unit() {  # $1: unit (kube, or the tool's name); $2...: its tools
  local unit=$1 t version start cpu stale=()
  shift
  if command -v flock >/dev/null; then
    exec 9>"$cache/.lock-$unit"
    flock 9
  fi
  for t in "$@"; do
    version=$(version_of "$t")
    if is_current "$t" "$cache/$t-$version/$t" "$version"; then
      log "$t $version: cached"
    else
      stale+=("$t")
    fi
  done
  if ((${#stale[@]})); then
    version=$(version_of "${stale[0]}")
    log "${stale[*]} $version: building (this can take minutes)"
    start=$SECONDS && read_cpu && cpu=$CPU
    rm -rf "$tmp/out" && mkdir -p "$tmp/out"
    if [[ $unit == kube ]]; then
      build_kube "$tmp/out" "${stale[@]}"
    else
      "build_${unit//-/_}" "$tmp/out"
    fi
    for t in "${stale[@]}"; do install_tool "$t" "$tmp/out/$t"; done
    read_cpu
    log "${stale[*]} $version: built in $((SECONDS - start))s ($((CPU - cpu)) CPU-s)"
  fi
  exec 9>&-
}

main() {
  local tools=() tool kube=() others=() t
  (($#)) || set -- base
  for t in "$@"; do  # unknown names fail here, before any build starts
    [[ $t == base || $t == node || $t == all ]] || version_of "$t" >/dev/null
  done
  mapfile -t tools < <(expand_groups "$@")
  mkdir -p "$cache"
  tmp=$(mktemp -d "$cache/.build.XXXX")
  trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
  for tool in "${tools[@]}"; do
    if is_kube_tool "$tool"; then kube+=("$tool"); else others+=("$tool"); fi
  done
  # The base set's small tools first, then the Kubernetes build (kube-apiserver is in the base set),
  # then the node's other tools: a parallel run that waits for the base set is served early.
  for tool in "${others[@]}"; do
    if [[ $tool == helm || $tool == etcd ]]; then build_unit "$tool" "$tool"; fi
  done
  if ((${#kube[@]})); then build_unit kube "${kube[@]}"; fi
  for tool in "${others[@]}"; do
    if [[ $tool != helm && $tool != etcd ]]; then build_unit "$tool" "$tool"; fi
  done
  for tool in "${tools[@]}"; do
    echo "$cache/$tool-$(version_of "$tool")/$tool"
  done
}

main "$@"
