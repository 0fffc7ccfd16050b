"""Node mappings that ComfyUI reads from the pack (classic ``NODE_CLASS_MAPPINGS`` API).

Imported by the repository root's ``__init__.py`` only when ``comfy`` is already loaded, so node
modules imported from here may ``import comfy`` at module level.
"""

NODE_CLASS_MAPPINGS: dict = {}
NODE_DISPLAY_NAME_MAPPINGS: dict = {}
