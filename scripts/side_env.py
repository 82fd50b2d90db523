"""A side virtual environment for a benchmark contender that needs other package versions (DeepSpeed AutoEP
and transformers 5.17, scripts/bench_train.py): made from the base interpreter, it sees the base's packages
and, when the bench runs in a virtual environment, that environment's packages too."""
from __future__ import annotations

import os
import subprocess
import sys


def base_python() -> str:
    """The interpreter the running one was made from (the running one itself outside a virtual environment)."""
    return getattr(sys, "_base_executable", None) or sys.executable


def _running_site_packages() -> list[str]:
    """The running virtual environment's site-packages folders (none outside one)."""
    if sys.prefix == sys.base_prefix:
        return []
    import site

    return [p for p in site.getsitepackages() if os.path.realpath(p).startswith(os.path.realpath(sys.prefix))]


def side_env(venv: str, pip: bool = True) -> str:
    """A virtual environment at ``venv`` made from the base interpreter with its packages
    (``--system-site-packages``) and, when this script runs in a virtual environment, that environment's
    packages (``site.addsitedir`` from a .pth file, so its own .pth files count too). A venv made from a
    venv's python inherits the base interpreter's packages only. The side environment's own packages come
    first: its transformers is the one imported."""
    py = os.path.join(venv, "bin", "python")
    if not os.path.exists(py):
        subprocess.run([base_python(), "-m", "venv", "--system-site-packages", *([] if pip else ["--without-pip"]),
                        venv], check=True)
    purelib = subprocess.run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    lines = [f"import site; site.addsitedir({p!r})" for p in _running_site_packages()]
    with open(os.path.join(purelib, "ds-hexamoe-running-venv.pth"), "w") as fh:
        fh.write("".join(line + "\n" for line in lines))
    return py
