"""invariant: bitwise-reproducible LLM serving, and the exact cache it makes sound.

The top-level package holds only what every component may import (the CLI and the model
maker); the service subpackages are mapped from the repository's top-level folders
(``kernels/``, ``worker/``, ``gateway/``, ``operator/``).
"""

__version__ = "0.1.0"
