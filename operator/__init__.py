"""The Kubernetes operator (kopf) for DeterministicModel resources."""
