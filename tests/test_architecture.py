"""The package's layering, checked from the source (README "Architecture"):

    engine core (engine, chat, constraints, models, errors, ...)   imports no loop
    state/   the store, registry, task identity, policy            imports the core only
    serve/   runtime, call pipeline, provider, router, teacher     imports state/ and the core
    learn/   dataset, trainer, export, gate, trigger, worker       imports state/ and the core
    wiring.py, jac_plugin.py, cli.py, bench/                       the places that use both loops

and the glue keeps no module-level mutable state: the process's one runtime (wiring.py)
owns it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mtllm_locally

PKG = Path(mtllm_locally.__file__).parent
CORE = {"__init__", "_engine", "engine", "chat", "constraints", "models", "errors", "template_sandbox",
        "vetting", "cpu_backend", "demonstrations"}
LOOPS = {"state", "serve", "learn"}
WIRING = {"wiring", "jac_plugin", "cli", "__main__"}
# who may import whom (first component under mtllm_locally)
ALLOWED = {
    "core": CORE,
    "state": CORE | {"state"},
    "serve": CORE | {"state", "serve"},
    "learn": CORE | {"state", "learn"},
    "fuzz": CORE | {"fuzz"},
}


def layer(module: str) -> str:
    top = module.split(".")[0]
    if top in CORE:
        return "core"
    if top in LOOPS or top == "fuzz":
        return top
    return "wiring"  # wiring.py, jac_plugin.py, cli.py, bench/


def modules():
    for path in sorted(PKG.rglob("*.py")):
        rel = path.relative_to(PKG).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1] or ["__init__"]
        yield ".".join(parts), path


def _is_module(parts: list[str]) -> bool:
    p = PKG.joinpath(*parts)
    return p.with_suffix(".py").is_file() or (p / "__init__.py").is_file()


def imported(module: str, path: Path) -> set[str]:
    """mtllm_locally modules imported anywhere in the file (in functions too), as paths under the package."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    package = module.split(".") if is_pkg else module.split(".")[:-1]
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - (node.level - 1)] if node.level > 1 else package
                target = ".".join(base + ([node.module] if node.module else []))
                if node.module:
                    names = [f"mtllm_locally.{target}"]
                else:  # `from .. import x`: a submodule x, or a name from the package itself
                    names = [f"mtllm_locally.{'.'.join(base + [a.name])}"
                             if _is_module(base + [a.name]) else f"mtllm_locally.{'.'.join(base)}".rstrip(".")
                             for a in node.names]
            else:
                names = [node.module or ""]
        else:
            continue
        for n in names:
            if n == "mtllm_locally" or n.startswith("mtllm_locally."):
                out.add(n[len("mtllm_locally."):] or "__init__")
    return out


def test_the_import_rule_holds():
    broken = []
    for module, path in modules():
        mine = layer(module)
        if mine == "wiring":
            continue
        for target in imported(module, path):
            if target.split(".")[0] not in ALLOWED[mine]:
                broken.append(f"{module} ({mine}) imports {target}")
    assert not broken, "\n".join(broken)


def test_the_checker_sees_relative_and_nested_imports():
    """The rule test is only as good as its parser: it must see the imports that matter."""
    assert "state.store" in imported("serve.router", PKG / "serve" / "router.py")
    assert "learn.trigger" in imported("wiring", PKG / "wiring.py")
    assert "serve.pipeline" in imported("serve.runtime", PKG / "serve" / "runtime.py")  # inside __init__
    assert layer("serve.runtime") == "serve" and layer("wiring") == "wiring" and layer("engine") == "core"


def test_import_mtllm_locally_loads_the_engine_only():
    code = ("import sys, mtllm_locally; "
            "print(sorted({m.split('.')[1] for m in sys.modules if m.startswith('mtllm_locally.')}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    loaded = set(ast.literal_eval(out.stdout.strip().splitlines()[-1]))
    assert loaded, out.stderr
    assert not loaded & (LOOPS | WIRING | {"bench", "fuzz"}), loaded
    assert "litellm" not in out.stdout


def test_lazy_exports_reach_the_wired_runtime():
    code = ("import sys, mtllm_locally; f = mtllm_locally.feedback; "
            "print(f.__module__, 'mtllm_locally.learn.trigger' in sys.modules, "
            "mtllm_locally.runtime() is mtllm_locally.runtime())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["mtllm_locally.wiring", "True", "True"]
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mtllm_locally.nope  # noqa: B018


MUTABLE_CALLS = {"dict", "list", "set", "defaultdict", "OrderedDict", "Lock", "RLock", "WeakSet",
                 "WeakKeyDictionary", "WeakValueDictionary", "deque", "Queue", "Event"}
ONE_HOLDER = {("wiring", "_runtime"), ("wiring", "_lock")}  # the process's runtime and its lock


def _mutable(value: ast.expr) -> bool:
    if isinstance(value, (ast.Dict, ast.List, ast.Set, ast.DictComp, ast.ListComp, ast.SetComp)):
        return True
    if isinstance(value, ast.Call):
        fn = value.func
        name = fn.attr if isinstance(fn, ast.Attribute) else getattr(fn, "id", "")
        return name in MUTABLE_CALLS
    return False


def test_no_module_level_mutable_state_in_the_glue():
    found = []
    for module, path in modules():
        if layer(module) not in ("state", "serve", "learn") and module not in ("wiring", "jac_plugin"):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) and node.value is not None else []
            for t in targets:
                name = getattr(t, "id", None)
                if name and (module, name) not in ONE_HOLDER and _mutable(node.value):
                    found.append(f"{module}.{name}")
        for node in ast.walk(tree):
            if isinstance(node, ast.Global) and module != "wiring":
                found.append(f"{module}: global {', '.join(node.names)}")
    assert not found, found
