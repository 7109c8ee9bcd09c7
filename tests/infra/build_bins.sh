#!/usr/bin/env bash
# Build, once per machine, the real Kubernetes components the tests run: helm, etcd, kube-apiserver.
#
#   bash tests/infra/build_bins.sh                 # all three
#   bash tests/infra/build_bins.sh kube-apiserver  # just some
#
# Versions come from tests/infra/versions.env. Binaries are cached under
#   ${CLUSTERFIT_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clusterfit/bin}/<tool>-<version>/<tool>
# and a tool is skipped when its cached binary runs and reports the expected version. Everything is
# built from the Go module proxy (GOPROXY as configured); the script prints the final paths on stdout,
# progress and build times on stderr. First run on 2 cores: see the timings in the project notes
# (kube-apiserver dominates: hundreds of MB of modules and many CPU-minutes).
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=versions.env
source "$here/versions.env"
cache=${CLUSTERFIT_BIN_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/clusterfit/bin}

# -mod=mod lets `go build` write the throwaway wrapper modules' go.mod/go.sum; -trimpath and no VCS
# stamping keep the builds independent of where they ran.
export GOFLAGS="-mod=mod -trimpath -buildvcs=false"
export GOWORK=off
export CGO_ENABLED=0

log() { echo "build_bins: $*" >&2; }
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

# Does the cached binary run and report the version we want?
is_current() {
  local tool=$1 bin=$2 want=$3 out
  [[ -x $bin ]] || return 1
  case $tool in
    helm) out=$("$bin" version --template '{{.Version}}' 2>/dev/null) || return 1 ;;
    etcd) out=$("$bin" --version 2>/dev/null | sed -n 's/^etcd Version: /v/p') || return 1 ;;
    kube-apiserver) out=$("$bin" --version 2>/dev/null | sed -n 's/^Kubernetes //p') || return 1 ;;
  esac
  [[ $out == "$want" ]]
}

build_helm() {  # $1: output file
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
  GOBIN=$(dirname "$1") go install -ldflags "${ldflags//$'\n'/ }" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
}

build_etcd() {  # $1: output file
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
  (cd "$work" && go build -ldflags "-s -w" -o "$1" go.etcd.io/etcd/server/v3)
}

build_kube_apiserver() {  # $1: output file
  local work gomod staging_version major minor m ldflags=(-s -w)
  work=$(mktemp -d "$tmp/kube-apiserver.XXXX")
  gomod=$(gomod_of "k8s.io/kubernetes@$KUBERNETES_VERSION")
  # k8s.io/kubernetes requires its staging modules at v0.0.0 and replaces them with ./staging/...;
  # a wrapper replaces each with the published v0.X.Y of the same release instead.
  staging_version="v0.${KUBERNETES_VERSION#v1.}"
  {
    echo "module clusterfit.test/build/kube-apiserver"
    go_directives "$gomod"
    echo "require k8s.io/kubernetes $KUBERNETES_VERSION"
    echo "replace ("
    awk -v v="$staging_version" '$2 == "=>" && $3 ~ /^\.\/staging\// {print "\t" $1 " => " $1 " " v}' "$gomod"
    echo ")"
  } >"$work/go.mod"
  log "kube-apiserver wrapper replaces $(grep -c ' => ' "$work/go.mod") staging modules with $staging_version"
  # Stamp the version the way hack/lib/version.sh does, or /version says v0.0.0 and clients balk.
  major=$(echo "$KUBERNETES_VERSION" | cut -d. -f1 | tr -d v)
  minor=$(echo "$KUBERNETES_VERSION" | cut -d. -f2)
  for m in k8s.io/client-go/pkg/version k8s.io/component-base/version; do
    ldflags+=(-X "$m.gitVersion=$KUBERNETES_VERSION" -X "$m.gitMajor=$major" -X "$m.gitMinor=$minor"
      -X "$m.gitTreeState=clean" -X "$m.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)")
  done
  (cd "$work" && go build -ldflags "${ldflags[*]}" -o "$1" k8s.io/kubernetes/cmd/kube-apiserver)
}

version_of() {
  case $1 in
    helm) echo "$HELM_VERSION" ;;
    etcd) echo "$ETCD_VERSION" ;;
    kube-apiserver) echo "$KUBERNETES_VERSION" ;;
    *) log "unknown tool '$1' (expected helm, etcd, kube-apiserver)"; exit 2 ;;
  esac
}

main() {
  local tools=("$@") tool version bin start
  ((${#tools[@]})) || tools=(helm etcd kube-apiserver)
  mkdir -p "$cache"
  # One build at a time per cache, so parallel test runs do not race each other.
  if command -v flock >/dev/null; then
    exec 9>"$cache/.lock"
    flock 9
  fi
  tmp=$(mktemp -d "$cache/.build.XXXX")
  trap 'chmod -R u+w "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
  for tool in "${tools[@]}"; do
    version=$(version_of "$tool")
    bin="$cache/$tool-$version/$tool"
    if is_current "$tool" "$bin" "$version"; then
      log "$tool $version: cached"
    else
      log "$tool $version: building (this can take minutes)"
      start=$SECONDS
      mkdir -p "$tmp/out"
      "build_${tool//-/_}" "$tmp/out/$tool"
      mkdir -p "$(dirname "$bin")"
      mv -f "$tmp/out/$tool" "$bin.new" && mv -f "$bin.new" "$bin"
      is_current "$tool" "$bin" "$version" || { log "$tool: built binary does not report $version"; exit 1; }
      log "$tool $version: built in $((SECONDS - start))s"
    fi
    echo "$bin"
  done
}

main "$@"
