"""Lower every variant of the student-loss kernels to Triton IR for sm_90, without a GPU.

Run by tests/test_student_loss_kernels.py in a child process without TRITON_INTERPRET (the
interpreter has no compiler front end). Exits non-zero with Triton's compile error on a failure.
"""
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton._C.libtriton import ir

from cdfast.kernels import student_loss as kernels

# (K, D): one block per row, a loop over blocks, no features, a loop with ragged blocks
SHAPES = [(100, 256), (1000, 2048), (10, 0), (5000, 33)]
TARGET = GPUTarget("cuda", 90, 32)


def lower(kernel, constants: dict) -> str:
    backend = make_backend(TARGET)
    constants = dict(constants)
    options = backend.parse_options({"num_warps": constants.pop("num_warps")})
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constants:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*i64" if name == "teacher_ptr" else "*fp32"
        else:
            # sizes and strides are Python ints (i32 at launch when they fit); the rest are float scalars
            signature[name] = "i32" if name in ("N", "B", "K", "D") or name.endswith("_stride") else "fp32"
    source = ASTSource(fn=kernel, signature=signature, constexprs={(names.index(k),): v for k, v in constants.items()})
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = source.make_ir(TARGET, options, backend.get_codegen_implementation(options), backend.get_module_map(),
                            context)
    return str(module)


def main() -> None:
    count = 0
    for k, d in SHAPES:
        config = kernels.launch_config(k, d)
        for per_student in (False, True):
            for has_feats in ((True, False) if d else (False,)):
                variants = [(kernels._forward_kernel, dict(config, SINGLE=k <= config["BLOCK_K"], HAS_FEATS=has_feats,
                                                           PER_STUDENT=per_student)),
                            (kernels._backward_kernel, dict(config, HAS_FEATS=has_feats, PER_STUDENT=per_student))]
                for kernel, constants in variants:
                    assert "tt.func" in lower(kernel, constants)
                    count += 1
    print(f"lowered {count} kernel variants")


if __name__ == "__main__":
    main()
