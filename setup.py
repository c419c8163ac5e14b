"""Build script for cdfast.

The Python package lives in cdfast/; the Triton kernels in kernels/ are
installed as ``cdfast.kernels``. The C++/CUDA extension ``cdfast._C`` (csrc/)
is added here by the issue that brings the custom op; until then this is a
pure-Python package.
"""

from setuptools import find_packages, setup

packages = find_packages(include=["cdfast", "cdfast.*"]) + ["cdfast.kernels"]

setup(
    packages=packages,
    package_dir={"cdfast.kernels": "kernels"},
)
