"""Our layers at this checkout against the same layers at another commit, in one process.

``python -m benchmarks.bench_versions --base REF [bench_modules options]`` runs the module
benchmark (``bench_modules``) with a third implementation: this package as it was at commit
``REF``, so a restructure or a speed change is measured side by side with its starting point,
interleaved with torch.nn and validated like ours. The table then has a ``base@REF/ours``
column: above 1, this checkout is faster than ``REF``.

How the old package is loaded next to the new one: ``git archive REF src/batchnorm`` is unpacked
into a temporary directory as a package named ``batchnorm_base``, with its custom-op namespace
renamed (``batchnorm::`` -> ``batchnorm_base::``; torch refuses to register an op name twice
in one process), and imported from there. Its Numba kernels compile into that directory on the
first (validation) call, which is never timed.
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import torch

from . import bench_modules
from .cases import Case

REPO = Path(__file__).resolve().parent.parent


def load_base(ref: str, into: Path):
    """Import the package as it was at ``ref`` under the name ``batchnorm_base``."""
    archive = subprocess.run(
        ["git", "archive", "--format=tar", ref, "src/batchnorm"],
        cwd=REPO,
        check=True,
        capture_output=True,
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    package = into / "batchnorm_base"
    (into / "src" / "batchnorm").rename(package)
    for path in package.rglob("*.py"):
        text = path.read_text()
        renamed = text.replace('"batchnorm::', '"batchnorm_base::').replace(
            "torch.ops.batchnorm.", "torch.ops.batchnorm_base."
        )
        if renamed != text:
            path.write_text(renamed)
    sys.path.insert(0, str(into))
    return importlib.import_module("batchnorm_base")


def base_factory(base):
    def factory(case: Case, state: dict) -> torch.nn.Module:
        module = getattr(base, case.kind)(case.num_features, dtype=case.torch_dtype)
        module.load_state_dict(state)
        return module

    return factory


def main(argv: list[str] | None = None) -> int:
    """Run bench_modules with the layers of ``--base`` as one more implementation."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_versions", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--base", required=True, help="git commit to compare against")
    args, rest = parser.parse_known_args(argv)
    with tempfile.TemporaryDirectory(prefix="batchnorm-base-") as tmp:
        base = load_base(args.base, Path(tmp))
        return bench_modules.main(rest, extra={f"base@{args.base}": base_factory(base)})


if __name__ == "__main__":
    sys.exit(main())
