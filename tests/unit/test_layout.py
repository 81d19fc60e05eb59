"""The package's shape: one installed ``samestyle`` package, its public surface, no import cycles,
every import declared, and docs that name only commands and routes that exist."""

from __future__ import annotations

import ast
import importlib
import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

import samestyle

ROOT = Path(__file__).resolve().parents[2]
#: Installed package -> folder of the repository (pyproject's package-dir).
FOLDERS = {"samestyle": "samestyle", "samestyle.streams": "streams", "samestyle.models": "models",
           "samestyle.topics": "topics", "samestyle.index_store": "index_store"}


def package_modules() -> dict[str, Path]:
    """Every module of the installed package -> its file in the checkout."""
    mods: dict[str, Path] = {}
    for package, folder in FOLDERS.items():
        base = ROOT / folder
        files = base.glob("*.py") if package == "samestyle" else base.rglob("*.py")
        for path in files:
            parts = list(path.relative_to(base).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            mods[".".join([package, *parts])] = path
    return mods


def imports_of(path: Path) -> set[str]:
    """Absolute module names imported anywhere in ``path`` (lazy and TYPE_CHECKING ones too)."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package uses absolute imports)")
    return names


def test_public_surface_is_pinned() -> None:
    assert samestyle.__all__ == sorted(samestyle.__all__)
    assert samestyle.__all__ == [
        "BadInputError", "ConfigError", "DecodeError", "Embeddings", "Encoder", "EncoderConfig",
        "ListingInput", "LiveIndex", "SamestyleError", "Settings", "TopicSpec", "__version__",
        "codec_for_topic", "create_encoder", "encoder_from_spec", "topic_specs",
    ]
    for name in samestyle.__all__:
        assert getattr(samestyle, name) is not None


def test_importing_samestyle_is_light() -> None:
    code = ("import sys, samestyle; heavy = sorted({m.split('.')[0] for m in sys.modules} & "
            "{'torch', 'faust', 'aiokafka', 'faiss', 'transformers'}); print(heavy)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd="/")
    assert out.stdout.strip() == "[]"


def test_only_samestyle_is_importable_from_site_packages(tmp_path: Path) -> None:
    code = ("import importlib.util, json, samestyle; "
            "print(json.dumps([n for n in ('streams', 'models', 'topics', 'index_store', 'bench') "
            "if importlib.util.find_spec(n) is not None]))")
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tmp_path, env=env)
    assert out.stdout.strip() == "[]"


def test_pyproject_lists_every_package_folder() -> None:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert config["package-dir"] == FOLDERS
    found = sorted(m for m, p in package_modules().items() if p.name == "__init__.py")
    assert sorted(config["packages"]) == found


def test_no_import_cycles_and_no_top_level_names() -> None:
    mods = package_modules()

    def resolve(name: str) -> str | None:
        while name:
            if name in mods:
                return name
            name = name.rpartition(".")[0]
        return None

    graph: dict[str, set[str]] = {}
    for module, path in mods.items():
        imported = imports_of(path)
        stray = {n for n in imported if n.split(".")[0] in ("streams", "models", "topics", "index_store", "bench")}
        assert not stray, f"{module} imports {sorted(stray)}: use samestyle.*"
        graph[module] = {r for n in imported if n.startswith("samestyle") and (r := resolve(n)) not in (None, module)}

    # Depth-first search for a back edge; report the cycle it closes.
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle = stack[stack.index(dep):] + [dep]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if dep not in state:
                visit(dep)
        stack.pop()
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module)


@pytest.mark.parametrize("library", ["samestyle.models", "samestyle.index_store", "samestyle.topics"])
def test_libraries_do_not_import_the_broker_clients(library: str) -> None:
    """Encoders, the index and the contract import without Kafka or Faust: only streams/ knows the broker."""
    for module, path in package_modules().items():
        if module == library or module.startswith(library + "."):
            roots = {n.split(".")[0] for n in imports_of(path)}
            assert not roots & {"faust", "mode", "aiokafka", "kafka"}, module


def _declared_distributions() -> set[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    specs = list(config["dependencies"])
    for extra in config["optional-dependencies"].values():
        specs += extra
    return {re.split(r"[<>=!\[ ;]", s, maxsplit=1)[0].lower().replace("_", "-") for s in specs}


def test_every_direct_import_is_declared() -> None:
    declared = _declared_distributions()
    distributions = importlib.metadata.packages_distributions()
    stdlib = sys.stdlib_module_names
    missing: dict[str, str] = {}
    for module, path in package_modules().items():
        for name in imports_of(path):
            root = name.split(".")[0]
            if root in stdlib or root in ("samestyle", "__future__"):
                continue
            owners = {d.lower().replace("_", "-") for d in distributions.get(root, [])}
            if not owners & declared:
                missing[root] = module
    assert not missing, f"imported but not declared in pyproject.toml (import -> where): {missing}"


def test_readme_names_only_commands_that_exist() -> None:
    from samestyle.streams.cli.main import FORWARDED, build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    commands = set(sub.choices)
    assert set(FORWARDED) <= commands
    readme = (ROOT / "README.md").read_text()
    named = set(re.findall(r"\bsamestyle ([a-z][a-z-]+)", readme))
    named -= {"package", "worker's", "service"}  # prose, not commands
    assert named, "the README names no command"
    assert named <= commands, f"README names commands that do not exist: {sorted(named - commands)}"


def test_readme_names_only_routes_that_exist(tmp_path: Path) -> None:
    from aiohttp import web

    from samestyle.streams.http.auth import token_auth
    from samestyle.streams.http.moderation import AlertBuffer, moderation_routes
    from samestyle.streams.http.search import search_routes
    from samestyle.streams.http.server import core_routes
    from samestyle.streams.settings import Settings
    from samestyle.streams.worker.metrics import Metrics

    app = web.Application()
    token_auth("a-token-for-the-sign-in-routes")(app)
    core_routes(Metrics(process=False).registry, lambda: {"ok": True})(app)
    search_routes(Settings(state_dir=tmp_path), backend=None, health=lambda: {})(app)  # type: ignore[arg-type]
    moderation_routes(AlertBuffer(1), lambda listing_id: None, send=None)(app)  # type: ignore[arg-type]
    routes = {(r.method, re.sub(r"\{[^}]+\}", "{}", r.resource.canonical)) for r in app.router.routes()
              if r.resource is not None}
    readme = (ROOT / "README.md").read_text()
    named = {(m, re.sub(r"\{[^}]+\}", "{}", p)) for m, p in re.findall(r"\b(GET|POST) +(/[A-Za-z0-9{}_/.-]*)", readme)}
    assert named, "the README names no route"
    assert named <= routes, f"README names routes that do not exist: {sorted(named - routes)}"


def test_no_tracker_history_in_code() -> None:
    pattern = re.compile(r"\b(issue \d+|a later issue|until create_app registers)", re.IGNORECASE)
    hits = [f"{p.relative_to(ROOT)}:{i}" for p in package_modules().values()
            for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not hits, hits


def test_every_module_imports() -> None:
    for module in sorted(package_modules()):
        if module != "samestyle.__main__":  # runs the CLI
            importlib.import_module(module)
