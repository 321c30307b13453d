"""The library stays apart from the application: no library module imports ``taskres.app``, prints, or picks a
matplotlib backend; only the application does."""

import ast
from pathlib import Path

import taskres

PACKAGE = Path(taskres.__file__).parent
# __main__.py is the `python -m taskres` entry point: it belongs to the application.
LIBRARY = [p for p in PACKAGE.rglob("*.py") if "app" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"]


def calls_and_imports(path: Path):
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            yield "import", node.module
        elif isinstance(node, ast.Import):
            for alias in node.names:
                yield "import", alias.name
        elif isinstance(node, ast.Call):
            yield "call", ast.unparse(node.func)


def test_the_library_is_found():
    names = {p.relative_to(PACKAGE).as_posix() for p in LIBRARY}
    assert {"workflow.py", "methods/taskres.py", "cache.py"} <= names and "app/cli.py" not in names


def test_library_modules_do_not_import_the_app_print_or_set_a_backend():
    offences = []
    for path in LIBRARY:
        for kind, name in calls_and_imports(path):
            if kind == "import" and (name == "taskres.app" or name.startswith("taskres.app.")):
                offences.append(f"{path.name} imports {name}")
            if kind == "call" and name in ("print", "matplotlib.use"):
                offences.append(f"{path.name} calls {name}")
            if kind == "import" and name == "matplotlib.pyplot":
                offences.append(f"{path.name} imports pyplot")
    assert offences == []


def test_runs_and_the_engine_know_nothing_of_methods():
    for name in ("runs.py", "run_writer.py", "engine.py", "cache.py", "evaluate.py", "features.py"):
        modules = [m for kind, m in calls_and_imports(PACKAGE / name) if kind == "import"]
        assert not any(m.startswith("taskres.methods") for m in modules), name


def test_only_the_taskres_method_knows_taskres():
    """The workflow, its configuration and the other methods go through the registry: TaskRes's module and its
    classes are named only by TaskRes's own files (and the public API's lazy table in ``taskres/__init__.py``)."""
    own = {"methods/taskres.py", "methods/taskres_official.py", "__init__.py"}
    offences = []
    for path in LIBRARY:
        if path.relative_to(PACKAGE).as_posix() in own:
            continue
        for kind, name in calls_and_imports(path):
            if kind == "import" and name == "taskres.methods.taskres":
                offences.append(f"{path.name} imports {name}")
        if "TaskResHead" in path.read_text() or "TaskResConfig" in path.read_text():
            offences.append(f"{path.name} names TaskResHead or TaskResConfig")
    assert offences == []
