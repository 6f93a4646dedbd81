"""Static check of every Triton kernel in the packages: no kernel loads, in the same launch, a buffer
it stores.

Triton's interpreter runs one program at a time and each statement to completion, so a kernel that
stores to global memory and loads it back in the same launch (say, the top-k indices stored by one
thread and gathered by another) passes every CPU test, while on a GPU the load can run before the
store lands: there is no barrier between threads' global accesses. This module reads the kernels'
sources (``ast``): for every ``@triton.jit`` function of every module under ``mlit_kernels/`` and
``mlit/`` (found by walking the folders, so new files are covered), it follows each pointer
argument (``*_ptr``) through local aliases (``row = x_ptr + i * M``), helper functions (a
``@triton.jit`` function called with the pointer, resolved through the caller's globals, however
deep) and their returned pointers, to every ``tl.load`` / ``tl.store`` / ``tl.atomic_*`` that uses
it. A launched kernel whose loaded and stored argument sets intersect is reported, with the lines.

The analysis is flow-insensitive and ignores ``tl.constexpr`` branches (a load in a branch that a
configuration never takes still counts): it can over-report, never miss an access it can trace. A
load or store whose pointer traces to no ``*_ptr`` argument fails the test too (name pointer
arguments ``*_ptr``), so an access the scan cannot follow is never silently skipped. Buffers that
alias at the launch site (one tensor passed as two arguments) are outside its reach.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import sys
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("mlit_kernels", "mlit")
WRITES = {"store"} | {f"atomic_{op}" for op in ("add", "and", "cas", "max", "min", "or", "xchg", "xor")}
READS = {"load"}
PASS_THROUGH = {"make_block_ptr": "base", "advance": "base", "multiple_of": "input", "max_contiguous": "input",
                "max_constancy": "input"}  # tl functions that return (a view of) their pointer argument


def _is_jit(obj) -> bool:
    return type(obj).__module__.startswith("triton") and hasattr(obj, "fn")


def _python_function(obj):
    """The Python function under a @triton.jit / autotune / heuristics wrapper."""
    while _is_jit(obj):
        obj = obj.fn
    return obj


def _triton_language_name(obj) -> str | None:
    """'load', 'store', ... when obj is a triton.language function, else None."""
    module = getattr(obj, "__module__", "") or ""
    return getattr(obj, "__name__", None) if module.startswith("triton.language") else None


@dataclass
class Access:
    kind: str  # "load" or "store"
    roots: frozenset  # the function's parameters the pointer derives from
    where: str  # file:line of the tl.load / tl.store (or of the helper call that leads to it)


@dataclass
class Summary:
    """What a @triton.jit function does through its parameters."""

    params: list[str]
    accesses: list[Access] = field(default_factory=list)
    returns: list[frozenset] | None = None  # per returned value: the parameters it derives from


class Scanner:
    """Summaries of @triton.jit functions, memoised; helpers are resolved through each function's globals."""

    def __init__(self):
        self.summaries: dict[object, Summary] = {}
        self.called: set = set()  # the functions some scanned function calls (helpers)

    def summary(self, fn) -> Summary:
        fn = _python_function(fn)
        if fn not in self.summaries:
            self.summaries[fn] = Summary([])  # a recursive call sees an empty summary
            self.summaries[fn] = _FunctionScan(self, fn).run()
        return self.summaries[fn]


class _FunctionScan:
    def __init__(self, scanner: Scanner, fn):
        self.scanner, self.fn = scanner, fn
        lines, self.first_line = inspect.getsourcelines(fn)
        self.tree = ast.parse(textwrap.dedent("".join(lines))).body[0]
        self.file = Path(inspect.getsourcefile(fn)).resolve()
        self.params = [a.arg for a in self.tree.args.posonlyargs + self.tree.args.args]
        self.env: dict[str, frozenset] = {p: frozenset([p]) for p in self.params}

    def where(self, node) -> str:
        try:
            file = self.file.relative_to(REPO)
        except ValueError:
            file = self.file
        return f"{file}:{self.first_line + node.lineno - 1}"

    def resolve(self, func):
        """The object a call's function expression names in the function's globals, or None."""
        if isinstance(func, ast.Name):
            return self.fn.__globals__.get(func.id)
        if isinstance(func, ast.Attribute):
            base = self.resolve(func.value)
            return getattr(base, func.attr, None) if base is not None else None
        return None

    # -- which parameters an expression's pointer derives from (not through loaded values)
    def roots(self, node) -> frozenset:
        if node is None:
            return frozenset()
        if isinstance(node, ast.Name):
            return self.env.get(node.id, frozenset())
        if isinstance(node, ast.BinOp):
            return self.roots(node.left) | self.roots(node.right)
        if isinstance(node, ast.UnaryOp):
            return self.roots(node.operand)
        if isinstance(node, ast.IfExp):
            return self.roots(node.body) | self.roots(node.orelse)
        if isinstance(node, ast.Subscript):
            return self.roots(node.value)
        if isinstance(node, ast.Call):
            values = self.call_values(node)
            return frozenset().union(*values) if values else frozenset()
        return frozenset()

    def call_values(self, call: ast.Call) -> list[frozenset]:
        """The parameters each value a call returns derives from (one entry for a single value)."""
        target = self.resolve(call.func)
        name = _triton_language_name(target)
        if name in PASS_THROUGH:
            return [self.roots(_argument(call, 0, PASS_THROUGH[name]))]
        if name == "where":
            return [self.roots(_argument(call, 1, "x")) | self.roots(_argument(call, 2, "y"))]
        if _is_jit(target):
            callee = self.scanner.summary(target)
            binding = self.bind(call, callee.params)
            return [frozenset().union(*(binding.get(p, frozenset()) for p in ret)) for ret in (callee.returns or [])]
        if isinstance(call.func, ast.Attribute) and call.func.attr == "to" and target is None:
            return [self.roots(call.func.value)]  # ptr.to(...): a cast of the value itself
        return [frozenset()]

    def bind(self, call: ast.Call, params: list[str]) -> dict[str, frozenset]:
        binding = {p: self.roots(a) for p, a in zip(params, call.args)}
        binding.update({k.arg: self.roots(k.value) for k in call.keywords if k.arg})
        return binding

    # -- flow-insensitive aliases: each local name derives from the union of all it is assigned
    def assign(self, target, value_roots: list[frozenset] | frozenset) -> bool:
        if isinstance(target, (ast.Tuple, ast.List)):
            parts = value_roots if isinstance(value_roots, list) and len(value_roots) == len(target.elts) else (
                [_union(value_roots)] * len(target.elts))
            return any([self.assign(t, r) for t, r in zip(target.elts, parts)])
        if isinstance(target, ast.Name):
            roots = _union(value_roots)
            old = self.env.get(target.id, frozenset())
            self.env[target.id] = old | roots
            return not roots <= old
        return False

    def value_list(self, value) -> list[frozenset] | frozenset:
        if isinstance(value, (ast.Tuple, ast.List)):
            return [self.roots(v) for v in value.elts]
        if isinstance(value, ast.Call):
            values = self.call_values(value)
            return values if len(values) != 1 else values[0]
        return self.roots(value)

    def run(self) -> Summary:
        changed = True
        while changed:  # to a fixed point: loops reassign names
            changed = False
            for node in ast.walk(self.tree):
                if isinstance(node, ast.Assign):
                    for target in node.targets:
                        changed |= self.assign(target, self.value_list(node.value))
                elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                    changed |= self.assign(node.target, self.value_list(node.value))
                elif isinstance(node, ast.For):
                    changed |= self.assign(node.target, frozenset())
        summary = Summary(self.params)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Call):
                summary.accesses += self.accesses(node)
            elif isinstance(node, ast.Return) and node.value is not None:
                values = self.value_list(node.value)
                values = values if isinstance(values, list) else [values]
                if summary.returns is None:
                    summary.returns = values
                elif len(summary.returns) == len(values):
                    summary.returns = [a | b for a, b in zip(summary.returns, values)]
                else:
                    summary.returns = [_union(summary.returns) | _union(values)]
        return summary

    def accesses(self, call: ast.Call) -> list[Access]:
        target = self.resolve(call.func)
        name = _triton_language_name(target)
        if name in READS or name in WRITES:
            kind = "load" if name in READS else "store"
            return [Access(kind, self.roots(_argument(call, 0, "pointer")), self.where(call))]
        if _is_jit(target):
            self.scanner.called.add(_python_function(target))
            callee = self.scanner.summary(target)
            binding = self.bind(call, callee.params)
            return [Access(a.kind, frozenset().union(*(binding.get(p, frozenset()) for p in a.roots)),
                           f"{self.where(call)} -> {a.where}") for a in callee.accesses]
        return []


def _argument(call: ast.Call, position: int, keyword: str):
    for k in call.keywords:
        if k.arg == keyword:
            return k.value
    return call.args[position] if len(call.args) > position else None


def _union(roots) -> frozenset:
    return frozenset().union(*roots) if isinstance(roots, list) else roots


# ----------------------------------------------------------------------------------------------
# the packages' kernels


def kernel_modules(root: Path = REPO, packages=PACKAGES) -> list[str]:
    """Every module under the packages whose source defines a @triton.jit function."""
    names = []
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            tree = ast.parse(path.read_text())
            if any(isinstance(node, ast.FunctionDef) and any("jit" in ast.unparse(d) for d in node.decorator_list)
                   for node in ast.walk(tree)):
                names.append(".".join(path.relative_to(root).with_suffix("").parts))
    return names


def jit_functions(module) -> dict[str, object]:
    """The @triton.jit functions a module defines (not those it imports)."""
    return {name: obj for name, obj in vars(module).items()
            if _is_jit(obj) and _python_function(obj).__module__ == module.__name__}


def launch_names(module) -> set[str]:
    """Names launched in the module's source: ``name[grid](...)`` or ``module.name[grid](...)``."""
    return {ast.unparse(node.func.value).split(".")[-1] for node in ast.walk(ast.parse(inspect.getsource(module)))
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript)}


@dataclass
class Finding:
    kernel: str
    hazards: dict[str, list[str]]  # buffer -> the lines that load it and store it
    untraced: list[str]  # accesses whose pointer traces to no *_ptr argument


def scan_kernel(scanner: Scanner, qualname: str, kernel) -> Finding:
    summary = scanner.summary(kernel)
    pointers = {p for p in summary.params if p.endswith("_ptr")}
    loads: dict[str, list[str]] = {}
    stores: dict[str, list[str]] = {}
    untraced = []
    for access in summary.accesses:
        buffers = access.roots & pointers
        if not buffers:
            untraced.append(f"{access.kind} at {access.where}")
        for buffer in buffers:
            (loads if access.kind == "load" else stores).setdefault(buffer, []).append(access.where)
    hazards = {b: [f"load {w}" for w in loads[b]] + [f"store {w}" for w in stores[b]] for b in loads.keys() & stores}
    return Finding(qualname, hazards, untraced)


def scan_modules(module_names) -> list[Finding]:
    """Findings for every launched kernel of the modules: a @triton.jit function that some module
    launches, or that no scanned @triton.jit function calls (the rest are helpers, scanned through
    their callers)."""
    scanner = Scanner()
    modules = [importlib.import_module(name) for name in module_names]
    functions = {f"{m.__name__}.{name}": obj for m in modules for name, obj in jit_functions(m).items()}
    for obj in functions.values():
        scanner.summary(obj)
    launched = set().union(*(launch_names(m) for m in modules))
    return [scan_kernel(scanner, qualname, obj) for qualname, obj in sorted(functions.items())
            if qualname.rsplit(".", 1)[1] in launched or _python_function(obj) not in scanner.called]


def _report(findings) -> str:
    lines = []
    for f in findings:
        for buffer, where in sorted(f.hazards.items()):
            lines.append(f"{f.kernel}: loads and stores {buffer}: " + "; ".join(where))
        for u in f.untraced:
            lines.append(f"{f.kernel}: cannot trace the pointer of a {u} to a *_ptr argument")
    return "\n".join(lines)


def test_every_kernel_module_is_scanned():
    """The walk finds every family's kernel files (and no file without a @triton.jit function); every
    kernel lives in mlit_kernels, none in mlit (the models call a family's op)."""
    from mlit_kernels import registry
    from mlit_kernels.common.family import source_path

    names = kernel_modules()
    for family in registry.families():
        kernel_sources = [m for m in family.sources if "@triton.jit" in source_path(m).read_text(encoding="utf-8")]
        assert kernel_sources and set(kernel_sources) <= set(names), family.name
    assert "mlit_kernels.common.gating" in names
    assert not [name for name in names if name.split(".")[0] == "mlit"]
    for name in names:
        assert jit_functions(importlib.import_module(name)), name


def test_no_kernel_loads_what_it_stores():
    findings = scan_modules(kernel_modules())
    assert len(findings) >= 10
    report = _report(findings)
    assert not report, "\n" + report


# ----------------------------------------------------------------------------------------------
# the scan itself: it finds the store-then-reload pattern, through helpers and aliases

RACY = '''
import triton
import triton.language as tl


@triton.jit
def _pick(key_ptr, rows, idx_ptr):
    col = tl.load(key_ptr + rows)
    tl.store(idx_ptr + rows, col)
    return col


@triton.jit
def _row(ptr, rows):
    return ptr + rows * 2


@triton.jit
def racy_kernel(key_ptr, idx_ptr, gate_ptr, N, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    _pick(key_ptr, rows, idx_ptr)
    col = tl.load(_row(idx_ptr, rows))  # reloads what _pick stored
    tl.store(gate_ptr + rows, col)


@triton.jit
def clean_kernel(key_ptr, idx_ptr, gate_ptr, N, BLOCK: tl.constexpr):
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    col = _pick(key_ptr, rows, idx_ptr)
    out = gate_ptr + rows * N
    tl.store(out, tl.load(key_ptr + col))  # a value loaded from idx is an offset, not idx itself


@triton.jit
def alias_kernel(x_ptr, out_ptr, N, BLOCK: tl.constexpr):
    base = out_ptr + tl.program_id(0) * N
    for i in range(0, N, BLOCK):
        tl.store(base + i + tl.arange(0, BLOCK), tl.load(x_ptr + i + tl.arange(0, BLOCK)))
        acc = tl.load(tl.make_block_ptr(base=base, shape=(N,), strides=(1,), offsets=(0,), block_shape=(BLOCK,),
                                        order=(0,)))
    tl.store(x_ptr, acc)


@triton.jit
def untraced_kernel(x, N):
    tl.store(x + N, 1.0)
'''


@pytest.fixture(scope="module")
def racy_module(tmp_path_factory):
    path = tmp_path_factory.mktemp("hazards") / "racy_kernels.py"
    path.write_text(RACY)
    spec = importlib.util.spec_from_file_location("racy_kernels", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["racy_kernels"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["racy_kernels"]


def test_scan_finds_a_store_then_reload(racy_module):
    findings = {f.kernel.split(".")[-1]: f for f in scan_modules(["racy_kernels"])}
    assert set(findings) == {"racy_kernel", "clean_kernel", "alias_kernel", "untraced_kernel"}  # helpers excluded
    assert set(findings["racy_kernel"].hazards) == {"idx_ptr"}
    assert any("->" in w for w in findings["racy_kernel"].hazards["idx_ptr"])  # the store is inside _pick
    assert findings["clean_kernel"].hazards == {} and findings["clean_kernel"].untraced == []
    assert set(findings["alias_kernel"].hazards) == {"out_ptr", "x_ptr"}
    assert findings["untraced_kernel"].untraced and not findings["untraced_kernel"].hazards
