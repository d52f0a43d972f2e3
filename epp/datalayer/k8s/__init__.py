"""Kubernetes data layer: InferencePool + pod discovery, objectives and rewrites, leader election."""

from epp.datalayer.k8s.discovery import KubernetesDiscovery, load_api_client
from epp.datalayer.k8s.reflector import Timings

__all__ = ["KubernetesDiscovery", "Timings", "load_api_client"]
