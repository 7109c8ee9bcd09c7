"""Kubernetes delivery: PyTorchJob manifests and the controller. Imports neither torch nor faiss."""
