"""Prepare real vLLM for the device machine, which has torch and Triton but no vLLM and no network.

    python bench/gpu_vllm_carry.py [--out .carry] [--piece-mib 58]

What it does (../shared/notes/gpu-vllm-on-device.md has the story):
1. downloads, as py3.12 manylinux wheels without dependencies, ``vllm==VLLM`` (the version whose
   torch pin, 2.11.0 with CUDA 13, is the device image's) and the requirements the image lacks;
2. unpacks them into one tree and drops what an H100 never loads (pre-Hopper FlashAttention, the
   Rust frontend, Blackwell-only kernels, DeepGEMM);
3. packs the tree as a tar.gz, splits it into pieces that fit one device call's carry (64 MiB with
   the working tree), and writes ``MANIFEST.json`` (piece names, sizes, SHA-256 of the whole).

Then, one device call per piece, each within the 30 s the machine stays warm after the last:

    run(carry=[".carry/vllm.tgz.000"], command="mkdir -p /tmp/carry && cp .carry/vllm.tgz.* /tmp/carry/")
    ... the same for .001, .002 ...
    run(carry=[".carry/vllm.tgz.003", ".carry/MANIFEST.json"],
        command="cp .carry/* /tmp/carry/ && bash bench/gpu_vllm_install.sh /tmp/carry /tmp/site && ...")

``bench/gpu_vllm_install.sh`` joins the pieces, checks the SHA-256 and unpacks onto a folder to put on
PYTHONPATH. Add ``.carry/`` to ``.git/info/exclude`` (it is in .gitignore).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

VLLM = "0.26.0"
# What vLLM 0.26.0 imports that the device image lacks (the image has torch, triton, transformers,
# tokenizers, numpy, aiohttp, httpx, pyyaml, prometheus-client, ...). Pins follow vLLM's metadata.
REQUIREMENTS = [
    "fastapi>=0.133,<0.137", "starlette", "pydantic", "annotated-types", "typing-inspection", "uvicorn",
    "openai", "distro", "jiter", "sniffio", "httpx2", "httpcore2", "truststore",
    # xgrammar 0.2.3+ needs apache-tvm-ffi >= 0.1.11 (load_lib_module(extra_lib_paths=)); vLLM pins 0.1.10
    "xgrammar==0.2.2", "apache-tvm-ffi==0.1.10",
    "llguidance>=1.7,<1.8", "outlines-core==0.2.14", "lm-format-enforcer==0.11.3", "interegular", "msgspec",
    "pyzmq", "blake3", "cbor2", "pybase64", "partial-json-parser", "prometheus-fastapi-instrumentator",
    "setproctitle", "watchfiles", "python-json-logger", "ijson", "lark==1.2.2", "cachetools",
    "compressed-tensors==0.17.0", "loguru", "depyf==0.20.0", "astor", "dill", "openai-harmony",
    "mistral-common", "pydantic-extra-types", "pycountry", "jsonschema", "referencing", "rpds-py",
    "jsonschema-specifications", "nvtx==0.2.15", "model-hosting-container-standards", "jmespath",
    "supervisor", "frozendict",
]
DROP = ["vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so", "vllm/vllm-rs", "vllm/third_party/fmha_sm100",
        "vllm/third_party/deep_gemm"]
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux_2_31_x86_64", "manylinux_2_34_x86_64", "manylinux_2_24_x86_64", "manylinux1_x86_64"]


def download(spec: str, dest: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(dest), spec]
    for p in PLATFORMS:
        cmd += ["--platform", p]
    cmd += ["--platform", "any"]
    subprocess.run(cmd, check=True)


def requires(wheel: Path, name: str) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        lines = z.read(meta).decode().splitlines()
    return [ln.split(":", 1)[1].strip().split(";")[0] for ln in lines
            if ln.startswith("Requires-Dist:") and ln.split(":", 1)[1].strip().lower().startswith(name)
            and "extra ==" not in ln]


def norm(name: str) -> str:
    return name.lower().replace("-", "_").replace(".", "_").strip()


def version_key(version: str) -> tuple:
    from packaging.version import InvalidVersion, Version

    try:
        return (0, Version(version))
    except InvalidVersion:
        return (1, version)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(".carry"))
    ap.add_argument("--piece-mib", type=int, default=58)
    ap.add_argument("--wheels", type=Path, default=Path.home() / ".cache" / "invariant" / "device-wheels",
                    help="download cache (kept between runs)")
    args = ap.parse_args()
    args.wheels.mkdir(parents=True, exist_ok=True)
    specs = [f"vllm=={VLLM}", *REQUIREMENTS]
    for i, spec in enumerate(specs, 1):
        print(f"[{i}/{len(specs)}] {spec}", flush=True)
        download(spec, args.wheels)
    # pydantic-core must be the exact version pydantic names
    pyd = max(args.wheels.glob("pydantic-*.whl"))
    cores = requires(pyd, "pydantic-core")
    for core in cores:
        print(f"[+] {core}", flush=True)
        download(core.replace(" ", ""), args.wheels)
    pins = {norm(spec.split("==")[0]): spec.split("==")[1] for spec in specs if "==" in spec}
    pins.update({norm(c.split("==")[0]): c.split("==")[1] for c in cores if "==" in c})
    names: dict[str, Path] = {}
    for w in sorted(args.wheels.glob("*.whl"), key=lambda w: version_key(w.name.split("-")[1])):
        name, ver = norm(w.name.split("-")[0]), w.name.split("-")[1]
        if name in pins and ver != pins[name]:
            continue  # the cache may hold other versions from earlier runs
        names[name] = w  # one version per package: the pinned one, else the newest
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "site"
        for w in sorted(names.values()):
            with zipfile.ZipFile(w) as z:
                z.extractall(tree)
        for rel in DROP:
            target = tree / rel
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        args.out.mkdir(parents=True, exist_ok=True)
        for old in args.out.glob("vllm.tgz*"):
            old.unlink()
        archive = args.out / "vllm.tgz"
        print(f"packing {sum(f.stat().st_size for f in tree.rglob('*') if f.is_file()) / 2**20:.0f} MiB", flush=True)
        with tarfile.open(archive, "w:gz", compresslevel=6) as tar:
            tar.add(tree, arcname="site")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    piece = args.piece_mib * 2**20
    pieces = []
    with archive.open("rb") as f:
        for i in range(10_000):
            chunk = f.read(piece)
            if not chunk:
                break
            name = f"vllm.tgz.{i:03d}"
            (args.out / name).write_bytes(chunk)
            pieces.append(dict(name=name, bytes=len(chunk)))
    archive.unlink()
    manifest = dict(vllm=VLLM, sha256=digest, pieces=pieces, wheels=sorted(w.name for w in names.values()))
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=1))
    total = sum(p["bytes"] for p in pieces)
    print(f"{len(pieces)} pieces, {total / 2**20:.0f} MiB, sha256 {digest[:16]}; see {args.out}/MANIFEST.json")


if __name__ == "__main__":
    main()
