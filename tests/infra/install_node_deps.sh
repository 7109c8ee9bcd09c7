#!/usr/bin/env bash
# Install, once per machine, the Debian packages the tests need: the test node (tests/infra/node.py)
# and its image builds, the browser that opens the run report, and Fashion-MNIST. Idempotent: prints nothing and touches nothing when everything is already installed.
#
#   sudo bash tests/infra/install_node_deps.sh
#
# What each package is for:
#   containerd runc                 the container runtime the kubelet drives (CRI), and its OCI runtime
#   containernetworking-plugins     bridge, host-local, portmap, loopback in /usr/lib/cni (pod network)
#   iptables conntrack              kube-proxy's Service rules (iptables mode) and its conntrack flushes
#   iproute2 util-linux mount kmod  the node's own interface, private mount namespaces, unmounting
#   openssl ca-certificates         the cluster's certificates
#   debootstrap buildah             the test images (a debootstrapped Debian base, built with buildah)
#   gcc libc6-dev                   the pod sandbox image's static pause program (tests/infra/pause.c)
#   skopeo                          copies built images out of buildah's storage (tests/infra/images.py)
#   chromium chromium-driver        headless Chromium, driven by Selenium, opens the HTML report (tests/browser.py)
#   dataset-fashion-mnist           Fashion-MNIST's IDX files in /usr/share/datasets/fashion-mnist (config=fashion-mnist)
set -euo pipefail

packages=(
  containerd runc containernetworking-plugins
  iptables conntrack
  iproute2 util-linux mount kmod
  openssl ca-certificates
  debootstrap buildah
  gcc libc6-dev skopeo
  chromium chromium-driver
  dataset-fashion-mnist
)

say() { echo "install_node_deps: $*" >&2; }

missing=()
for pkg in "${packages[@]}"; do
  status=$(dpkg-query -W -f='${db:Status-Status}' "$pkg" 2>/dev/null || true)
  [[ $status == installed ]] || missing+=("$pkg")
done
((${#missing[@]})) || exit 0

if ((EUID != 0)); then
  say "needs root to install: ${missing[*]} (run it as root, e.g. with sudo)"
  exit 1
fi

say "installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
# Package lists may be absent on a fresh machine (images often ship without them) or stale.
apt-get -q update >&2
# No recommends: buildah would pull fuse-overlayfs and friends, which nothing here uses.
apt-get -q install -y --no-install-recommends "${missing[@]}" >&2
say "done"
