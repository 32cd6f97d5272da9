"""Compiles the Triton kernels to cubins for real GPUs, with no GPU present.

Run as a script with TRITON_INTERPRET unset (tests/test_triton_compile.py does): prints one
JSON line per kernel variant. The interpreter runs Python semantics and would not catch an
error in the GPU lowering (types of loop-carried values, unsupported ops); this does.
"""

import json
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fastkd.divergences import DIVERGENCES
from fastkd.triton import kd_kernels, kd_onchip, kd_split, launch

# The type of every runtime argument of the kernels, by name: bf16 student and gradient,
# fp16 teacher (two dtypes, so that no load assumes one), int64 labels.
ARG_TYPES = {
    "s_ptr": "*bf16", "s_row_stride": "i64", "t_ptr": "*fp16", "t_row_stride": "i64",
    "labels_ptr": "*i64", "grad_ptr": "*bf16", "grad_row_stride": "i64",
    "kd_per_row_ptr": "*fp32", "ce_per_row_ptr": "*fp32", "reduction_factor_ptr": "*fp32",
    "stats_ptr": "*fp32", "terms_ptr": "*fp32", "K": "i32", "chunk": "i32",
    "V": "i32",
    "inv_t": "fp32", "softcap": "fp32", "w": "fp32", "one_minus_w": "fp32", "log_w": "fp32",
    "log_1mw": "fp32",
    "kd_grad_coef": "fp32", "ce_weight": "fp32", "ignore_index": "i32",
    "offset": "i64",
    "grad_output_ptr": "*fp32", "grad_output_row_stride": "i64",
}  # fmt: skip


def compile_kernel(fn, constexprs, capability, num_warps, arg_types=ARG_TYPES):
    """Size of fn's cubin for ``capability``, its constexpr parameters set as given and its
    runtime arguments typed by ``arg_types`` (by name)."""
    signature = {
        name: "constexpr" if name in constexprs else arg_types[name] for name in fn.arg_names
    }
    src = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(fn.arg_names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps}
    )
    return len(compiled.asm["cubin"])


def launch_kernels(kernel: str, div, full: bool, block: int):
    """(name, jit function, constexprs) of each kernel that a launch of ``kernel`` (a
    fastkd/triton/launch.py name) runs; ``full``: CE, soft-cap and the gradient on."""
    flags = dict(
        DIV=div.name, ONE_PASS_LOSS=div.one_pass_loss, HAS_LABELS=full, HAS_CE=full,
        SOFTCAP=full, COMPUTE_GRAD=full, BLOCK=block,
    )  # fmt: skip
    if kernel == launch.MULTI_PASS:
        return [(kernel, kd_kernels.kd_row_kernel, flags)]
    if kernel == launch.ON_CHIP:
        return [(kernel, kd_onchip.kd_row_onchip_kernel, flags)]
    chunks = dict(flags, KP=2)
    stats = {k: v for k, v in flags.items() if k in kd_split.kd_split_stats_kernel.arg_names}
    terms = {k: v for k, v in chunks.items() if k in kd_split.kd_split_terms_kernel.arg_names}
    kernels = [("split_stats", kd_split.kd_split_stats_kernel, stats)]
    if not div.one_pass_loss:
        kernels.append(("split_terms", kd_split.kd_split_terms_kernel, terms))
    return [*kernels, ("split_finish", kd_split.kd_split_finish_kernel, chunks)]


def main(capability: int) -> None:
    for div in DIVERGENCES.values():
        # the long rows' kernels, and the longest row on chip
        for kernel, block, num_warps, _ in (
            launch.row_launch(128256, div.name),
            launch.row_launch(launch.ON_CHIP_MAX_V, div.name),
            launch.RowLaunch(launch.SPLIT, *launch.row_launch(128256, div.name)[1:3], 2),
        ):
            for full in (True, False):
                for name, fn, constexprs in launch_kernels(kernel, div, full, block):
                    size = compile_kernel(fn, constexprs, capability, num_warps)
                    print(json.dumps({"kernel": name, "divergence": div.name, "full": full,
                                      "cubin_bytes": size}))  # fmt: skip
    size = compile_kernel(kd_kernels.scale_rows_kernel, {"BLOCK": kd_kernels.SCALE_BLOCK},
                          capability, kd_kernels.SCALE_WARPS)  # fmt: skip
    print(json.dumps({"kernel": "scale_rows_kernel", "cubin_bytes": size}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
