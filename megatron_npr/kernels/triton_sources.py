"""The Triton kernels' sources: the repository's top-level `kernels/` folder, loaded by path.

`kernels/` has no `__init__.py` and is never installed as a package of its own: a top-level
package named `kernels` would shadow an unrelated PyPI package. Its modules are loaded here under
`megatron_npr.kernels.triton.<name>`, which works for an editable install and for a checkout on
PYTHONPATH (the GPU machine runs from one). Nothing imports triton until a Triton backend is
chosen; without a GPU the kernels run in Triton's interpreter (`TRITON_INTERPRET=1`, set here
before triton's first import: triton.language's own helpers are jit functions decorated then, so a
triton imported earlier, e.g. by torch.compile, is refused; tests/conftest.py sets it up front).
"""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

KERNEL_DIR = Path(__file__).resolve().parents[2] / "kernels"
PREFIX = "megatron_npr.kernels.triton"


def interpreted() -> bool:
    """True when kernels run in Triton's interpreter (on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _interpreter_ready(triton) -> bool:
    """False when triton.language's own jit helpers were built for the compiler, not the interpreter."""
    from triton.runtime.jit import JITFunction
    return not isinstance(getattr(triton.language, "zeros", None), JITFunction)


def load(name: str) -> ModuleType:
    """kernels/<name>.py as a module (once per process), or ImportError saying what is missing."""
    qualified = f"{PREFIX}.{name}"
    if qualified in sys.modules:
        return sys.modules[qualified]
    import torch
    if not torch.cuda.is_available():  # before triton's first import: it decorates tl.zeros & co. then
        os.environ.setdefault("TRITON_INTERPRET", "1")
    try:
        import triton
    except Exception as e:  # noqa: BLE001 - missing, or broken on this machine
        raise ImportError(f"the Triton kernels need triton: pip install -e '.[kernels]' ({e!r})") from e
    if interpreted() and not _interpreter_ready(triton):
        raise ImportError("triton was imported before TRITON_INTERPRET=1 was set (e.g. by torch.compile or "
                          "transformers): set TRITON_INTERPRET=1 in the environment to run the Triton kernels on CPU")
    path = KERNEL_DIR / f"{name}.py"
    if not path.is_file():
        raise ImportError(f"kernel source {path} is missing: the Triton kernels live in the repository's kernels/ "
                          "folder (install with pip install -e, or put the checkout on PYTHONPATH)")
    spec = importlib.util.spec_from_file_location(qualified, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[qualified] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[qualified]
        raise
    return module
