"""Offline calibration of Wan2.2 I2V experts for W4A4 (timestep-aware SVDQuant + GPTQ).

Public API::

    from wan_w4a4.calibration import CalibrationConfig, CalibrationItem, calibrate
    result = calibrate(high_model, low_model, items, CalibrationConfig(out_dir="..."))
    result.high, result.low, result.report   # paths of the two W4A4 states and the JSON report

Imports neither ComfyUI nor Triton (capture imports ComfyUI when it samples), and torch only when a
name below is first used, so that ``python -m wan_w4a4 calibrate --help`` stays fast.
"""
import importlib

_EXPORTS = {
    "CalibrationConfig": ".config",
    "CalibrationCancelled": ".capture", "CalibrationError": ".capture", "CalibrationItem": ".capture",
    "synthetic_items": ".capture",
    "CalibrationResult": ".pipeline", "calibrate": ".pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
