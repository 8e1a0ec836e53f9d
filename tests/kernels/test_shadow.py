"""`python -m ...` from the repository root puts it on sys.path, where our kernels/ folder (installed as
moequant.kernels) would shadow the Hugging Face `kernels` package that transformers imports: the folder hands
the top-level name to the installed package."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_top_level_kernels_from_the_repository_root_is_the_hugging_face_package():
    code = ("import kernels, transformers.activations, moequant.kernels as ours; "
            "print(kernels.__file__); print(ours.__file__); print(hasattr(kernels, 'get_kernel'))")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs, ours, api = proc.stdout.split()
    assert not Path(theirs).is_relative_to(ROOT) and api == "True"
    assert Path(ours) == ROOT / "kernels" / "__init__.py"
