"""Static gate: reject a candidate before it runs, with the ``error_kind`` the rejection deserves.

An allow-list, not a block-list. A candidate passes only if it parses, defines ``ModelNew`` and a
``@triton.jit`` kernel that code reachable from ``ModelNew.forward`` launches, and:

- imports only ``torch``, ``torch.nn``, ``torch.nn.functional``, ``triton``, ``triton.language``,
  ``math`` (plus ``__future__`` and type names from ``typing``: type hints have no runtime power);
- every name it reaches through ``torch``/``triton``/``math`` anywhere in the module (not only in
  ``forward``) is on an allow-list: allocation, dtypes, shape/device queries, ``nn`` parameter holders,
  ``triton.jit``/``autotune``/``Config``/``cdiv``/``next_power_of_2`` and ``tl.*`` (resolved against the
  installed Triton, so ``tl.extra.module_from_spec`` and other re-exported helpers do not pass);
- modules are only ever used through an attribute (``torch.empty``), never as values (``t = torch``);
- no dunder names or attributes (``super().__init__`` excepted), no private attributes outside ``self``,
  no ``getattr``/``setattr``/``vars``/``globals``/``locals``/``type``/``exec``/``open``…;
- no assignment to a module's attributes (monkey-patching), no reference to the reference program;
- in code reachable from ``forward``: no ``try/except`` fallbacks, no ``@``, no tensor compute methods,
  no calls of ``nn`` compute modules held in ``self``.

Every message says what to change: it is fed back to the policy. The gate is the first line; the
runner's dispatch check and the judge's checks (see ``eval_judge``) are the ones that decide.
"""

from __future__ import annotations

import ast
import importlib.util
import types
from collections.abc import Iterator
from functools import cache

import msgspec


class GateRejection(msgspec.Struct, frozen=True):
    error_kind: str
    message: str


ALLOWED_MODULES = frozenset(
    {"torch", "torch.nn", "torch.nn.functional", "triton", "triton.language", "math", "typing", "__future__"}
)
# from typing: type names only (typing also re-exports sys, so its attributes are allow-listed too)
TYPING_NAMES = frozenset(
    {"Optional", "Tuple", "List", "Dict", "Union", "Any", "Callable", "Sequence", "Iterable", "Mapping", "Final"}
)
TORCH_DTYPES = frozenset(
    {
        "float", "float32", "float16", "half", "bfloat16", "float64", "double", "int", "int32", "int64", "long",
        "int16", "short", "int8", "uint8", "bool", "float8_e4m3fn", "float8_e5m2", "complex64",
    }
)  # fmt: skip
ALLOWED_TORCH = frozenset(
    {f"torch.{name}" for name in TORCH_DTYPES}
    | {
        f"torch.{name}"
        for name in (
            # allocation (random fills are for parameters in __init__; forward is checked at run time)
            "empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones", "ones_like", "full",
            "full_like", "arange", "tensor", "as_tensor", "rand", "rand_like", "randn", "randn_like",
            "randint",
            # types, shape, dtype and device queries, autograd context
            "Tensor", "Size", "device", "dtype", "finfo", "iinfo", "is_tensor", "is_floating_point",
            "get_default_dtype", "promote_types", "result_type", "no_grad", "inference_mode",
            "contiguous_format", "channels_last", "preserve_format",
            # devices and streams
            "cuda", "cuda.current_device", "cuda.current_stream", "cuda.default_stream", "cuda.device",
            "cuda.is_available", "cuda.get_device_capability", "cuda.get_device_properties", "cuda.Stream",
            "cuda.stream", "cuda.synchronize", "cuda.device_count",
            # nn: the module base class and parameter holders (calling a compute module is checked apart)
            "nn", "nn.Module", "nn.Parameter", "nn.ParameterList", "nn.ModuleList", "nn.Identity",
            "nn.Linear", "nn.Bilinear", "nn.Conv1d", "nn.Conv2d", "nn.Conv3d", "nn.ConvTranspose1d",
            "nn.ConvTranspose2d", "nn.ConvTranspose3d", "nn.LayerNorm", "nn.GroupNorm", "nn.RMSNorm",
            "nn.BatchNorm1d", "nn.BatchNorm2d", "nn.BatchNorm3d", "nn.InstanceNorm1d", "nn.InstanceNorm2d",
            "nn.Embedding", "nn.init", "nn.functional",
            # parameter initialisation (what nn modules do in __init__); one level only: torch.nn.init also
            # holds the torch module it imported
            "nn.init.uniform_", "nn.init.normal_", "nn.init.constant_", "nn.init.ones_", "nn.init.zeros_",
            "nn.init.eye_", "nn.init.dirac_", "nn.init.xavier_uniform_", "nn.init.xavier_normal_",
            "nn.init.kaiming_uniform_", "nn.init.kaiming_normal_", "nn.init.trunc_normal_", "nn.init.orthogonal_",
            "nn.init.calculate_gain",
        )
    }
)  # fmt: skip
TORCH_MODULES = frozenset({"torch.cuda", "torch.nn", "torch.nn.init", "torch.nn.functional"})
ALLOWED_TRITON = frozenset(
    {"triton.jit", "triton.autotune", "triton.Config", "triton.cdiv", "triton.next_power_of_2", "triton.heuristics",
     "triton.language"}
)  # fmt: skip
# triton.language submodules a kernel may reach (libdevice math); everything else there is Triton's own machinery
ALLOWED_TL_MODULES = frozenset(
    {"triton.language", "triton.language.math", "triton.language.extra", "triton.language.extra.libdevice",
     "triton.language.extra.cuda", "triton.language.extra.cuda.libdevice", "triton.language.extra.hip",
     "triton.language.extra.hip.libdevice"}
)  # fmt: skip
FORBIDDEN_BUILTINS = frozenset(
    {
        "exec", "eval", "compile", "open", "breakpoint", "input", "getattr", "setattr", "delattr", "hasattr",
        "vars", "globals", "locals", "dir", "type", "memoryview", "help", "exit", "quit", "classmethod",
        "staticmethod", "property",
    }
)  # fmt: skip
COMPUTE_METHODS = frozenset(
    {
        "sum", "mean", "max", "min", "amax", "amin", "argmax", "argmin", "matmul", "mm", "bmm", "mv",
        "dot", "softmax", "log_softmax", "relu", "sigmoid", "tanh", "exp", "log", "sqrt", "rsqrt", "pow",
        "norm", "var", "std", "add", "sub", "mul", "div", "abs", "clamp", "clip", "neg", "erf", "cumsum",
        "prod", "sort", "topk", "addmm", "baddbmm", "where", "masked_fill", "maximum", "minimum",
        "square", "reciprocal", "lerp", "addcmul", "addcdiv", "logsumexp", "einsum", "outer", "tril", "triu",
    }
)  # fmt: skip
# ways out of torch to host Python or numpy, where no dispatch check sees the arithmetic: banned everywhere
HOST_ESCAPES = frozenset(
    {"numpy", "tolist", "item", "storage", "untyped_storage", "_typed_storage", "apply_", "map_", "map2_", "data_ptr"}
)
NN_COMPUTE_MODULES = frozenset(
    {
        "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
        "ConvTranspose3d", "LayerNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
        "InstanceNorm1d", "InstanceNorm2d", "RMSNorm", "MultiheadAttention", "Softmax", "LogSoftmax", "ReLU",
        "GELU", "SiLU", "Sigmoid", "Tanh", "LeakyReLU", "Dropout", "Embedding", "MaxPool1d", "MaxPool2d",
        "AvgPool1d", "AvgPool2d", "LSTM", "GRU", "RNN", "Transformer", "TransformerEncoderLayer", "Sequential",
    }
)  # fmt: skip
REFERENCE_NAMES = frozenset({"Model", "get_inputs", "get_init_inputs"})
# attributes that lead from an object to frames, code or globals (the classic ways out of a Python sandbox)
INTROSPECTION_ATTRIBUTES = frozenset(
    {
        "gi_frame", "gi_code", "gi_yieldfrom", "cr_frame", "cr_code", "cr_await", "ag_frame", "ag_code",
        "f_back", "f_globals", "f_locals", "f_builtins", "f_code", "tb_frame", "tb_next", "co_code", "co_consts",
        "co_names", "func_globals", "func_code", "im_func", "im_self", "mro",
    }
)  # fmt: skip
ALLOWED_TORCH_HINT = "from torch only allocation (torch.empty…), dtypes, shape/device queries and nn parameter holders"


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


def _is_dunder(name: str) -> bool:
    return len(name) > 4 and name.startswith("__") and name.endswith("__")


@cache
def _triton_language() -> types.ModuleType | None:
    try:
        import triton.language

        return triton.language
    except ImportError:  # pragma: no cover - triton is a dependency
        return None


def _tl_chain_allowed(chain: list[str]) -> bool:
    """A ``triton.language.a.b`` chain, resolved against the installed Triton, stays inside the language."""
    obj: object = _triton_language()
    if obj is None:
        return True
    for name in chain:
        if name.startswith("_"):
            return False
        try:
            obj = getattr(obj, name)
        except AttributeError:
            return True  # does not exist: the compiler will say so
        if isinstance(obj, types.ModuleType):
            if obj.__name__ not in ALLOWED_TL_MODULES:
                return False
            continue
        owner = getattr(obj, "__module__", None) or getattr(type(obj), "__module__", "")
        if not isinstance(obj, int | float | str | bool) and not str(owner).startswith("triton"):
            return False
    return True


def name_allowed(full: str) -> bool:
    """Whether a fully resolved dotted name (``torch.empty``, ``triton.language.load``) may be used."""
    root = full.split(".", 1)[0]
    if root == "torch":
        return full in ALLOWED_TORCH
    if root == "triton":
        if full.startswith("triton.language."):
            return _tl_chain_allowed(full.split(".")[2:])
        return full in ALLOWED_TRITON or full == "triton"
    if root == "math":
        return not _has_private(full)
    if root == "typing":
        return full == "typing" or full.removeprefix("typing.") in TYPING_NAMES
    return True


def is_module_name(full: str) -> bool:
    """Whether an allowed dotted name is a module (torch.cuda, torch.nn.init, tl.extra …): modules hold other
    modules (torch.cuda.os, tl.extra.pkgutil), so they may only be reached through, never held as values."""
    return full in ALLOWED_MODULES or full in TORCH_MODULES or full in ALLOWED_TL_MODULES  # other modules are not allowed


def _has_private(full: str) -> bool:
    return any(part.startswith("_") for part in full.split(".")[1:])


class _Module:
    """What the gate needs to know about the candidate module."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.aliases: dict[str, str] = {}
        self.functions: dict[str, ast.FunctionDef] = {}
        self.kernels: set[str] = set()
        self.model_new: ast.ClassDef | None = None
        self.methods: dict[str, ast.FunctionDef] = {}
        self.parents: dict[int, ast.AST] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                self.functions[node.name] = node
            elif isinstance(node, ast.ClassDef) and node.name == "ModelNew":
                self.model_new = node
                self.methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(tree):
            for child in ast.iter_child_nodes(node):
                self.parents[id(child)] = node
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"
        for name, fn in self.functions.items():
            if any(self._is_triton_decorator(d) for d in fn.decorator_list):
                self.kernels.add(name)

    def resolve(self, node: ast.expr) -> str | None:
        """The full dotted name of an expression, through import aliases (``F.relu`` → ``torch.nn.functional.relu``)."""
        dotted = _dotted(node)
        if dotted is None:
            return None
        root, _, rest = dotted.partition(".")
        full = self.aliases.get(root, root)
        return f"{full}.{rest}" if rest else full

    def is_imported(self, node: ast.expr) -> bool:
        dotted = _dotted(node)
        return dotted is not None and dotted.split(".", 1)[0] in self.aliases

    def _is_triton_decorator(self, node: ast.expr) -> bool:
        target = node.func if isinstance(node, ast.Call) else node
        name = self.resolve(target) or ""
        return name.startswith("triton.") and name.rsplit(".", 1)[-1] in ("jit", "autotune", "heuristics")

    def nn_module_attributes(self) -> dict[str, str]:
        """``self.<attr>`` assigned a compute ``nn`` module in ``__init__``: attr → module class."""
        found: dict[str, str] = {}
        init = self.methods.get("__init__")
        if init is None:
            return found
        for node in ast.walk(init):
            if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
                cls = (self.resolve(node.value.func) or "").rsplit(".", 1)[-1]
                if cls in NN_COMPUTE_MODULES:
                    for target in node.targets:
                        if isinstance(target, ast.Attribute) and _dotted(target.value) == "self":
                            found[target.attr] = cls
        return found

    def reachable_from_forward(self) -> list[ast.FunctionDef]:
        """ModelNew methods and module functions that ``forward`` can call, by name; kernels excluded."""
        methods = self.methods
        todo = [methods["forward"]] if "forward" in methods else []
        seen: dict[int, ast.FunctionDef] = {}
        while todo:
            fn = todo.pop()
            if id(fn) in seen:
                continue
            seen[id(fn)] = fn
            for node in ast.walk(fn):
                if not isinstance(node, ast.Call):
                    continue
                if isinstance(node.func, ast.Name) and node.func.id in self.functions:
                    if node.func.id not in self.kernels:
                        todo.append(self.functions[node.func.id])
                elif isinstance(node.func, ast.Attribute) and _dotted(node.func.value) == "self":
                    if node.func.attr in methods:
                        todo.append(methods[node.func.attr])
        return list(seen.values())


def _launches(fn: ast.FunctionDef, kernels: set[str]) -> bool:
    for node in ast.walk(fn):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
            if isinstance(node.func.value, ast.Name) and node.func.value.id in kernels:
                return True
    return False


def _module_exists(name: str) -> bool:
    try:
        return importlib.util.find_spec(name.split(".")[0]) is not None
    except (ImportError, ValueError):
        return False


def _imports(module: _Module) -> Iterator[GateRejection]:
    allowed = ", ".join(sorted(ALLOWED_MODULES - {"__future__", "typing"}))
    for node in ast.walk(module.tree):
        if isinstance(node, ast.ImportFrom):
            if node.level or not node.module:
                yield GateRejection("forbidden", f"line {node.lineno}: relative import; allowed imports: {allowed}")
                continue
            names = [a.name for a in node.names]
            if "*" in names:
                yield GateRejection("forbidden", f"line {node.lineno}: 'from {node.module} import *'; import names explicitly")
                continue
            if node.module == "__future__":
                continue
            if node.module not in ALLOWED_MODULES:
                yield _unknown_import(node.lineno, node.module, allowed)
                continue
            for name in names:
                full = f"{node.module}.{name}"
                if full not in ALLOWED_MODULES and not name_allowed(full):
                    yield GateRejection("forbidden", f"line {node.lineno}: imports {full}; {_what_instead(full)}")
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name not in ALLOWED_MODULES:
                    yield _unknown_import(node.lineno, a.name, allowed)


def _unknown_import(lineno: int, name: str, allowed: str) -> GateRejection:
    if not _module_exists(name):
        return GateRejection("import", f"line {lineno}: No module named {name!r}; allowed imports: {allowed}")
    return GateRejection("forbidden", f"line {lineno}: imports {name}; only these imports are allowed: {allowed}")


def _what_instead(full: str) -> str:
    if full.startswith("torch"):
        return f"it computes with PyTorch (or reaches beyond it): do the work in a @triton.jit kernel; {ALLOWED_TORCH_HINT}"
    if full.startswith("triton.language"):
        return "only the Triton language itself (tl.load, tl.store, tl.math…) may be used, not Triton's internals"
    if full.startswith("triton"):
        return "from triton only jit, autotune, heuristics, Config, cdiv, next_power_of_2 and triton.language"
    return "not allowed"


def _maximal_chains(module: _Module) -> Iterator[ast.expr]:
    """Every Name/Attribute chain that is not itself the value of a longer attribute chain."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Name | ast.Attribute):
            parent = module.parents.get(id(node))
            if isinstance(parent, ast.Attribute) and parent.value is node:
                continue
            yield node


def _names_and_attributes(module: _Module) -> Iterator[GateRejection]:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Name) and _is_dunder(node.id):
            yield GateRejection("forbidden", f"line {node.lineno}: uses {node.id}; dunder names are not allowed")
        elif isinstance(node, ast.Name) and node.id in FORBIDDEN_BUILTINS and isinstance(node.ctx, ast.Load):
            yield GateRejection("forbidden", f"line {node.lineno}: uses the builtin {node.id}; "
                                "introspection, dynamic attribute access and file access are not allowed")  # fmt: skip
        elif isinstance(node, ast.Name) and node.id in REFERENCE_NAMES and isinstance(node.ctx, ast.Load):
            yield GateRejection("forbidden", f"line {node.lineno}: refers to the reference program ({node.id})")
        elif isinstance(node, ast.Attribute):
            if node.attr in REFERENCE_NAMES:
                yield GateRejection("forbidden", f"line {node.lineno}: refers to the reference program ({node.attr})")
            elif _is_dunder(node.attr):
                is_super_init = (
                    node.attr == "__init__"
                    and isinstance(node.value, ast.Call)
                    and isinstance(node.value.func, ast.Name)
                    and node.value.func.id == "super"
                )
                if not is_super_init:
                    yield GateRejection("forbidden", f"line {node.lineno}: accesses .{node.attr}; dunder attributes are not "
                                        "allowed (super().__init__() is)")  # fmt: skip
            elif node.attr in INTROSPECTION_ATTRIBUTES:
                yield GateRejection("forbidden", f"line {node.lineno}: accesses .{node.attr}; frames, code objects and "
                                    "globals are not reachable from a candidate")  # fmt: skip
            elif node.attr in HOST_ESCAPES:
                yield GateRejection("forbidden", f"line {node.lineno}: uses .{node.attr}, which takes tensor data out of "
                                    "torch into host Python or numpy; compute in a Triton kernel")  # fmt: skip
            elif node.attr.startswith("_") and _dotted(node.value) != "self":
                yield GateRejection("forbidden", f"line {node.lineno}: accesses the private attribute .{node.attr}")
    for chain in _maximal_chains(module):
        if not module.is_imported(chain):
            continue
        full = module.resolve(chain) or ""
        parent = module.parents.get(id(chain))
        if is_module_name(full) and not isinstance(parent, ast.Import | ast.ImportFrom):
            yield GateRejection("forbidden", f"line {chain.lineno}: uses the module {full} as a value; "
                                f"call what you need through it ({full}.…)")  # fmt: skip
        elif full not in ALLOWED_MODULES and not name_allowed(full):
            yield GateRejection("forbidden", f"line {chain.lineno}: uses {full}; {_what_instead(full)}")


def _definitions(module: _Module) -> Iterator[GateRejection]:
    """Classes derive from nn.Module (or nothing) and define no dunder methods but __init__: a special method
    (``__iter__``, ``__del__``, ``__torch_function__`` …) would run the candidate's code where no check looks."""
    for node in ast.walk(module.tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _is_dunder(node.name) and node.name != "__init__":
            yield GateRejection("forbidden", f"line {node.lineno}: defines {node.name}(); special methods other than "
                                "__init__ are not allowed")  # fmt: skip
        elif isinstance(node, ast.ClassDef):
            for base in node.bases:
                if module.resolve(base) not in ("torch.nn.Module", "object"):
                    yield GateRejection("forbidden", f"line {node.lineno}: class {node.name} derives from "
                                        f"{ast.unparse(base)}; classes may only derive from nn.Module")  # fmt: skip
            if node.keywords:
                yield GateRejection("forbidden", f"line {node.lineno}: class {node.name} takes keywords (a metaclass?)")


def _monkey_patching(module: _Module) -> Iterator[GateRejection]:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            for target in targets:
                for sub in ast.walk(target):
                    if isinstance(sub, ast.Attribute | ast.Subscript) and module.is_imported(sub.value):
                        yield GateRejection("forbidden", f"line {node.lineno}: assigns into {module.resolve(sub.value)} "
                                            "(monkey-patching is not allowed)")  # fmt: skip


def _kernel_calls(module: _Module) -> Iterator[GateRejection]:
    """A kernel may call tl.* and other @triton.jit functions, never plain Python (which the interpreter would run)."""
    plain = set(module.functions) - module.kernels
    for name in module.kernels:
        for node in ast.walk(module.functions[name]):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in plain:
                yield GateRejection("forbidden", f"line {node.lineno}: the kernel {name}() calls the Python function "
                                    f"{node.func.id}(); a kernel may only call tl.* and other @triton.jit functions")  # fmt: skip


def _torch_fallbacks(module: _Module, fn: ast.FunctionDef, nn_attrs: dict[str, str]) -> Iterator[GateRejection]:
    for node in ast.walk(fn):
        if isinstance(node, ast.Try) and node.handlers:
            yield GateRejection("forbidden", f"line {node.lineno}: try/except in {fn.name}() (fallbacks are not allowed)")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            yield GateRejection("forbidden", f"line {node.lineno}: computes with the @ operator instead of a Triton kernel")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            if module.is_imported(node.func):
                continue  # module functions: checked against the allow-list
            method = node.func.attr
            owner = _dotted(node.func.value)
            if owner == "self" and method in nn_attrs:
                yield GateRejection("forbidden", f"line {node.lineno}: calls the nn.{nn_attrs[method]} self.{method} "
                                    "instead of a Triton kernel (keep it for its parameters only)")  # fmt: skip
            elif method.rstrip("_") in COMPUTE_METHODS:
                yield GateRejection("forbidden", f"line {node.lineno}: computes with .{method}() instead of a Triton kernel")


def static_gate(source: str) -> GateRejection | None:
    """None if the candidate may run; otherwise the first reason it may not."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return GateRejection("syntax", f"line {exc.lineno}: {exc.msg}")
    except ValueError as exc:  # e.g. source with NUL bytes
        return GateRejection("syntax", str(exc))
    module = _Module(tree)
    for check in (_names_and_attributes, _imports, _definitions, _monkey_patching, _kernel_calls):
        for rejection in check(module):
            return rejection
    if module.model_new is None:
        return GateRejection("no_model", "the candidate does not define class ModelNew")
    if "forward" not in module.methods:
        return GateRejection("no_model", "ModelNew does not define forward()")
    if not module.kernels:
        return GateRejection("no_kernel", "no @triton.jit kernel is defined")
    reachable = module.reachable_from_forward()
    if not any(_launches(fn, module.kernels) for fn in reachable):
        return GateRejection("no_kernel", "ModelNew.forward never launches a @triton.jit kernel (kernel[grid](...))")
    nn_attrs = module.nn_module_attributes()
    for fn in reachable:
        for rejection in _torch_fallbacks(module, fn, nn_attrs):
            return rejection
    return None
