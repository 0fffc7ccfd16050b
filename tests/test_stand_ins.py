"""The stand-ins for torchvision and torchaudio (``apps/stand_ins.py``), each case in a fresh
interpreter: they import as ComfyUI imports them, raise a clear error only when used, are not taken
for a real install by availability probes, and stay off for a package that imports."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

# Makes the real packages unimportable, whether installed or not (as on a machine without a build).
HIDE_REAL = textwrap.dedent("""
    import sys
    class _Hide:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in ("torchvision", "torchaudio"):
                raise ModuleNotFoundError(f"{name} is hidden by this test", name=name)
    sys.meta_path.insert(0, _Hide())
""")


def run_python(code: str, tmp_path, prelude: str = "", pythonpath=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (pythonpath, os.environ.get("PYTHONPATH"))))}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path, env=env)


def test_imports_as_comfyui_uses_them_and_raises_only_when_used(tmp_path):
    r = run_python("""
        import pytest
        from wan_w4a4.apps.stand_ins import StandInError, install_stand_ins, is_stand_in
        why = install_stand_ins()
        assert set(why) == {"torchvision", "torchaudio"}, why
        # the import forms ComfyUI 0.33 uses at module level
        import torchaudio
        import torchaudio.functional as AF
        import torchvision.transforms.functional as TVF
        from torchvision.ops import roi_align
        from torchvision.transforms.functional import InterpolationMode
        from torchvision import transforms
        from torchaudio.transforms import MelScale
        assert all(map(is_stand_in, (torchaudio, AF, TVF, roi_align, InterpolationMode, transforms, MelScale)))
        # uses at import time: attribute look-ups, default values, annotations, base classes
        assert InterpolationMode.BILINEAR is InterpolationMode.BILINEAR
        def resize(x, mode=InterpolationMode.BILINEAR, t: transforms.Compose | None = None): ...
        class Backbone(TVF.Something):
            pass
        assert not isinstance(3, roi_align)
        # availability probes (transformers' among them) see no installed package
        assert getattr(torchaudio, "__version__", None) is None and getattr(torchaudio, "__file__", None) is None
        # any use raises, saying which package and why
        for use in (lambda: roi_align(1, 2), lambda: AF.resample(1, 2, 3), lambda: Backbone(),
                    lambda: list(transforms.Compose), lambda: torchaudio.functional.resample(1)):
            try:
                use()
            except StandInError as e:
                msg = str(e)
            else:
                raise AssertionError("no error")
            assert "stand-in" in msg and "not installed" in msg and "matching the installed torch" in msg, msg
        with pytest.raises(StandInError, match="torchvision.ops.roi_align was used.*torchvision is only a stand-in"):
            roi_align()
        with pytest.raises(StandInError, match=r"Backbone \\(a subclass of torchvision.transforms.functional.Something\\)"):
            Backbone()
        assert install_stand_ins() == why  # idempotent
    """, tmp_path, prelude=HIDE_REAL)
    assert r.returncode == 0, r.stderr


def test_broken_build_is_replaced_and_working_package_left_alone(tmp_path):
    # a build for another torch: installed, but its import fails
    (tmp_path / "brokenpkg").mkdir()
    (tmp_path / "brokenpkg" / "__init__.py").write_text(
        "import brokenpkg.half  # noqa\nraise OSError('libbroken.so: undefined symbol: _ZN3c10')\n")
    (tmp_path / "brokenpkg" / "half.py").write_text("")
    r = run_python("""
        import sys
        from wan_w4a4.apps.stand_ins import install_stand_ins, is_stand_in
        why = install_stand_ins(("brokenpkg", "json"))
        assert set(why) >= {"brokenpkg"} and "json" not in why, why
        assert "does not import (OSError: libbroken.so" in why["brokenpkg"], why
        assert "brokenpkg.half" not in sys.modules  # nothing of the failed import is left behind
        import brokenpkg.half, json
        assert is_stand_in(brokenpkg.half) and not is_stand_in(json)
    """, tmp_path, pythonpath=str(tmp_path))
    assert r.returncode == 0, r.stderr
