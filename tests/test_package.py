"""The package's shape: imports run one way down DESIGN.md's layers, no module uses another's private
names, and importing tinyclip changes nothing outside tinyclip (issue 13).

The import graph is read from the source (every ``import`` statement, those inside functions
included, so a lazy import that hides a cycle counts). Modules of a subpackage (models/, data/)
count as the subpackage; imports inside a subpackage and of the package root's metadata
(``from . import __version__``) are not edges between layers.
"""

import ast
import json
import pathlib
import subprocess
import sys

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[1] / "tinyclip"

# DESIGN.md section 1: backend → autograd → functional → nn → models; functional → tiles → losses →
# distributed; all of these → train → cli. A module may import only modules of a lower layer; the
# modules DESIGN.md does not place in a chain sit where their imports put them.
LAYERS = {
    "backend": 0, "files": 0,
    "autograd": 1, "tokenizer": 1, "parallel": 1,
    "functional": 2, "optim": 2, "data": 2,
    "nn": 3, "tiles": 3,
    "models": 4, "losses": 4,
    "distributed": 5, "checkpoint": 5, "evaluate": 5,
    "plots": 6, "hub": 6,
    "runs": 7,
    "train": 8,
    "cli": 9,
    "__main__": 10,
}


def unit_of(path):
    """The layer unit a source file belongs to: its module, or its subpackage (None for the package root)."""
    parts = path.relative_to(PACKAGE).with_suffix("").parts
    return None if parts == ("__init__",) else parts[0]


def imported_units(path):
    """Every tinyclip unit ``path`` imports, anywhere in the file, other than its own."""
    own = unit_of(path)
    depth = len(path.relative_to(PACKAGE).parts) - 1        # 0 for tinyclip/x.py, 1 for tinyclip/models/x.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level:
            if node.level - 1 < depth:                       # inside its own subpackage
                continue
            names = [node.module] if node.module else [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            names = [node.module] if node.module.startswith("tinyclip.") else []
            names = [name.split(".", 1)[1] for name in names]
        elif isinstance(node, ast.Import):
            names = [alias.name.split(".", 1)[1] for alias in node.names if alias.name.startswith("tinyclip.")]
        else:
            continue
        for name in names:
            unit = name.split(".")[0]
            if unit in LAYERS and unit != own:
                found.add(unit)
    return found


def import_graph():
    graph = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        unit = unit_of(path)
        if unit is not None:
            graph.setdefault(unit, set()).update(imported_units(path))
    return graph


def test_every_module_has_a_layer():
    assert set(import_graph()) == set(LAYERS), "a new module needs its place in LAYERS (and in DESIGN.md)"


def test_imports_run_down_the_layers():
    upward = [f"{unit} (layer {LAYERS[unit]}) imports {target} (layer {LAYERS[target]})"
              for unit, targets in import_graph().items() for target in sorted(targets)
              if LAYERS[target] >= LAYERS[unit]]
    assert not upward, "\n".join(upward)


def test_the_import_graph_has_no_cycle():
    graph, done, path = import_graph(), set(), []

    def visit(unit):
        if unit in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(unit):] + [unit]))
        if unit in done:
            return
        path.append(unit)
        for target in sorted(graph[unit]):
            visit(target)
        path.pop()
        done.add(unit)

    for unit in sorted(graph):
        visit(unit)


def private_uses(path):
    """``module._name`` and ``from module import _name`` where module is another tinyclip module."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    modules = set()           # local names bound to tinyclip modules
    uses = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("tinyclip")):
            for alias in node.names:
                if alias.name.startswith("_") and not alias.name.startswith("__"):
                    uses.append(f"{path.name}:{node.lineno}: from {node.module or '.'} import {alias.name}")
                modules.add(alias.asname or alias.name)
        elif isinstance(node, ast.Import):
            modules.update(alias.asname or alias.name for alias in node.names if alias.name.startswith("tinyclip"))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                and isinstance(node.value, ast.Name) and node.value.id in modules):
            uses.append(f"{path.name}:{node.lineno}: {node.value.id}.{node.attr}")
    return uses


def private_attributes_from_elsewhere(path):
    """``thing._name`` where no code in this file defines ``_name`` (a private attribute of another module's class).

    Attributes of outside modules (``os._exit``) are not tinyclip's business.
    """
    tree = ast.parse(path.read_text(encoding="utf-8"))
    outside = {alias.asname or alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names if not alias.name.startswith("tinyclip")}
    defined = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            defined.add(node.name)
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            defined.add(node.id)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
            defined.add(node.attr)
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            defined.add(node.value)          # __slots__ entries
    return [f"{path.name}:{node.lineno}: .{node.attr}" for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
            and node.attr not in defined
            and not (isinstance(node.value, ast.Name) and node.value.id in outside)]


def test_no_module_uses_another_modules_private_names():
    uses = [use for path in sorted(PACKAGE.rglob("*.py")) for use in private_uses(path)]
    uses += [use for path in sorted(PACKAGE.rglob("*.py")) for use in private_attributes_from_elsewhere(path)]
    assert not uses, "\n".join(uses)


# What importing tinyclip (and asking for the one-process world) must leave alone. glibc's malloc
# settings cannot be read back, so the probe watches the only way tinyclip reaches them, ctypes:
# every mallopt looked up through ctypes.CDLL is recorded. It then shows that it can see a call by
# asking for the tuning explicitly.
PROBE = r"""
import ctypes, json, sys, threading

mallopt_calls = []
class Watched(ctypes.CDLL):
    def __getattr__(self, name):
        function = super().__getattr__(name)
        if name != "mallopt":
            return function
        def mallopt(*arguments):
            mallopt_calls.append([getattr(a, "value", a) for a in arguments])
            return function(*arguments)
        return mallopt
ctypes.CDLL = Watched

hooks = sys.excepthook, threading.excepthook
import tinyclip
import tinyclip.distributed
comm = tinyclip.distributed.world()
report = {"mallopt_at_import": list(mallopt_calls), "size": comm.size,
          "excepthook_kept": sys.excepthook is hooks[0], "threading_excepthook_kept": threading.excepthook is hooks[1],
          "malloc_tuned_flag": tinyclip.backend.MALLOC_TUNED}
tinyclip.backend.tune_malloc()
report["mallopt_when_asked"] = len(mallopt_calls)
# one file per rank: two ranks printing at once may share a line of mpiexec's output
with open(f"{sys.argv[1]}/report-{comm.rank}.json", "w") as file:
    json.dump(report, file)
"""


def run_probe(launcher=()):
    import tempfile
    from pathlib import Path
    with tempfile.TemporaryDirectory() as folder:
        completed = subprocess.run([*launcher, sys.executable, "-c", PROBE, folder], capture_output=True, text=True,
                                   timeout=120, env={**_plain_environment(), "TINYCLIP_MALLOC_TUNING": "1"})
        assert completed.returncode == 0, completed.stderr[-3000:]
        return [json.loads(path.read_text()) for path in sorted(Path(folder).glob("report-*.json"))]


def _plain_environment():
    import os
    return {name: value for name, value in os.environ.items()
            if not name.startswith(("PMI_", "MPI_LOCAL", "OMPI_", "PMIX_"))}


def test_the_modules_the_docs_call_through_the_package_are_there():
    # in a fresh process: within the test run another test may already have imported them
    code = "import tinyclip as tc; tc.hub.load_model; tc.checkpoint.from_pretrained; tc.evaluate; tc.data.CSVCaptions"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr[-2000:]


def test_importing_tinyclip_changes_neither_malloc_nor_the_exception_hooks():
    (report,) = run_probe()
    assert report["mallopt_at_import"] == [] and report["malloc_tuned_flag"] is False
    assert report["excepthook_kept"] and report["threading_excepthook_kept"]
    if sys.platform.startswith("linux") and report["mallopt_when_asked"] == 0:
        pytest.skip("no glibc mallopt here: the probe cannot see malloc being tuned")
    assert report["mallopt_when_asked"] == 2       # the probe sees the calls when they are asked for


def test_world_under_mpiexec_leaves_the_exception_hooks_alone():
    from .test_distributed import find_mpiexec, mpi_ready
    if not mpi_ready():
        pytest.skip("needs mpi4py and mpiexec (pip install 'tinyclip[mpi]')")
    reports = run_probe([find_mpiexec(), "-n", "2"])
    assert [report["size"] for report in reports] == [2, 2]
    for report in reports:
        assert report["excepthook_kept"] and report["threading_excepthook_kept"], report
        assert report["mallopt_at_import"] == [], report
