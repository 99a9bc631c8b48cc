"""The wheel carries the converter's native parts (native/build.py builds them into mimbox/_native/),
so `pip install mimbox-*.whl` alone gives a `mimbox` that runs (mimbox.paths finds them there).
Everything else is declared in pyproject.toml."""
import runpy
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution


class BuildWithNative(build_py):
    """build_py, then the core, shims and BPF objects into the built package."""

    def run(self):
        super().run()
        if not self.editable_mode:          # an editable install uses build/ of the checkout
            builder = runpy.run_path(str(Path(__file__).parent / "native" / "build.py"))
            builder["build"](Path(self.build_lib) / "mimbox" / "_native", force=True)


class NativeDistribution(Distribution):
    def has_ext_modules(self):
        return True                         # a platform wheel: it holds compiled code


setup(cmdclass={"build_py": BuildWithNative}, distclass=NativeDistribution)
