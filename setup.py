# Metadata lives in pyproject.toml; this file wires in the cffi module and
# builds the C library (csrc/build_lib.py) before the extension links it.
import os
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc"))
import build_lib  # noqa: E402

del sys.path[0]


class build_ext_with_library(build_ext):
    """Build libpymirror.so.N (and its header, .pc file and linker script)
    into the build tree, copy them into the source tree for in-place and
    editable builds, then build the extension linked against it."""

    def run(self):
        # setuptools builds into build_lib, then copies extensions back for
        # --inplace/editable builds; the library follows the same way.
        inplace = self.inplace or getattr(self, "editable_mode", False)
        super().run()
        if inplace:
            here = os.path.dirname(os.path.abspath(__file__))
            build_lib.copy_tree(os.path.join(self.build_lib, "pymirror"), os.path.join(here, "pymirror"))

    def build_extensions(self):
        # self.compiler is set up by now (CC, CFLAGS honoured)
        lib_dir = build_lib.build(self.compiler, self.build_temp, os.path.join(self.build_lib, "pymirror"),
                                  self.distribution.get_version())
        for ext in self.extensions:
            ext.library_dirs.append(lib_dir)
        super().build_extensions()


setup(
    cffi_modules=["csrc/build_ffi.py:ffi"],
    cmdclass={"build_ext": build_ext_with_library},
    # The extension uses the stable ABI (cffi builds it with Py_LIMITED_API):
    # one wheel, tagged cp39-abi3, serves Python 3.9 to 3.13.
    options={"bdist_wheel": {"py_limited_api": "cp39"}},
)
