"""Interpreter start-up of a worker's vLLM processes, where this install carries a torchvision,
torchaudio or torchcodec that fails to import (invariant.companions).

vLLM spawns its engine processes with ``python -c``; they unpickle vLLM modules, which load
transformers, which imports torchvision, before any code of ours runs there. The worker puts this
folder first on PYTHONPATH for them (only when it had to hide something itself), so the broken
package is hidden at start-up. Then the next ``sitecustomize`` on the path, if any, runs as it
would have without this one.
"""

import importlib.machinery
import importlib.util
import os
import sys

try:
    from invariant import companions

    companions.hide_broken()
finally:
    _here = os.path.dirname(os.path.abspath(__file__))
    _rest = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    _spec = importlib.machinery.PathFinder.find_spec("sitecustomize", _rest)
    if _spec is not None and _spec.loader is not None and _spec.origin != os.path.abspath(__file__):
        _next = importlib.util.module_from_spec(_spec)
        sys.modules["sitecustomize"] = _next
        _spec.loader.exec_module(_next)
