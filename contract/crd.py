"""The DeterministicModel custom resource's identity: the operator serves it, the gateway reads it."""

from __future__ import annotations

GROUP = "invariant.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DeterministicModel"
PLURAL = "deterministicmodels"
SINGULAR = "deterministicmodel"
