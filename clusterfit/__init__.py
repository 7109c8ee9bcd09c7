"""clusterfit: ClusterFit (CVPR 2020) as resumable, object-storage-native, Kubernetes-native software."""

__version__ = "0.1.0"
