"""Cache-hit latency and throughput of the gateway, beside a bare FastAPI + Redis GET endpoint.

Everything runs on this machine, each server in its own process, the load from wrk (Debian's
`wrk`, in its own process): a real worker on a made tiny model, a real redis-server, the gateway
with one warm entry, and the baseline - a FastAPI endpoint that does nothing but one Redis GET of
a value of the same size. Prints a table and writes docs/results/gateway_hits.{json,md,png}.

Run: python bench/gateway_hits.py [--seconds 10]     (needs: apt-get install wrk redis-server)
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from invariant.contract import routes
from invariant.contract.worker_argv import worker_argv

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "docs" / "results"
BODY = {"model": "tiny", "prompt": "Tell me about reproducibility", "max_tokens": 32, "temperature": 0}

BASELINE_APP = '''
import os, redis.asyncio as r
from fastapi import FastAPI, Response
app = FastAPI()
client = r.from_url(os.environ["REDIS_URL"], socket_timeout=0.05, socket_connect_timeout=0.05)
@app.post("/v1/completions")
async def get():
    return Response(await client.get("bench:value"), media_type="application/json")
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_http(url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready")


def wrk(url: str, connections: int, seconds: int, tmp: Path) -> dict:
    script = tmp / "post.lua"
    script.write_text('wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\n'
                      f"wrk.body = {json.dumps(json.dumps(BODY))}\n")
    out = subprocess.run(["wrk", "-t", "1" if connections == 1 else "2", "-c", str(connections), "-d", f"{seconds}s",
                          "--latency", "-s", str(script), url], capture_output=True, text=True, check=True).stdout

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        value, unit = float(m.group(1)), m.group(2)
        return value / 1000 if unit == "us" else value * 1000 if unit == "s" else value

    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {"rps": rps, "p50_ms": ms("50"), "p99_ms": ms("99"), "errors": int(non2xx.group(1)) if non2xx else 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=int, default=10)
    args = ap.parse_args()
    for tool in ("wrk", "redis-server"):
        if not shutil.which(tool):
            sys.exit(f"{tool} is not installed: apt-get install wrk redis-server")
    from invariant.modelmaker import ModelSpec, make_model
    from invariant.processes import stop_all

    procs: list[subprocess.Popen] = []
    tmp = Path(tempfile.mkdtemp())
    try:
        model = make_model(tmp / "tiny", ModelSpec())
        rport, wport, gport, bport = free_port(), free_port(), free_port(), free_port()
        redis_url = f"redis://127.0.0.1:{rport}/0"
        procs.append(subprocess.Popen(["redis-server", "--port", str(rport), "--save", "", "--maxmemory", "256mb",
                                       "--maxmemory-policy", "allkeys-lru"], stdout=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, "-m", "invariant",
                                       *worker_argv(str(model), port=wport, served_model_name="tiny")], stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL))
        print("starting worker ...", flush=True)
        wait_http(f"http://127.0.0.1:{wport}{routes.READY}")
        procs.append(subprocess.Popen([sys.executable, "-m", "invariant", "gateway", "--port", str(gport), "--model",
                                       f"tiny=http://127.0.0.1:{wport}", "--redis-url", redis_url],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(f"http://127.0.0.1:{gport}/ready", 60)
        gw = f"http://127.0.0.1:{gport}/v1/completions"
        first = httpx.post(gw, json=BODY, timeout=60)
        assert first.headers["x-invariant-cache"] == "MISS", first.headers
        assert httpx.post(gw, json=BODY, timeout=60).headers["x-invariant-cache"] == "HIT"
        value = first.content  # the baseline returns a value of the same size
        import redis

        redis.Redis(port=rport).set("bench:value", value)
        app_file = tmp / "baseline_app.py"
        app_file.write_text(BASELINE_APP)
        procs.append(subprocess.Popen([sys.executable, "-m", "uvicorn", "baseline_app:app", "--port", str(bport),
                                       "--log-level", "warning", "--no-access-log"], cwd=tmp,
                                      env={**os.environ, "REDIS_URL": redis_url}, stdout=subprocess.DEVNULL))
        time.sleep(2)
        base = f"http://127.0.0.1:{bport}/v1/completions"
        assert httpx.post(base, json=BODY).content == value
        rows = []
        for name, url in (("bare FastAPI + Redis GET", base), ("invariant gateway (hit)", gw)):
            for conns in (1, 64):
                print(f"wrk {name} c={conns} ...", flush=True)
                result = wrk(url, conns, args.seconds, tmp)
                rows.append({"server": name, "connections": conns, **result})
    finally:
        stop_all(procs, timeout=20)
        shutil.rmtree(tmp, ignore_errors=True)

    base64 = next(r for r in rows if r["server"].startswith("bare") and r["connections"] == 64)["rps"]
    for r in rows:
        r["vs_bare"] = round(r["rps"] / base64, 2) if r["connections"] == 64 else None
    meta = {"date": datetime.date.today().isoformat(), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "seconds": args.seconds, "response_bytes": len(value), "tool": "wrk 4.1, one process per server"}
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "gateway_hits.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    lines = [f"Measured {meta['date']} on {meta['machine']}; {meta['tool']}; {args.seconds} s per run; "
             f"{len(value)}-byte responses; every server in one process.", "",
             "| server | connections | requests/s | p50 ms | p99 ms | non-2xx | hits/s vs bare (c=64) |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['server']} | {r['connections']} | {r['rps']:.0f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['errors']} | {r['vs_bare'] if r['vs_bare'] is not None else ''} |")
    table = "\n".join(lines)
    print(table)
    (RESULTS / "gateway_hits.md").write_text(table + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        labels = [f"{r['server']}\nc={r['connections']}" for r in rows if r["connections"] == 64]
        ax.bar(labels, [r["rps"] for r in rows if r["connections"] == 64], color=["#999", "#2a6"])
        ax.set_ylabel("requests/s (c=64)")
        ax.set_title("Cache hits vs a bare FastAPI + Redis GET")
        fig.tight_layout()
        fig.savefig(RESULTS / "gateway_hits.png", dpi=120)
    except ImportError:
        pass


if __name__ == "__main__":
    main()
