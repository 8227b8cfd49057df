"""The contract: every name the components must agree on, defined once.

The gateway, the operator, the worker and the tools import these modules instead of keeping their
own copies of a route, a CRD field, a default or a format. Standard library only (a test enforces
it), so that the gateway's and the operator's images, which carry no torch or vLLM, can import it:

- ``crd``: the DeterministicModel's API group, version, kind and plural;
- ``fingerprint``: the numerics fingerprint's format;
- ``routes``: the worker's HTTP routes and the JSON fields others read from them;
- ``cache``: cache-policy defaults and the sharing values;
- ``engine_args``: which vLLM engine arguments a user may add, and the compile-shape arguments;
- ``worker_argv``: the one function that writes a worker's options as its command line;
- ``net``: the port check every server runs before it loads anything.
"""
