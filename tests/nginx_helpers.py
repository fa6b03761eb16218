"""deploy/nginx.conf for tests: find nginx, fill in the template, run it in the foreground."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

NGINX_TEMPLATE = Path(__file__).resolve().parent.parent / "deploy" / "nginx.conf"
NGINX_CANDIDATES = ("/usr/sbin/nginx", "/usr/local/sbin/nginx")
PLACEHOLDER = re.compile(r"\$\{([A-Z0-9_]+)\}")
REPLICAS = 3  # the template's upstream slots


def find_nginx() -> str:
    """The nginx binary; skips the test without one, or fails it in CI."""
    found = shutil.which("nginx") or next((p for p in NGINX_CANDIDATES if os.access(p, os.X_OK)), None)
    if found is None:
        reason = "the nginx tests need nginx (apt-get install nginx)"
        if os.environ.get("CI") == "true":
            pytest.fail(reason)
        pytest.skip(reason)
    return found


def render_nginx_conf(listen_port: int, replicas: list[str], run_dir: Path) -> str:
    """deploy/nginx.conf with its placeholders filled in, as envsubst would (every placeholder must be known)."""
    if len(replicas) != REPLICAS:
        raise ValueError(f"the template has {REPLICAS} replica slots, got {len(replicas)} addresses")
    values = {"LISTEN_PORT": str(listen_port), "NGINX_RUN_DIR": str(run_dir),
              **{f"REPLICA_{i}": address for i, address in enumerate(replicas, 1)}}
    return PLACEHOLDER.sub(lambda m: values[m.group(1)], NGINX_TEMPLATE.read_text(encoding="utf-8"))


def nginx_command(nginx: str, run_dir: Path, *extra: str) -> list[str]:
    """nginx with prefix, config and startup error log all in ``run_dir``, in the foreground."""
    return [nginx, "-p", str(run_dir), "-c", str(run_dir / "nginx.conf"), "-e", "stderr", "-g", "daemon off;", *extra]
