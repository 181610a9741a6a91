"""matrix_hpc: peer-to-peer multi-agent synthetic data generation on Ray and Slurm.

Importing the package is light (no Ray, vLLM or torch); the runtime API lives
in :mod:`matrix_hpc.runtime`, the command line in ``matrix-hpc``.
"""

__version__ = "0.1.0"
