"""The shape of the code: one package along the data path, imports that point one way.

Read from the source (``ast``), so these run in milliseconds and import nothing heavy, except
the fresh interpreters that prove the pure modules and the unit tests load without torch.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Lowest first. A module may import modules of its own layer or below, never above; every
# module of the worker must be in exactly one layer (a new one must be given its room).
LAYERS: tuple[tuple[str, set[str]], ...] = (
    ("foundations", {"worker", "worker.errors", "worker.formats", "worker.spec",
                     "worker.runtime"}),
    ("job contract", {"schemas"}),
    ("rules", {"worker.settings", "worker.plan", "worker.adapters", "worker.adapters.cache",
               "worker.adapters.weighting"}),
    ("queue and start-up helpers", {"worker.gpu_queue", "worker.location", "worker.prefetch",
                                    "builder", "builder.download_weights"}),
    ("inputs and outputs", {"worker.inputs", "worker.inputs.fetch", "worker.inputs.images",
                            "worker.inputs.pool", "worker.inputs.prepare",
                            "worker.inputs.structure", "worker.outputs",
                            "worker.outputs.encoding", "worker.outputs.upload",
                            "worker.adapters.store",
                            "worker.outputs.delivery"}),
    ("job flow", {"worker.service"}),
    ("front doors", {"worker.frontdoor", "worker.frontdoor.openai_images",
                     "worker.frontdoor.a1111", "worker.frontdoor.app",
                     "worker.frontdoor.server"}),
    ("engine room", {"worker.engine", "worker.engine.loading", "worker.engine.decode",
                     "worker.engine.safety", "worker.engine.compiler", "worker.engine.adapters",
                     "worker.engine.weighting", "worker.engine.base_model",
                     "builder.make_tiny_model", "builder.tiny_finetune"}),
    ("engine", {"pipeline"}),
    ("start-up", {"worker.startup"}),
    ("RunPod adapter", {"handler"}),
)
LAYER = {module: rank for rank, (_, modules) in enumerate(LAYERS) for module in modules}
TORCH_LIBRARIES = {"torch", "diffusers", "transformers", "accelerate"}
# Where torch may be imported: the engine and its room (and the tiny-model builder).
TORCH_LAYERS = {"engine room", "engine"}
PURE = sorted(m for m, rank in LAYER.items() if rank <= LAYER["worker.frontdoor.server"])


def module_files() -> dict[str, Path]:
    files = {}
    for path in [*ROOT.glob("*.py"), *ROOT.glob("worker/**/*.py"), *ROOT.glob("builder/*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        files[".".join(parts)] = path
    return files


MODULES = module_files()


def imports(path: Path) -> list[tuple[str, int]]:
    """(module, line) for every import in ``path``: at the top, in functions, in TYPE_CHECKING."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{path}:{node.lineno}: use absolute imports"
            found.append((node.module, node.lineno))
            found += [(f"{node.module}.{alias.name}", node.lineno) for alias in node.names
                      if f"{node.module}.{alias.name}" in MODULES]
    return found


def internal_imports(module: str) -> set[str]:
    return {name for name, _ in imports(MODULES[module]) if name in MODULES} - {module}


class TestLayers:
    def test_every_module_has_a_room(self) -> None:
        assert set(MODULES) == set(LAYER), (
            f"not in LAYERS: {sorted(set(MODULES) - set(LAYER))}; "
            f"gone: {sorted(set(LAYER) - set(MODULES))}")

    @pytest.mark.parametrize("module", sorted(MODULES))
    def test_imports_point_down(self, module: str) -> None:
        upward = sorted(f"{target} ({LAYERS[LAYER[target]][0]})"
                        for target in internal_imports(module) if LAYER[target] > LAYER[module])
        assert upward == [], f"{module} ({LAYERS[LAYER[module]][0]}) imports upward: {upward}"

    def test_no_cycles(self) -> None:
        graph = {module: internal_imports(module) for module in MODULES}
        state: dict[str, str] = {}

        def visit(module: str, path: list[str]) -> None:
            state[module] = "open"
            for target in sorted(graph[module]):
                if state.get(target) == "open":
                    pytest.fail(f"import cycle: {' -> '.join([*path, module, target])}")
                if target not in state:
                    visit(target, [*path, module])
            state[module] = "done"

        for module in sorted(graph):
            if module not in state:
                visit(module, [])

    @pytest.mark.parametrize("module", sorted(MODULES))
    def test_torch_only_in_the_engine_room(self, module: str) -> None:
        torch_imports = sorted({name.split(".")[0] for name, _ in imports(MODULES[module])}
                               & TORCH_LIBRARIES)
        if LAYERS[LAYER[module]][0] not in TORCH_LAYERS:
            assert torch_imports == [], f"{module} imports {torch_imports}"


class TestWithoutTorch:
    def test_the_pure_modules_import_no_torch(self) -> None:
        code = ("import sys\n" + "".join(f"import {m}\n" for m in PURE)
                + "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                  f"{sorted(TORCH_LIBRARIES)!r}))")
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, check=True)
        assert run.stdout.strip() == "[]", run.stdout[:500]

    def test_the_unit_tests_import_no_torch(self) -> None:
        tests = sorted(p.stem for p in Path(__file__).parent.glob("test_*.py"))
        code = ("import sys\n" + "".join(f"import tests.unit.{t}\n" for t in tests)
                + "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')[:3])")
        run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                             text=True, timeout=120, check=True)
        assert run.stdout.strip() == "[]", run.stdout[:500]
        assert len(tests) >= 15


class TestConventions:
    @pytest.mark.parametrize("module", sorted(MODULES))
    def test_each_file_opens_with_a_docstring_saying_what_it_owns(self, module: str) -> None:
        docstring = ast.get_docstring(ast.parse(MODULES[module].read_text(encoding="utf-8")))
        assert docstring and len(docstring) > 40, module

    @pytest.mark.parametrize("module", sorted(MODULES))
    def test_loggers_are_named_after_their_module(self, module: str) -> None:
        tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
        for node in tree.body:  # a module's own logger: `log = logging.getLogger(...)`
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) \
                    and ast.unparse(node.value.func) == "logging.getLogger":
                assert ast.unparse(node.value) == "logging.getLogger(__name__)", \
                    f"{module}:{node.lineno}"

    def test_the_adapter_stays_small(self) -> None:
        assert len((ROOT / "handler.py").read_text(encoding="utf-8").splitlines()) <= 150

    @pytest.mark.parametrize(("path", "expected"), [
        ("worker/service.py", {"InputError", "JobError", "Exception"}),
        ("handler.py", {"StartupError"})])
    def test_one_caller_error_type(self, path: str, expected: set[str]) -> None:
        # The job flow answers exactly these as messages for the caller; nothing else is. The
        # adapter only turns a start-up failure into one log line and an exit.
        tree = ast.parse((ROOT / path).read_text(encoding="utf-8"))
        caught = {ast.unparse(h.type) for h in ast.walk(tree)
                  if isinstance(h, ast.ExceptHandler) and h.type is not None}
        assert caught == expected

    def test_no_sys_path_edits_outside_the_one_script_entry(self) -> None:
        # `python builder/make_tiny_model.py DIR` keeps working; this file names the call.
        allowed = {ROOT / "builder" / "make_tiny_model.py", Path(__file__).resolve()}
        files = [*MODULES.values(), *ROOT.glob("bench/*.py"), *ROOT.glob("tests/**/*.py")]
        edits = [str(f.relative_to(ROOT)) for f in files
                 if f not in allowed and "sys.path.insert" in f.read_text(encoding="utf-8")]
        assert edits == []

    def test_git_ignores_no_source_file(self) -> None:
        # A root-only pattern written without its leading slash (outputs/) once hid
        # worker/outputs/ from git: the package worked here and was missing from every clone.
        git = shutil.which("git")
        if git is None or not (ROOT / ".git").exists():
            pytest.skip("not a git checkout")
        files = [*MODULES.values(), *ROOT.glob("tests/**/*.py"), *ROOT.glob("tests/**/*.json"),
                 *ROOT.glob("bench/*.py")]
        run = subprocess.run([git, "check-ignore", *(str(f.relative_to(ROOT)) for f in files)],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert run.stdout.split() == [], "ignored by .gitignore: " + run.stdout
