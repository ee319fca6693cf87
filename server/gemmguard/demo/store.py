"""The embedded demo model: made once into the cache dir, reused afterwards."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from gemmguard.demo.checkpoint import write_demo_model

DEMO_SERVED_NAME = "gemmguard-demo"
# Bump when the demo checkpoint's content changes, so old caches are not reused.
DEMO_REVISION = "v1"


def demo_model_path(cache_dir: Path, scheme: str) -> Path:
    """Where the demo checkpoint for `scheme` lives (it may not exist yet)."""
    return cache_dir / "demo" / f"{DEMO_REVISION}-seed0-{scheme}"


def ensure_demo_model(path: Path, scheme: str) -> Path:
    """Write the demo checkpoint to `path` unless it is already complete there."""
    if (path / "config.json").is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so an interrupted run never leaves half a model.
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        write_demo_model(tmp, scheme)
        tmp.rename(path)
    except OSError:
        if not (path / "config.json").is_file():
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path
