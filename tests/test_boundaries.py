"""The gateway and the operator never import the worker, the kernels, torch or vLLM: their images
carry none of them."""

from __future__ import annotations

import subprocess
import sys

import pytest

MODULES = {
    "gateway": ["invariant.gateway.app", "invariant.gateway.server", "invariant.gateway.discovery"],
    "operator": ["invariant.operator.handlers", "invariant.operator.crd"],
    "contract": ["invariant.contract." + m for m in
                 ("crd", "fingerprint", "routes", "cache", "engine_args", "worker_argv", "net")],
}


def _loaded_after(modules: list[str], condition: str) -> str:
    """The modules a fresh interpreter holds after importing ``modules`` for which ``condition``
    (a Python expression over the module name ``m``) holds, comma-separated."""
    code = ("import sys, " + ", ".join(modules) + "\n"
            f"bad = sorted(m for m in sys.modules if {condition})\n"
            "print(','.join(bad))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


@pytest.mark.parametrize("component", sorted(MODULES))
def test_component_imports_no_engine(component):
    assert _loaded_after(MODULES[component], "m.split('.')[0] in ('torch', 'vllm', 'transformers') "
                         "or m.startswith(('invariant.worker', 'invariant.kernels'))") == ""


@pytest.mark.parametrize("component", ["gateway", "operator", "contract"])
def test_the_contract_imports_no_component_and_no_tool(component):
    """The contract is imported by everyone and imports no one: no worker, kernels, gateway,
    operator or tool module comes with it (the gateway and operator bring the contract only)."""
    assert _loaded_after(MODULES[component], "m.startswith('invariant.') and not m.startswith("
                         f"('invariant.contract', 'invariant.{component}'))") == ""


def test_the_trainer_brings_the_kernels_not_the_worker_or_the_services():
    """The trainer calls the worker's kernels directly: importing it loads no worker, gateway or
    operator code (an RL training job carries no serving stack)."""
    assert _loaded_after(["invariant.trainer", "invariant.trainer.parity"],
                         "m.startswith(('invariant.worker', 'invariant.gateway', 'invariant.operator'))") == ""
