"""Stand-ins for ``torchvision`` and ``torchaudio`` where no usable build is installed.

ComfyUI imports both at module level, for model families and nodes Wan does not use: 0.33's
``comfy.sd`` imports ``torchaudio`` for the LTX audio VAE, its Gemma 4 text encoder imports
``torchaudio.functional`` and ``torchvision.transforms.functional``, other modules
``from torchvision.ops import roi_align`` and so on. A test machine may have no build of them that
matches its torch (there is no CPU build for every torch, and a build for another torch fails to
import). ``install_stand_ins`` then adds an import hook, so that every ``torchvision.*`` /
``torchaudio.*`` module imports and every name taken from it is a placeholder that raises
``StandInError`` - naming the package and why it is a stand-in - only when something uses it.

A real ComfyUI install has both packages: there this is never switched on. Importing this module
imports neither torch nor ComfyUI.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import logging
import sys
import types
import typing

logger = logging.getLogger(__name__)

PACKAGES = ("torchvision", "torchaudio")


class StandInError(ImportError):
    """Something used a stand-in for a package that has no usable build here."""


def _torch_version() -> str:
    version = getattr(sys.modules.get("torch"), "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version
            version = dist_version("torch")
        except Exception:  # noqa: BLE001 - only for a message
            version = "unknown"
    return version


def _stand_in_error(used: str, package: str, reason: str) -> StandInError:
    torch = _torch_version()
    return StandInError(
        f"{used}, but {package} is only a stand-in here: {package} is {reason}. ComfyUI-WanW4A4 put an "
        f"empty stand-in in its place because no {package} build matching the installed torch {torch} is "
        f"installed (Wan needs none of it). Install the {package} build made for torch {torch} to use this.",
        name=package)


class _UseRaises:
    """What a stand-in does when it is used: calling it, instantiating a class derived from it,
    iterating, indexing or taking its length raises ``StandInError``. Looking names up on it,
    using it as a default value, an annotation, a base class or a dict key at import time works."""

    def _wan_w4a4_error(self) -> StandInError:
        qualname, package, reason = self._wan_w4a4_stand_in
        return _stand_in_error(f"{qualname} was used", package, reason)

    def __call__(self, *args, **kwargs):
        raise self._wan_w4a4_error()

    def __iter__(self):
        raise self._wan_w4a4_error()

    def __len__(self):
        raise self._wan_w4a4_error()

    def __getitem__(self, key):
        raise self._wan_w4a4_error()

    def __bool__(self):
        return True

    def __mro_entries__(self, bases):
        """``class Foo(torchvision.models.ResNet)``: a base class whose instances cannot be made."""
        qualname, package, reason = self._wan_w4a4_stand_in

        def refuse(cls, *args, **kwargs):
            raise _stand_in_error(f"{cls.__qualname__} (a subclass of {qualname}) was instantiated",
                                  package, reason)

        module, _, name = qualname.rpartition(".")
        return (type(name, (), {"__new__": refuse, "__module__": module}),)

    def __instancecheck__(self, instance) -> bool:
        return False  # nothing is an instance of a package that is not here

    def __subclasscheck__(self, subclass) -> bool:
        return False

    def __or__(self, other):  # `transforms.Foo | None` in an annotation evaluated at import time
        return typing.Union[self, other]

    def __ror__(self, other):
        return typing.Union[other, self]

    def _wan_w4a4_child(self, name: str) -> "StandIn":
        qualname, package, reason = self._wan_w4a4_stand_in
        child = StandIn(f"{qualname}.{name}", package, reason)
        object.__setattr__(self, name, child)  # the same object on each look-up
        return child

    def __getattr__(self, name: str):
        if (name.startswith("__") and name.endswith("__")) or name.startswith("_wan_w4a4"):
            raise AttributeError(name)  # __file__, __version__ ...: absent, so probes see no package
        return self._wan_w4a4_child(name)


class StandIn(_UseRaises):
    """A name looked up on a stand-in package (``from torchvision.ops import roi_align``)."""

    def __init__(self, qualname: str, package: str, reason: str):
        self._wan_w4a4_stand_in = (qualname, package, reason)
        self.__module__, _, self.__name__ = qualname.rpartition(".")
        self.__qualname__ = self.__name__

    def __repr__(self) -> str:
        qualname, package, reason = self._wan_w4a4_stand_in
        return f"<stand-in {qualname} ({package} is {reason})>"


class StandInModule(_UseRaises, types.ModuleType):
    """A module of a stand-in package (``import torchaudio.functional``): every name it is asked
    for is a ``StandIn``, every submodule imports."""

    def __init__(self, name: str, package: str, reason: str):
        types.ModuleType.__init__(self, name, f"stand-in for {name}: {package} is {reason}")
        self._wan_w4a4_stand_in = (name, package, reason)

    def __repr__(self) -> str:
        qualname, package, reason = self._wan_w4a4_stand_in
        return f"<stand-in module {qualname!r} ({package} is {reason})>"


class _StandInFinder:
    """A ``sys.meta_path`` finder (first in the list) that imports ``StandInModule``s for every
    module of the packages in ``reasons``, and leaves every other import to the next finder."""

    def __init__(self):
        self.reasons: dict[str, str] = {}  # package -> why it is a stand-in

    def find_spec(self, fullname, path=None, target=None):
        package = fullname.partition(".")[0]
        if package not in self.reasons:
            return None
        return importlib.machinery.ModuleSpec(fullname, self, is_package=True)

    def create_module(self, spec):
        package = spec.name.partition(".")[0]
        return StandInModule(spec.name, package, self.reasons[package])

    def exec_module(self, module):
        pass


_finder = _StandInFinder()


def is_stand_in(obj) -> bool:
    """Whether ``obj`` is a stand-in module or name registered by ``install_stand_ins``."""
    return isinstance(obj, _UseRaises)


def _why_not_importable(package: str, try_import: bool = True) -> str | None:
    """None when ``package`` imports; else why not (it is then not left half-imported). Without
    ``try_import`` only a package that is not installed counts (nothing, torch included, is imported)."""
    if package in sys.modules:
        return None
    try:
        if importlib.util.find_spec(package) is None:
            return "not installed"
    except ModuleNotFoundError as e:
        if e.name == package:
            return "not installed"
        return f"not importable ({type(e).__name__}: {e})"
    except (ImportError, ValueError) as e:
        return f"not importable ({type(e).__name__}: {e})"
    if not try_import:
        return None
    try:
        importlib.import_module(package)
        return None
    except Exception as e:  # noqa: BLE001 - a build for another torch fails in many ways
        for name in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
            del sys.modules[name]
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"installed but does not import ({type(e).__name__}: {first_line[:300]})"


def install_stand_ins(packages=PACKAGES, try_import: bool = True, reasons: dict | None = None) -> dict[str, str]:
    """Makes ``torchvision`` and ``torchaudio`` importable when they are not: for each package
    that does not import (not installed, or a build for another torch), an import hook makes
    ``import pkg.anything`` and ``from pkg.anything import name`` succeed with stand-ins that
    raise ``StandInError`` (naming the package and why) only when something calls or uses them.

    ComfyUI imports both at module level for model families and nodes Wan does not use, so with
    the stand-ins its core (``nodes``, ``comfy.sd``, the Wan and video nodes) loads without them.
    A package that imports is left alone. Idempotent; returns ``{package: why}`` for the packages
    that are stand-ins in this process. ``try_import=False`` (before ComfyUI's ``main.py``, which must
    import torch itself, after choosing its CUDA allocator) only stands in for packages that are
    not installed. ``reasons``: ``{package: why}`` found by another process that tried the imports
    (``serve``'s probe, so that this process imports no torch before ``main.py``): those packages are
    stood in for as they are, nothing is probed here.
    """
    for package in (packages if reasons is None else reasons):
        if package in _finder.reasons:
            continue
        reason = _why_not_importable(package, try_import) if reasons is None else reasons[package]
        if reason is not None:
            _finder.reasons[package] = reason
            logger.warning("%s is %s: registered a stand-in for it (Wan does not use it; any use of it "
                           "raises an error that says so)", package, reason)
    if _finder.reasons and _finder not in sys.meta_path:
        sys.meta_path.insert(0, _finder)
    return dict(_finder.reasons)
