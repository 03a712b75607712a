"""A small Dockerfile reader, the worker's import closure, and the build context's rules.

Enough of Docker's syntax for this project's Dockerfile: stages, ARG expansion, ENV, WORKDIR,
COPY (which build-context file lands where in the image), comments and continuation lines; and
``.dockerignore`` matching as Docker does it. Used by the deploy-file tests and the image
self-test; nothing here builds an image.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Instruction:
    cmd: str  # upper case: FROM, RUN, COPY, ...
    args: str  # the rest, continuation lines joined


@dataclass
class Stage:
    base: str  # the FROM image, ARGs expanded
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, cmd: str) -> list[Instruction]:
        return [i for i in self.instructions if i.cmd == cmd]

    def args(self) -> dict[str, str | None]:
        """``ARG`` declarations in this stage: name -> default (None if none)."""
        return dict(_arg(i.args) for i in self.all("ARG"))

    def env(self) -> dict[str, str]:
        values: dict[str, str] = {}
        for instruction in self.all("ENV"):
            for token in shlex.split(instruction.args):
                key, sep, value = token.partition("=")
                assert sep, f"ENV {instruction.args!r}: use the KEY=value form"
                values[key] = value
        return values

    def workdir(self) -> str:
        dirs = self.all("WORKDIR")
        return dirs[-1].args.strip() if dirs else "/"


@dataclass
class Copy:
    sources: list[str]
    dest: str
    from_stage: str | None
    workdir: str  # the WORKDIR in force at this COPY

    def target(self, source: str) -> str:
        """Where ``source`` lands: a directory's contents go into dest, a file into dest/."""
        dest = self.dest if self.dest.startswith("/") else f"{self.workdir}/{self.dest}"
        if self.dest.endswith("/") and not (ROOT / source).is_dir():
            dest = f"{dest}/{Path(source).name}"
        return os.path.normpath(dest)


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def stage(self, name: str) -> Stage:
        return next(s for s in self.stages if s.name == name)


def _arg(text: str) -> tuple[str, str | None]:
    name, sep, default = text.strip().partition("=")
    return name, (shlex.split(default)[0] if default else "") if sep else None


def expand_args(text: str, values: dict[str, str | None]) -> str:
    """Docker's substitutions: ``$V``, ``${V}``, ``${V:+word}`` (word if V is set and not
    empty) and ``${V:-word}`` (V, or word if it is unset or empty)."""
    def expand(m: re.Match[str]) -> str:
        value = values.get(m.group(1) or m.group(4)) or ""
        if m.group(2) == ":+":
            return m.group(3) if value else ""
        if m.group(2) == ":-":
            return value or m.group(3)
        return value

    return re.sub(r"\$\{(\w+)(?:(:[+-])([^}]*))?\}|\$(\w+)", expand, text)


def parse_dockerfile(text: str) -> Dockerfile:
    """Instructions grouped by stage; comment lines dropped, continuations joined."""
    instructions, pending = [], ""
    for line in text.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if pending and line.lstrip().startswith("#"):
            continue  # Docker drops comment lines inside a continued instruction too
        pending += line.rstrip()
        if pending.endswith("\\"):
            pending = pending[:-1] + " "
            continue
        cmd, _, args = pending.strip().partition(" ")
        instructions.append(Instruction(cmd.upper(), args.strip()))
        pending = ""
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for instruction in instructions:
        if instruction.cmd == "FROM":
            words = instruction.args.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(expand_args(words[0], global_args), name))
        elif not stages:
            assert instruction.cmd == "ARG", f"{instruction.cmd} before the first FROM"
            global_args.update([_arg(instruction.args)])
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


def copies(stage: Stage) -> list[Copy]:
    result, workdir = [], "/"
    for instruction in stage.instructions:
        if instruction.cmd == "WORKDIR":
            workdir = os.path.normpath(os.path.join(workdir, instruction.args.strip()))
        if instruction.cmd != "COPY":
            continue
        if instruction.args.startswith("["):
            words = json.loads(instruction.args)
            flags: list[str] = []
        else:
            words = shlex.split(instruction.args)
            flags = [w for w in words if w.startswith("--")]
            words = [w for w in words if not w.startswith("--")]
        from_stage = next((f.split("=", 1)[1] for f in flags if f.startswith("--from=")), None)
        result.append(Copy(words[:-1], words[-1], from_stage, workdir))
    return result


def image_files(stage: Stage) -> dict[str, str]:
    """Image path -> repo file, for every build-context file COPYed into ``stage``."""
    landed = {}
    for c in copies(stage):
        if c.from_stage is not None:
            continue
        for source in c.sources:
            for f in context_files(source):
                if (ROOT / source).is_dir():
                    relative = Path(f).relative_to(source.rstrip("/")).as_posix()
                    landed[os.path.normpath(f"{c.target(source)}/{relative}")] = f
                else:
                    landed[c.target(source)] = f
    return landed


DOCKERFILE = parse_dockerfile((ROOT / "Dockerfile").read_text(encoding="utf-8"))


# ---- the worker's import closure and the build context ------------------------------------


def _module_files(name: str) -> list[Path]:
    """Repo files that ``import name`` loads: a top-level module or package, and submodules."""
    files, parts = [], name.split(".")
    for i in range(1, len(parts) + 1):
        base = ROOT.joinpath(*parts[:i])
        if (base / "__init__.py").is_file():
            files.append(base / "__init__.py")
        elif base.with_suffix(".py").is_file():
            files.append(base.with_suffix(".py"))
            break
        else:
            break
    return files


def import_closure(entry: Path) -> set[str]:
    """Repo files (relative paths) that ``entry`` imports, directly or through each other."""
    todo, seen = [entry], set()
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                todo.extend(_module_files(name))
    return {path.relative_to(ROOT).as_posix() for path in seen}


def dockerignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = path.strip("/").split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    excluded = False
    for pattern in patterns:
        negated = pattern.startswith("!")
        body = os.path.normpath(pattern.lstrip("!").strip("/"))
        regex = re.escape(body).replace(r"\*\*/", "(?:.*/)?").replace(r"\*\*", ".*") \
            .replace(r"\*", "[^/]*").replace(r"\?", "[^/]")
        if any(re.fullmatch(regex, prefix) for prefix in prefixes):
            excluded = not negated
    return excluded


def dockerignore_patterns() -> list[str]:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def context_files(source: str) -> list[str]:
    """The repo files a COPY source names (a directory means every file under it)."""
    path = ROOT / source
    if path.is_dir():
        return sorted(p.relative_to(ROOT).as_posix() for p in path.rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts)
    return [source.rstrip("/")]
