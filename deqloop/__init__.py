"""deqloop: looped transformers treated as deep equilibrium models.

The fixed-point solvers live in the standalone package `solvers`; tasks in `tasks`.
"""

__version__ = "0.1.0"
