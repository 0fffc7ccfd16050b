# Device-only stand-in for PyAV (see benchmarks/device/setup.sh: no av wheel within the 64 MiB carry). ComfyUI 0.33's
# comfy_api imports av at module level for video I/O, which the model benchmark never calls.
import importlib.abc
import importlib.machinery
import sys
import types

class _Any(type):
    def __getattr__(cls, name):
        return _Any(name, (), {})

class _Mod(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return _Any(name, (Exception,), {})

class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        if name == "av" or name.startswith("av."):
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
    def create_module(self, spec):
        m = _Mod(spec.name)
        m.__path__ = []
        return m
    def exec_module(self, module):
        pass

sys.meta_path.insert(0, _Finder())
