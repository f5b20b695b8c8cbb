"""The lab: experiments that reproduce the claims of Ioffe & Szegedy (2015) on real data.

From the shell: ``batchnorm lab list``, ``batchnorm lab run figure1 --preset quick``,
``batchnorm lab plot RUN_DIR``. From Python, :func:`run_experiment`, :func:`resume_run` and
:func:`plot_run` do the same; a damaged or foreign file in a run directory raises
:class:`RunFileError`, naming the file. The lab needs the ``lab`` extra (matplotlib, tqdm,
scikit-learn, mnist1d) and uses only the package's public API.

Modules: :mod:`~batchnorm.lab.data` (offline datasets), :mod:`~batchnorm.lab.models` (small
models with a ``norm=`` switch), :mod:`~batchnorm.lab.experiments` (one module per claim),
:mod:`~batchnorm.lab.registry` (the list of experiments), :mod:`~batchnorm.lab.runner` (seeds,
run directories, resume) and :mod:`~batchnorm.lab.plots` (figures).
"""

from .registry import EXPERIMENTS, get_experiment
from .runner import RunFileError, load_run, plot_run, resume_run, run_experiment

__all__ = [
    "EXPERIMENTS",
    "RunFileError",
    "get_experiment",
    "load_run",
    "plot_run",
    "resume_run",
    "run_experiment",
]
