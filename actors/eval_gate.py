"""Static gate: reject a candidate before it runs, with the ``error_kind`` the rejection deserves.

A candidate passes only if it parses, defines ``ModelNew`` and a ``@triton.jit`` kernel that code reachable
from ``ModelNew.forward`` launches, and, in that reachable code, neither computes with PyTorch ops, calls the
reference ``Model``, falls back in ``try/except``, monkey-patches modules, nor reaches for threads,
processes, native code, the network or ``exec``. The gate is a first line; the worker's sandbox is the
second (a dynamic trick that slips past here still runs only in the isolated worker).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator

import msgspec


class GateRejection(msgspec.Struct, frozen=True):
    error_kind: str
    message: str


FORBIDDEN_MODULES = frozenset(
    {
        "threading", "_thread", "multiprocessing", "concurrent", "subprocess", "asyncio", "signal",
        "ctypes", "cffi", "socket", "ssl", "http", "urllib", "requests", "pickle", "marshal", "shutil",
        "importlib", "inspect", "gc", "sys", "builtins",
    }
)  # fmt: skip
FORBIDDEN_BUILTINS = frozenset(
    {"exec", "eval", "compile", "__import__", "open", "breakpoint", "globals", "setattr", "delattr", "input"}
)
FORBIDDEN_OS = frozenset(
    {
        "system", "popen", "fork", "forkpty", "kill", "killpg", "_exit", "abort", "posix_spawn",
        "posix_spawnp", "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
        "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe",
        "remove", "unlink", "rmdir", "removedirs", "rename", "replace", "chmod", "chown", "putenv",
    }
)  # fmt: skip
PATCHABLE_ROOTS = frozenset({"torch", "triton", "time", "os", "math", "numpy", "random"})
# torch functions that allocate or describe tensors; every other torch.* call computes.
ALLOWED_TORCH = frozenset(
    {
        "empty", "empty_like", "zeros", "zeros_like", "ones", "ones_like", "full", "full_like",
        "empty_strided", "arange", "tensor", "as_tensor", "Size", "device", "dtype", "finfo", "iinfo",
        "is_tensor", "no_grad", "inference_mode", "get_default_dtype", "promote_types", "result_type",
        "float32", "float16", "bfloat16", "float64", "int32", "int64", "int8", "uint8", "bool",
        "cuda.current_device", "cuda.current_stream", "cuda.device", "cuda.is_available", "cuda.get_device_capability",
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
NN_COMPUTE_MODULES = frozenset(
    {
        "Linear", "Bilinear", "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d",
        "ConvTranspose3d", "LayerNorm", "GroupNorm", "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
        "InstanceNorm1d", "InstanceNorm2d", "RMSNorm", "MultiheadAttention", "Softmax", "LogSoftmax", "ReLU",
        "GELU", "SiLU", "Sigmoid", "Tanh", "LeakyReLU", "Dropout", "Embedding", "MaxPool1d", "MaxPool2d",
        "AvgPool1d", "AvgPool2d", "LSTM", "GRU", "RNN", "Transformer", "TransformerEncoderLayer", "Sequential",
    }
)  # fmt: skip


def _dotted(node: ast.expr) -> str | None:
    parts: list[str] = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
        return ".".join(reversed(parts))
    return None


class _Module:
    """What the gate needs to know about the candidate module."""

    def __init__(self, tree: ast.Module) -> None:
        self.tree = tree
        self.aliases: dict[str, str] = {}
        self.functions: dict[str, ast.FunctionDef] = {}
        self.kernels: set[str] = set()
        self.model_new: ast.ClassDef | None = None
        self.methods: dict[str, ast.FunctionDef] = {}
        for node in tree.body:
            if isinstance(node, ast.FunctionDef):
                self.functions[node.name] = node
                if any(self._is_triton_decorator(d) for d in node.decorator_list):
                    self.kernels.add(node.name)
            elif isinstance(node, ast.ClassDef) and node.name == "ModelNew":
                self.model_new = node
                self.methods = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    self.aliases[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
            elif isinstance(node, ast.ImportFrom) and node.module:
                for a in node.names:
                    self.aliases[a.asname or a.name] = f"{node.module}.{a.name}"

    def resolve(self, node: ast.expr) -> str | None:
        """The full dotted name of an expression, through import aliases (``F.relu`` → ``torch.nn.functional.relu``)."""
        dotted = _dotted(node)
        if dotted is None:
            return None
        root, _, rest = dotted.partition(".")
        full = self.aliases.get(root, root)
        return f"{full}.{rest}" if rest else full

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


def _forbidden_everywhere(module: _Module) -> Iterator[GateRejection]:
    for node in ast.walk(module.tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            for name in names:
                if name.split(".")[0] in FORBIDDEN_MODULES:
                    yield GateRejection("forbidden", f"line {node.lineno}: imports {name}; threads, processes, "
                                        "native code, the network and introspection are not allowed")  # fmt: skip
        elif isinstance(node, ast.Call):
            if isinstance(node.func, ast.Name) and node.func.id in FORBIDDEN_BUILTINS:
                yield GateRejection("forbidden", f"line {node.lineno}: calls {node.func.id}()")
            name = module.resolve(node.func) or ""
            if name.startswith("os.") and name.split(".")[-1] in FORBIDDEN_OS:
                yield GateRejection("forbidden", f"line {node.lineno}: calls {name}()")
        elif isinstance(node, ast.Assign | ast.AugAssign | ast.AnnAssign | ast.Delete):
            targets = node.targets if isinstance(node, ast.Assign | ast.Delete) else [node.target]
            for target in targets:
                if isinstance(target, ast.Attribute):
                    name = module.resolve(target) or ""
                    if name.split(".")[0] in PATCHABLE_ROOTS:
                        yield GateRejection("forbidden", f"line {node.lineno}: monkey-patches {name}")
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load) and node.id == "Model":
            yield GateRejection("forbidden", f"line {node.lineno}: refers to the reference Model")
        elif isinstance(node, ast.Attribute) and node.attr in ("Model", "get_inputs", "get_init_inputs"):
            yield GateRejection("forbidden", f"line {node.lineno}: refers to the reference program ({node.attr})")


def _torch_fallbacks(module: _Module, fn: ast.FunctionDef, nn_attrs: dict[str, str]) -> Iterator[GateRejection]:
    for node in ast.walk(fn):
        if isinstance(node, ast.Try) and node.handlers:
            yield GateRejection("forbidden", f"line {node.lineno}: try/except in {fn.name}() (fallbacks are not allowed)")
        elif isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            yield GateRejection("forbidden", f"line {node.lineno}: computes with the @ operator instead of a Triton kernel")
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = module.resolve(node.func) or ""
            if name.startswith("torch."):
                short = name.removeprefix("torch.")
                if short not in ALLOWED_TORCH and not short.startswith(("cuda.Stream", "testing")):
                    yield GateRejection("forbidden", f"line {node.lineno}: computes with {name} instead of a Triton kernel")
                continue
            if name.startswith(("triton.", "math.")):
                continue
            method = node.func.attr
            owner = _dotted(node.func.value)
            if owner == "self" and method in nn_attrs:
                yield GateRejection("forbidden", f"line {node.lineno}: calls the nn.{nn_attrs[method]} self.{method} "
                                    "instead of a Triton kernel")  # fmt: skip
            elif method.rstrip("_") in COMPUTE_METHODS:
                yield GateRejection("forbidden", f"line {node.lineno}: computes with .{method}() instead of a Triton kernel")


def static_gate(source: str) -> GateRejection | None:
    """None if the candidate may run; otherwise the first reason it may not."""
    try:
        tree = ast.parse(source)
    except SyntaxError as exc:
        return GateRejection("syntax", f"line {exc.lineno}: {exc.msg}")
    module = _Module(tree)
    for rejection in _forbidden_everywhere(module):
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
