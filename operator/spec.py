"""Validate a DeterministicModel spec: every refusal is a sentence for a status condition.

The CRD schema catches shapes and ranges at admission; what it cannot express (an image without a
digest, an engine argument that would break invariance, a model source that is not pinned) is
refused here, and the operator reports it as ``Ready=False, reason=InvalidSpec``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from invariant.contract.engine_args import GPU_GEMM_DEFAULT, GPU_GEMMS, engine_arg_errors
from invariant.contract import cache as cache_policy, crd, fingerprint

API_GROUP, API_VERSION, KIND, PLURAL = crd.GROUP, crd.VERSION, crd.KIND, crd.PLURAL

IMAGE_DIGEST = re.compile(r"^(?P<repo>[a-z0-9]+(?:[._\-/:][a-z0-9]+)*)@sha256:[0-9a-f]{64}$")
HF_REVISION = re.compile(r"^[0-9a-f]{40}$")
HF_REPO = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*/[A-Za-z0-9][A-Za-z0-9_.\-]*$")
DRIVER_VERSION = re.compile(r"^\d+\.\d+(\.\d+)?$")
FINGERPRINT = re.compile(fingerprint.PATTERN)
DNS_LABEL = crd.DNS_LABEL
DTYPES = ("bfloat16", "float16", "float32")
SHARING = cache_policy.SHARING

class SpecError(ValueError):
    """The spec is refused; ``errors`` holds one sentence per problem."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class ModelSource:
    served_name: str
    hf_repo: str | None = None
    hf_revision: str | None = None
    pvc_claim: str | None = None
    pvc_path: str | None = None


@dataclass(frozen=True)
class Numerics:
    image: str
    gpu_product: str
    driver_version: str
    dtype: str
    tensor_parallel_size: int
    expected_fingerprint: str | None = None
    gemm: str = GPU_GEMM_DEFAULT

    def pins(self) -> dict[str, Any]:
        pins = {"image": self.image, "gpuProduct": self.gpu_product, "driverVersion": self.driver_version,
                "dtype": self.dtype, "tensorParallelSize": self.tensor_parallel_size}
        if self.gemm != GPU_GEMM_DEFAULT:  # only when chosen: models deployed before the field keep their pins hash
            pins["gemm"] = self.gemm
        return pins


@dataclass(frozen=True)
class ModelSpecView:
    """A validated, defaulted spec: what rendering works from."""

    name: str
    namespace: str
    model: ModelSource
    numerics: Numerics
    replicas: int = 1
    resources: Mapping[str, Any] = field(default_factory=dict)
    node_selector: Mapping[str, str] = field(default_factory=dict)
    tolerations: tuple[Mapping[str, Any], ...] = ()
    engine_args: tuple[str, ...] = ()
    cache_ttl_seconds: int = cache_policy.DEFAULT_TTL_SECONDS
    cache_sharing: str = cache_policy.DEFAULT_SHARING


def parse_spec(name: str, namespace: str, spec: Mapping[str, Any]) -> ModelSpecView:
    """Validate and default a spec; raise SpecError listing every problem at once."""
    errors: list[str] = []
    if not DNS_LABEL.match(name or "") or len(name) > 40:
        errors.append(f"metadata.name {name!r} must be a DNS label of at most 40 characters")

    model = spec.get("model") or {}
    served = model.get("servedName") or name
    hf, pvc = model.get("huggingFace"), model.get("pvc")
    source = ModelSource(served_name=served)
    if bool(hf) == bool(pvc):
        errors.append("spec.model needs exactly one of huggingFace or pvc")
    elif hf:
        repo, rev = hf.get("repo", ""), hf.get("revision", "")
        if not HF_REPO.match(repo):
            errors.append(f"spec.model.huggingFace.repo {repo!r} must look like owner/name")
        if not HF_REVISION.match(rev):
            errors.append(f"spec.model.huggingFace.revision {rev!r} must be a 40-hex commit hash: a branch or tag can move")
        source = ModelSource(served_name=served, hf_repo=repo, hf_revision=rev)
    else:
        claim, path = pvc.get("claimName", ""), pvc.get("path", "")
        if not DNS_LABEL.match(claim):
            errors.append(f"spec.model.pvc.claimName {claim!r} must be a PVC name")
        if not path or path.startswith("/") or ".." in path.split("/"):
            errors.append(f"spec.model.pvc.path {path!r} must be a relative path inside the claim")
        source = ModelSource(served_name=served, pvc_claim=claim, pvc_path=path)

    num = spec.get("numerics") or {}
    image = num.get("image", "")
    if not IMAGE_DIGEST.match(image):
        if "@sha256:" in image:
            errors.append(f"spec.numerics.image {image!r} has a malformed digest: expected @sha256: and 64 hex digits")
        else:
            errors.append(f"spec.numerics.image {image!r} must be pinned by digest (repo@sha256:...): a tag can move")
    gpu = num.get("gpuProduct", "")
    if not gpu or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._\-]*$", gpu):
        errors.append(f"spec.numerics.gpuProduct {gpu!r} must be a GPU product label value, e.g. NVIDIA-H100-80GB-HBM3")
    driver = str(num.get("driverVersion", ""))
    if not DRIVER_VERSION.match(driver):
        errors.append(f"spec.numerics.driverVersion {driver!r} must look like 580.95.05")
    dtype = num.get("dtype", "bfloat16")
    if dtype not in DTYPES:
        errors.append(f"spec.numerics.dtype {dtype!r} must be one of {', '.join(DTYPES)}")
    tp = num.get("tensorParallelSize", 1)
    if not isinstance(tp, int) or isinstance(tp, bool) or not 1 <= tp <= 8:
        errors.append(f"spec.numerics.tensorParallelSize {tp!r} must be an integer from 1 to 8")
    gemm = num.get("gemm", GPU_GEMM_DEFAULT)
    if gemm not in GPU_GEMMS:
        errors.append(f"spec.numerics.gemm {gemm!r} must be one of {', '.join(GPU_GEMMS)}")
    expected = num.get("expectedFingerprint")
    if expected is not None and not FINGERPRINT.match(expected):
        errors.append(f"spec.numerics.expectedFingerprint {expected!r} must look like inv- and 16 hex digits")

    replicas = spec.get("replicas", 1)
    if not isinstance(replicas, int) or isinstance(replicas, bool) or not 0 <= replicas <= 64:
        errors.append(f"spec.replicas {replicas!r} must be an integer from 0 to 64")
    engine_args = list(spec.get("engineArgs") or [])
    errors += engine_arg_errors(engine_args)
    cache = spec.get("cache") or {}
    ttl = cache.get("ttlSeconds", cache_policy.DEFAULT_TTL_SECONDS)
    if not isinstance(ttl, int) or isinstance(ttl, bool) or ttl < 0:
        errors.append(f"spec.cache.ttlSeconds {ttl!r} must be a non-negative integer")
    sharing = cache.get("sharing", cache_policy.DEFAULT_SHARING)
    if sharing not in SHARING:
        errors.append(f"spec.cache.sharing {sharing!r} must be one of {', '.join(SHARING)}")
    if errors:
        raise SpecError(errors)
    return ModelSpecView(
        name=name,
        namespace=namespace,
        model=source,
        numerics=Numerics(image=image, gpu_product=gpu, driver_version=driver, dtype=dtype,
                          tensor_parallel_size=tp, expected_fingerprint=expected, gemm=gemm),
        replicas=replicas,
        resources=spec.get("resources") or {},
        node_selector=spec.get("nodeSelector") or {},
        tolerations=tuple(spec.get("tolerations") or ()),
        engine_args=tuple(engine_args),
        cache_ttl_seconds=ttl,
        cache_sharing=sharing,
    )
