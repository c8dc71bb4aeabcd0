# Metadata lives in pyproject.toml; this file only wires in the cffi module.
from setuptools import setup

setup(cffi_modules=["csrc/build_ffi.py:ffi"])
