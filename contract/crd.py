"""The DeterministicModel custom resource's identity: the operator serves it, the gateway reads it."""

from __future__ import annotations

import re

GROUP = "invariant.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DeterministicModel"
PLURAL = "deterministicmodels"
SINGULAR = "deterministicmodel"

# A Kubernetes DNS label (RFC 1123): what namespace names and our object names must be.
DNS_LABEL = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$")
