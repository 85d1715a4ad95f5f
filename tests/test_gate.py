"""The static gate on its own: indirections that reach a forbidden name are rejected, harmless forms pass.

Pure ``static_gate`` calls, no processes. Every forbidden case is a complete, plausible candidate (a real
``@triton.jit`` kernel launched from ``forward``) with one trick in it, so the only thing the gate can
object to is the trick, and the message must name it: it is fed back to the policy.
"""

from __future__ import annotations

import re
import textwrap
from pathlib import Path

import pytest

from kernelrl.actors.eval_gate import static_gate
from kernelrl.core.problems import Problem, builtin_problems

CANDIDATES = Path(__file__).parent / "candidates"

TEMPLATE = """{prelude}import torch
import torch.nn as nn
import triton
import triton.language as tl
{imports}
{module}

@triton.jit
def relu_kernel(x_ptr, out_ptr, n_elements, BLOCK_SIZE: tl.constexpr):
    offsets = tl.program_id(0) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offsets < n_elements
    x = tl.load(x_ptr + offsets, mask=mask, other=0.0)
    tl.store(out_ptr + offsets, {kernel_value}, mask=mask)


class ModelNew(nn.Module):
{class_body}
    def __init__(self):
        super().__init__()
{init}

    def forward(self, x{forward_params}):
        out = torch.empty_like(x)
        relu_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK_SIZE=1024)
{body}
        return out
"""


def candidate(
    *,
    prelude: str = "",
    imports: str = "",
    module: str = "",
    class_body: str = "",
    init: str = "pass",
    forward_params: str = "",
    body: str = "pass",
    kernel_value: str = "tl.maximum(x, 0.0)",
) -> str:
    """A complete ReLU candidate with the given pieces spliced in (multi-line pieces are indented for you)."""
    return TEMPLATE.format(
        prelude=prelude + "\n" if prelude else "",
        imports=imports,
        module=module,
        class_body=textwrap.indent(textwrap.dedent(class_body), "    ") + "\n" if class_body else "",
        init=textwrap.indent(textwrap.dedent(init), " " * 8),
        forward_params=forward_params,
        body=textwrap.indent(textwrap.dedent(body), " " * 8),
        kernel_value=kernel_value,
    )


# (id, candidate pieces, what the rejection message must name)
INDIRECTIONS: list[tuple[str, dict[str, str], str]] = [
    ("module_level_alias", {"module": "_act = torch.relu", "body": "out = _act(x)"}, "torch.relu"),
    ("getattr_with_concatenated_name", {"body": 'out = getattr(torch, "re" + "lu")(x)'}, "getattr"),
    ("os_reached_through_torch", {"body": 'torch.os.system("true")'}, "torch.os"),
    ("os_environ_reached_through_torch", {"body": 'key = torch.os.environ.get("HOME")'}, "torch.os"),
    ("from_torch_import_relu", {"imports": "from torch import relu", "body": "out = relu(x)"}, "torch.relu"),
    ("from_torch_import_relu_as_alias", {"imports": "from torch import relu as fast", "body": "out = fast(x)"}, "torch.relu"),
    ("torch_module_as_value", {"body": "t = torch\nout = t.relu(x)"}, "module torch as a value"),
    (
        "torch_module_passed_as_argument",
        {"module": "def _call(m, v):\n    return m.relu(v)\n", "body": "out = _call(torch, x)"},
        "module torch as a value",
    ),
    ("import_torch_as_other_name", {"imports": "import torch as T", "body": "out = T.relu(x)"}, "torch.relu"),
    ("functional_alias_F", {"imports": "import torch.nn.functional as F", "body": "out = F.relu(x)"}, "torch.nn.functional.relu"),
    (
        "functional_from_import",
        {"imports": "from torch.nn import functional as F", "body": "out = F.relu(x)"},
        "torch.nn.functional.relu",
    ),
    ("functional_through_nn_alias", {"body": "out = nn.functional.relu(x)"}, "torch.nn.functional.relu"),
    ("torch_ops_aten", {"body": "out = torch.ops.aten.relu(x)"}, "torch.ops.aten.relu"),
    ("torch_ops_aten_default_overload", {"body": "out = torch.ops.aten.relu.default(x)"}, "torch.ops.aten.relu.default"),
    ("tensor_class_method_unbound", {"body": "out = torch.Tensor.relu(x)"}, "torch.Tensor.relu"),
    ("dunder_class_of_input", {"body": "out = x.__class__.relu(x)"}, "__class__"),
    ("dunder_dict_of_torch", {"body": 'out = torch.__dict__["relu"](x)'}, "__dict__"),
    ("vars_of_torch", {"body": 'out = vars(torch)["relu"](x)'}, "vars"),
    ("globals_lookup", {"body": 'out = globals()["torch"].relu(x)'}, "globals"),
    ("type_of_input", {"body": "out = type(x).relu(x)"}, "type"),
    ("dunder_import_builtin", {"body": '__import__("os").system("true")'}, "__import__"),
    ("dunder_builtins", {"body": '__builtins__["__import__"]("os")'}, "__builtins__"),
    ("eval_of_a_string", {"body": 'out = eval("torch.relu")(x)'}, "eval"),
    ("exec_of_a_string", {"body": 'exec("import os")'}, "exec"),
    ("tl_extra_module_from_spec", {"body": "spec = tl.extra.module_from_spec"}, "module_from_spec"),
    ("triton_language_extra_pkgutil", {"body": "walk = triton.language.extra.pkgutil.walk_packages"}, "pkgutil"),
    ("tl_core_module", {"body": "core = tl.core.builtin"}, "triton.language.core"),
    ("triton_runtime_driver", {"body": "driver = triton.runtime.driver"}, "triton.runtime"),
    ("triton_runtime_import", {"imports": "from triton.runtime import driver", "body": "d = driver"}, "triton.runtime"),
    ("triton_compiler", {"body": "c = triton.compiler.compile"}, "triton.compiler"),
    ("torch_private_C", {"body": "torch._C.set_grad_enabled(False)"}, "._C"),
    (
        "torch_private_through_alias",
        {"imports": "import torch.nn.functional as F", "body": "F._no_grad_fill_(out, 0.0)"},
        "_no_grad_fill_",
    ),
    ("dict_of_torch_functions", {"module": '_table = {"f": torch.relu}', "body": 'out = _table["f"](x)'}, "torch.relu"),
    ("list_of_torch_functions", {"module": "_ops = [torch.relu, torch.abs]", "body": "out = _ops[0](x)"}, "torch.relu"),
    ("lambda_wrapping_torch", {"module": "_f = lambda t: torch.relu(t)", "body": "out = _f(x)"}, "torch.relu"),
    ("lambda_in_init", {"init": "self.act = lambda t: torch.clamp(t, min=0)", "body": "out = self.act(x)"}, "torch.clamp"),
    ("default_argument", {"forward_params": ", act=torch.relu", "body": "out = act(x)"}, "torch.relu"),
    ("class_attribute", {"class_body": "act = torch.relu", "body": "out = self.act(x)"}, "torch.relu"),
    ("nn_module_called_inline", {"body": "out = nn.ReLU()(x)"}, "torch.nn.ReLU"),
    ("nn_module_held_in_self", {"init": "self.act = nn.ReLU()", "body": "out = self.act(x)"}, "torch.nn.ReLU"),
    ("tensor_compute_method", {"body": "out = x.relu()"}, ".relu()"),
    ("tensor_inplace_compute_method", {"body": "out = x.clone().relu_()"}, ".relu_()"),
    ("monkey_patching_torch", {"module": "torch.cuda.synchronize = lambda *a: None"}, "monkey-patching"),
    ("monkey_patching_an_allowed_torch_name", {"module": "torch.empty_like = torch.zeros_like"}, "monkey-patching"),
    ("monkey_patching_triton_language", {"module": "tl.maximum = tl.minimum"}, "monkey-patching"),
    ("import_os", {"imports": "import os", "body": 'os.system("true")'}, "os"),
    ("from_os_import", {"imports": "from os import system", "body": 'system("true")'}, "os"),
    ("import_numpy", {"imports": "import numpy", "body": "out = torch.as_tensor(numpy.maximum(x, 0))"}, "numpy"),
    ("import_numpy_as_np", {"imports": "import numpy as np", "body": "out = torch.as_tensor(np.maximum(x, 0))"}, "numpy"),
    ("import_torch_submodule", {"imports": "import torch.utils", "body": "u = torch.utils"}, "torch.utils"),
    ("relative_import", {"imports": "from . import helpers"}, "relative import"),
    ("star_import", {"imports": "from torch import *", "body": "out = relu(x)"}, "import *"),
    ("reference_model", {"body": "out = Model()(x)"}, "Model"),
    ("reference_get_inputs", {"body": "extra = get_inputs()"}, "get_inputs"),
    ("try_except_fallback", {"body": "try:\n    pass\nexcept Exception:\n    out = x * (x > 0)"}, "try/except"),
    ("matmul_operator", {"body": "out = out @ torch.ones(x.shape[1], x.shape[1])"}, "@"),
    # the allow-list of nn.init must not re-export what nn.init itself imports
    ("nn_init_reexports_torch", {"body": "out = torch.nn.init.torch.relu(x)"}, "torch.nn.init.torch"),
    (
        "nn_init_reexports_torch_via_import",
        {"imports": "from torch.nn import init", "body": "out = init.torch.relu(x)"},
        "torch.nn.init.torch",
    ),
    ("nn_init_reexports_os", {"body": 'torch.nn.init.torch.os.system("true")'}, "torch.nn.init.torch"),
    ("nn_init_reexports_tensor", {"body": "out = torch.nn.init.Tensor.relu(x)"}, "torch.nn.init.Tensor"),
    (
        "nn_init_reexports_sys_modules",
        {"module": 'pipeline = torch.nn.init.torch.sys.modules.get("kernelrl.actors.eval_pipeline")'},
        "torch.nn.init.torch",
    ),
    # Python-callback element-wise methods: the gate lists them, but matches names with the trailing _ stripped
    ("tensor_apply_inplace", {"body": "out.copy_(x)\nout.apply_(lambda v: v if v > 0 else 0.0)"}, "apply_"),
    ("tensor_map_inplace", {"body": "out.copy_(x)\nout.map_(x, lambda a, b: a if a > 0 else 0.0)"}, "map_"),
]


@pytest.mark.parametrize(("pieces", "names"), [(p, n) for _, p, n in INDIRECTIONS], ids=[i for i, _, _ in INDIRECTIONS])
def test_an_indirection_to_a_forbidden_name_is_rejected_and_named(pieces: dict[str, str], names: str) -> None:
    source = candidate(**pieces)
    rejection = static_gate(source)
    assert rejection is not None, f"the gate let this through:\n{source}"
    assert rejection.error_kind == "forbidden", rejection
    assert names in rejection.message, rejection.message
    assert re.match(r"line \d+: ", rejection.message), "the message must point at a line"


def test_the_template_itself_passes_the_gate() -> None:
    assert static_gate(candidate()) is None


@pytest.mark.parametrize("problem", builtin_problems().problems, ids=lambda p: p.id)
def test_every_builtin_solution_passes_the_gate(problem: Problem) -> None:
    assert problem.solution is not None
    assert static_gate(problem.solution) is None


HARMLESS: list[tuple[str, dict[str, str]]] = [
    ("typing_optional", {"imports": "from typing import Optional", "forward_params": ": Optional[torch.Tensor] = None"}),
    ("typing_names", {"imports": "from typing import List, Tuple", "module": "SHAPE: Tuple[int, int] = (1, 2)"}),
    ("future_annotations", {"prelude": "from __future__ import annotations"}),
    ("super_init", {}),
    ("empty_like", {"body": "tmp = torch.empty_like(x)"}),
    ("zeros_and_full", {"body": "z = torch.zeros(4, device=x.device, dtype=x.dtype)\nf = torch.full((2,), 1.0)"}),
    (
        "triton_cdiv_and_next_power_of_2",
        {"body": "grid = (triton.cdiv(x.numel(), 128),)\nb = triton.next_power_of_2(x.shape[-1])"},
    ),
    ("tl_math_erf", {"kernel_value": "tl.maximum(x, 0.0) + 0.0 * tl.math.erf(x)"}),
    ("tl_extra_libdevice", {"kernel_value": "tl.extra.libdevice.fmax(x, 0.0)"}),
    ("input_stride_and_shape", {"body": "s = x.stride(0)\nn, d = x.shape\nc = x.is_contiguous()"}),
    ("private_attribute_on_self", {"init": "self._block = 128", "body": "b = self._block"}),
    ("contiguous_view_reshape", {"body": "y = x.contiguous().view(-1).reshape(x.shape)"}),
    ("dtype_and_device_queries", {"body": "dt = x.dtype\ndev = x.device\nok = dt == torch.float32"}),
    ("math_module", {"imports": "import math", "body": "scale = 1.0 / math.sqrt(x.shape[-1])"}),
    ("nn_parameter", {"init": "self.w = nn.Parameter(torch.ones(4))"}),
    ("nn_init_function", {"init": "self.w = nn.Parameter(torch.empty(4, 4))\nnn.init.kaiming_uniform_(self.w, a=5 ** 0.5)"}),
    ("no_grad_decorator", {"module": "@torch.no_grad()\ndef _helper(t):\n    return t.numel()\n", "body": "n = _helper(x)"}),
    ("triton_config_object", {"body": "cfg = triton.Config({'BLOCK_SIZE': 128}, num_warps=4)"}),
]


@pytest.mark.parametrize("pieces", [p for _, p in HARMLESS], ids=[i for i, _ in HARMLESS])
def test_a_harmless_form_passes_the_gate(pieces: dict[str, str]) -> None:
    source = candidate(**pieces)
    compile(source, "candidate.py", "exec")  # the template splices valid Python
    assert static_gate(source) is None, static_gate(source)


def test_an_unknown_module_is_an_import_error_not_forbidden() -> None:
    rejection = static_gate(candidate(imports="import not_a_real_module_xyz"))
    assert rejection is not None and rejection.error_kind == "import"
    assert "not_a_real_module_xyz" in rejection.message


def test_an_unknown_module_in_from_import_is_an_import_error() -> None:
    rejection = static_gate(candidate(imports="from not_a_real_module_xyz import fast_relu"))
    assert rejection is not None and rejection.error_kind == "import"
    assert "not_a_real_module_xyz" in rejection.message


def _decoy_candidates() -> list[Path]:
    return sorted(CANDIDATES.glob("decoy_launch_*.py"))


@pytest.mark.parametrize("path", _decoy_candidates(), ids=lambda p: p.stem)
def test_operator_only_decoys_pass_the_gate_so_the_dispatch_check_must_catch_them(path: Path) -> None:
    """The decoy candidates compute with operators (invisible to the gate): they exercise the runner's check."""
    source = path.read_text()
    assert "# beneath-gate: forbidden" in source
    assert static_gate(source) is None, static_gate(source)
