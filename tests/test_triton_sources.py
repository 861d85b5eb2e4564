"""The Triton kernels' sources are the repository's kernels/ folder, loaded by path: never a
top-level `kernels` package (it would shadow an unrelated PyPI one), clear errors when missing."""
import subprocess
import sys
from pathlib import Path

import pytest

from megatron_npr.kernels import triton_sources

ROOT = Path(__file__).resolve().parent.parent


def test_kernels_folder_is_not_a_package_and_is_not_installed_as_one():
    assert triton_sources.KERNEL_DIR == ROOT / "kernels" and triton_sources.KERNEL_DIR.is_dir()
    assert not (ROOT / "kernels" / "__init__.py").exists()
    setup = (ROOT / "setup.py").read_text()
    assert '"kernels"' not in setup.split("extras_require")[0]  # not in packages / package_dir


def test_a_missing_kernel_source_is_named():
    with pytest.raises(ImportError, match=r"kernels/no_such_kernel\.py is missing"):
        triton_sources.load("no_such_kernel")


def test_without_triton_the_error_names_the_extra(tmp_path):
    blocker = tmp_path / "triton.py"
    blocker.write_text("raise ImportError('triton is not installed here')\n")
    code = ("from megatron_npr.kernels import triton_sources\n"
            "try:\n    triton_sources.load('npr_flash_attention')\n"
            "except ImportError as e:\n    print('ERR', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert "ERR the Triton kernels need triton: pip install -e '.[kernels]'" in out.stdout, out.stdout + out.stderr
