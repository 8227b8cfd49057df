"""The contract (invariant.contract): standard library only, the one home of every shared name, and
the one writer of a worker's command line."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

from invariant.contract import cache, crd, fingerprint, routes
from invariant.contract.worker_argv import FLAGS, worker_argv

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["crd", "fingerprint", "routes", "cache", "engine_args", "worker_argv", "net"]


def test_the_contract_imports_only_the_standard_library():
    code = ("import sys\nbefore = set(sys.modules)\n"
            + "".join(f"import invariant.contract.{m}\n" for m in MODULES)
            + "new = sorted(set(sys.modules) - before)\n"
              "bad = [m for m in new if m.split('.')[0] not in sys.stdlib_module_names\n"
              "       and not (m == 'invariant' or m.startswith('invariant.contract'))]\n"
              "print(','.join(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "", f"the contract imports non-standard modules: {res.stdout}"


# Values that cross a component boundary: written anywhere but the contract, they are a copy.
SHARED_STRINGS = {crd.GROUP, crd.PLURAL, crd.API_VERSION, routes.READY, routes.FINGERPRINT, routes.VERIFY,
                  fingerprint.PREFIX, fingerprint.PATTERN}
SHARED_NUMBERS = {cache.DEFAULT_TTL_SECONDS}
SCANNED = ["gateway", "operator", "worker", "invariant", "bench"]


def _constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and not isinstance(node.value, bool):
            yield node.lineno, node.value


def test_no_component_keeps_its_own_copy_of_a_shared_name():
    copies = [f"{p.relative_to(ROOT)}:{line}: {value!r}"
              for folder in SCANNED for p in sorted((ROOT / folder).rglob("*.py"))
              for line, value in _constants(p)
              if (isinstance(value, str) and value in SHARED_STRINGS)
              or (isinstance(value, int) and value in SHARED_NUMBERS)]
    assert not copies, "shared names copied outside invariant.contract:\n" + "\n".join(copies)


def test_the_scan_sees_a_copy():
    """Control of the test above: a module with a copied route and TTL is reported."""
    probe = ROOT / "bench" / "_contract_probe_tmp.py"
    probe.write_text('URL = "http://w" + "/invariant/ready"\nTTL = 86400\n')
    try:
        found = [v for _, v in _constants(probe) if v in SHARED_STRINGS or v in SHARED_NUMBERS]
    finally:
        probe.unlink()
    assert sorted(map(str, found)) == ["/invariant/ready", "86400"]


def test_worker_argv_writes_what_the_worker_parses():
    from invariant.cli import build_parser

    argv = worker_argv("/m", host="0.0.0.0", port=9000, dtype="bfloat16", served_model_name="tiny",
                       max_model_len=1024, tensor_parallel_size=2, gpu_gemm="invariant",
                       expect_gpu_product="NVIDIA-H200", expect_driver_version="580.159.04",
                       expect_fingerprint="inv-0123456789abcdef", invariance=False,
                       engine_args=["--max-num-seqs=8", "--enable-prefix-caching"])
    assert argv[:3] == ["worker", "--model", "/m"] and argv[-3] == "--no-invariance"
    args = build_parser().parse_args(argv)
    assert (args.model, args.host, args.port, args.dtype, args.served_model_name, args.max_model_len) == \
        ("/m", "0.0.0.0", 9000, "bfloat16", "tiny", 1024)
    assert (args.tensor_parallel_size, args.gpu_gemm, args.no_invariance) == (2, "invariant", True)
    assert (args.expect_gpu_product, args.expect_driver_version, args.expect_fingerprint) == \
        ("NVIDIA-H200", "580.159.04", "inv-0123456789abcdef")
    assert args.engine_arg == ["--max-num-seqs=8", "--enable-prefix-caching"]


def test_worker_argv_leaves_defaults_to_the_worker_and_refuses_unknown_options():
    assert worker_argv("/m") == ["worker", "--model", "/m"]
    assert worker_argv("/m", port=8000, dtype=None) == ["worker", "--model", "/m", "--port", "8000"]
    with pytest.raises(TypeError, match="unknown worker option"):
        worker_argv("/m", prot=8000)


def test_every_worker_flag_is_one_the_worker_parser_declares():
    from invariant.cli import build_parser

    worker = next(a for a in build_parser()._subparsers._group_actions[0].choices.items() if a[0] == "worker")[1]
    declared = {opt for action in worker._actions for opt in action.option_strings}
    assert set(FLAGS.values()) | {"--no-invariance", "--engine-arg"} <= declared


def test_fingerprint_format():
    assert fingerprint.is_fingerprint("inv-0123456789abcdef")
    for bad in ("inv-0123456789ABCDEF", "inv-0123", "xnv-0123456789abcdef", None, 7, "inv-0123456789abcdef\n"):
        assert not fingerprint.is_fingerprint(bad)


def test_every_image_copies_every_package_folder():
    """A package folder missing from an image's COPY lines breaks its pip install (the contract
    folder is imported by all three)."""
    import tomllib

    folders = {d.split("/")[0] for d in tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
               ["package-dir"].values()} | {"invariant"}
    for image in ("gateway", "operator", "worker"):
        text = (ROOT / image / "Dockerfile").read_text()
        missing = sorted(f for f in folders if f"COPY {f} ./{f}" not in text)
        assert not missing, f"{image}/Dockerfile does not copy {missing}"
