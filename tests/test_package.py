"""The package's import contract: the math imports without ComfyUI and without Triton, and
importing the package root (as tests and the command line do) never imports ComfyUI."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

# Makes the named top-level modules unimportable in a fresh interpreter, whether installed or not.
BLOCKER = textwrap.dedent("""
    import sys
    BLOCKED = {blocked!r}
    class _Blocker:
        def find_spec(self, name, path=None, target=None):
            if name.partition(".")[0] in BLOCKED:
                raise ModuleNotFoundError(f"{{name}} is blocked by this test", name=name)
    sys.meta_path.insert(0, _Blocker())
""")
COMFY_MODULES = ("comfy", "comfy_extras", "comfy_api", "folder_paths", "nodes", "node_helpers")


def run_python(code: str, blocked=(), tmp_path=None):
    full = BLOCKER.format(blocked=set(blocked)) + textwrap.dedent(code)
    return subprocess.run([sys.executable, "-c", full], check=False, capture_output=True, text=True, timeout=120,
                          cwd=tmp_path)


@pytest.mark.slow  # a new Python process importing torch
def test_imports_without_comfyui_and_triton(tmp_path):
    # One interpreter for all (each start imports torch): the math, the model shapes and the
    # ComfyUI bootstrap itself must all import with comfy and triton absent.
    r = run_python("""
        import wan_w4a4.kernels, wan_w4a4.calibration
        import wan_w4a4.kernels.numerics, wan_w4a4.minimodel.arch, wan_w4a4.apps.runtime
        leaked = sorted(m for m in sys.modules if m.partition(".")[0] in BLOCKED)
        assert not leaked, leaked
    """, ("triton", *COMFY_MODULES), tmp_path)
    assert r.returncode == 0, r.stderr


def test_root_import_does_not_import_comfy(tmp_path):
    r = run_python("""
        import wan_w4a4
        assert "comfy" not in sys.modules and "comfy.model_management" not in sys.modules
        assert wan_w4a4.NODE_CLASS_MAPPINGS == {}
        assert "wan_w4a4.nodes.registry" not in sys.modules
    """, tmp_path=tmp_path)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow  # a new Python process importing torch
def test_cli_help_without_comfyui_and_triton(tmp_path):
    r = run_python("""
        import runpy
        sys.argv = ["wan_w4a4", "--help"]
        try:
            runpy.run_module("wan_w4a4", run_name="__main__")
        except SystemExit as e:
            assert e.code == 0, e.code
    """, ("triton", *COMFY_MODULES), tmp_path)
    assert r.returncode == 0, r.stderr
    assert "calibrate" in r.stdout and "demo" in r.stdout


def _pyproject() -> dict:
    import pytest
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    from pathlib import Path
    return tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_registry_metadata():
    """What ComfyUI-Manager and the Comfy Registry read from pyproject.toml (comfy-cli's config_parser
    reads [project].name as the node id, [project.urls] Repository/Documentation/Issues, [tool.comfy])."""
    from pathlib import Path
    meta = _pyproject()
    project, comfy = meta["project"], meta["tool"]["comfy"]
    assert "comfyui" not in project["name"].lower()  # the registry advises against it in node ids
    repo = "https://github.com/wan-w4a4/ComfyUI-WanW4A4"
    assert project["urls"] == {"Repository": repo, "Documentation": repo + "#readme", "Issues": repo + "/issues"}
    assert comfy["PublisherId"] and comfy["DisplayName"] and comfy["requires-comfyui"]
    license_text = (Path(__file__).resolve().parents[1] / "LICENSE").read_text()
    assert project["license"] == {"text": "Apache-2.0"}
    assert "Apache License\n                           Version 2.0, January 2004" in license_text
    assert "END OF TERMS AND CONDITIONS" in license_text


# `comfy node validate` (comfy-cli, comfy_cli/command/custom_nodes/command.py, validate_node_for_publishing): a
# non-empty [project].version, then `ruff check . -q --select S102,S307,E702` from the node's root (exec, eval,
# several statements on one line), whose findings it prints as warnings that "will soon" be errors.
VALIDATE_RULES = "S102,S307,E702"


def _validate_checks(cwd) -> subprocess.CompletedProcess:
    """`comfy node validate`'s ruff run in ``cwd``."""
    done = subprocess.run([sys.executable, "-m", "ruff", "check", ".", "-q", "--no-cache", "--select", VALIDATE_RULES],
                          cwd=cwd, capture_output=True, text=True, timeout=300)
    assert "No module named ruff" not in done.stderr, "ruff comes with the test extras: pip install -e '.[test]'"
    return done


@pytest.mark.slow  # ruff over the whole checkout
def test_comfy_node_validate_finds_nothing():
    from pathlib import Path
    assert _pyproject()["project"]["version"]
    done = _validate_checks(Path(__file__).resolve().parents[1])
    assert (done.returncode, done.stdout) == (0, ""), done.stdout + done.stderr


def test_comfy_node_validate_rules_flag_what_they_should(tmp_path):
    """The same command on a file with each of the three findings reports all three (the check above can fail)."""
    (tmp_path / "bad.py").write_text("exec('x = 1')\ny = eval('1 + 1')\na = 1; b = 2\n")
    done = _validate_checks(tmp_path)
    assert done.returncode == 1 and all(rule in done.stdout for rule in VALIDATE_RULES.split(",")), done.stdout


def test_example_workflows_name_this_node_id():
    """The workflows' cnr_id (the registry node id the frontend records per node) is [project].name."""
    import json
    from pathlib import Path
    name = _pyproject()["project"]["name"]
    for path in (Path(__file__).resolve().parents[1] / "example_workflows").glob("*.json"):
        ids = {n.get("properties", {}).get("cnr_id") for n in json.loads(path.read_text())["nodes"]}
        assert ids - {"comfy-core", None} == {name}, (path.name, ids)


def test_registry_icon_and_banner_are_files_here():
    """Icon and Banner are raw URLs of the Repository's main branch that name PNGs in this checkout:
    a square icon and a wide banner."""
    from pathlib import Path

    Image = pytest.importorskip("PIL.Image")
    meta = _pyproject()
    repo, comfy = meta["project"]["urls"]["Repository"], meta["tool"]["comfy"]
    raw = repo.replace("https://github.com/", "https://raw.githubusercontent.com/", 1) + "/main/"
    root = Path(__file__).resolve().parents[1]
    sizes = {}
    for key in ("Icon", "Banner"):
        url = comfy[key]
        assert url.startswith(raw), (key, url)
        path = root / url[len(raw):]
        assert path.resolve().is_relative_to(root) and path.is_file(), (key, url)
        with Image.open(path) as img:
            assert img.format == "PNG", (key, img.format)
            sizes[key] = img.size
    (iw, ih), (bw, bh) = sizes["Icon"], sizes["Banner"]
    assert iw == ih >= 200, sizes
    assert bw >= 3 * bh and bw >= 1000, sizes


def test_every_example_workflow_has_a_jpeg_thumbnail():
    """The frontend's template browser shows example_workflows/<name>.jpg for <name>.json."""
    from pathlib import Path

    Image = pytest.importorskip("PIL.Image")
    folder = Path(__file__).resolve().parents[1] / "example_workflows"
    workflows = sorted(folder.glob("*.json"))
    assert len(workflows) >= 3
    for wf in workflows:
        thumb = wf.with_suffix(".jpg")
        assert thumb.is_file(), f"{thumb.name} missing (python docs/make_pictures.py makes it)"
        data = thumb.read_bytes()
        assert data[:3] == b"\xff\xd8\xff" and data.endswith(b"\xff\xd9"), thumb.name  # JPEG SOI ... EOI
        assert 5_000 < len(data) < 100_000, (thumb.name, len(data))
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.mode == "RGB", thumb.name
            img.load()  # decodes: a truncated file fails here
            w, h = img.size
            assert 256 <= w <= 1024 and 256 <= h <= 1024 and 0.5 <= w / h <= 2, (thumb.name, img.size)
