"""Test infrastructure: real etcd, kube-apiserver and helm binaries (see build_bins.sh)."""
