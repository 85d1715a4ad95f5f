"""The built-in problem set: KernelBench-format problems written for kernelrl, each with a Triton solution.

``builtin/level<N>/<id>_<Name>.py`` defines ``Model``, ``get_inputs()`` and ``get_init_inputs()``;
``<id>_<Name>.triton.py`` beside it is a reference ``ModelNew`` that passes on the CPU interpreter.
Sizes suit the interpreter; ``KRL_PROBLEM_SCALE=8`` (or more) scales them up for GPU runs.
"""

from pathlib import Path

BUILTIN_ROOT = Path(__file__).parent / "builtin"
