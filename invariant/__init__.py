"""invariant: bitwise-reproducible LLM serving, and the exact cache it makes sound.

The top-level package holds the tools that start and drive the components (the CLI, `invariant
up`, process helpers, the determinism benchmark, machine facts, the model maker); the components
are subpackages mapped from the repository's top-level folders (``contract/``: the names every
component shares, standard library only; ``kernels/``, ``worker/``, ``gateway/``, ``operator/``).
"""

__version__ = "0.1.0"
