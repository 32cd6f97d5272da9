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
from fastkd.triton import kd_kernels, kd_onchip, launch

ROW_KERNEL_ARGS = {
    "s_ptr": "*bf16", "s_row_stride": "i64", "t_ptr": "*fp16", "t_row_stride": "i64",
    "labels_ptr": "*i64", "grad_ptr": "*bf16", "grad_row_stride": "i64",
    "kd_per_row_ptr": "*fp32", "ce_per_row_ptr": "*fp32", "reduction_factor_ptr": "*fp32",
    "V": "i32",
    "inv_t": "fp32", "softcap": "fp32", "w": "fp32", "one_minus_w": "fp32", "log_w": "fp32",
    "log_1mw": "fp32",
    "kd_grad_coef": "fp32", "ce_weight": "fp32", "ignore_index": "i32",
}  # fmt: skip
ROW_KERNELS = {
    launch.MULTI_PASS: kd_kernels.kd_row_kernel,
    launch.ON_CHIP: kd_onchip.kd_row_onchip_kernel,
}
SCALE_KERNEL_ARGS = {
    "grad_ptr": "*bf16", "grad_row_stride": "i64", "grad_output_ptr": "*fp32",
    "grad_output_row_stride": "i64", "V": "i32",
}  # fmt: skip


def compile_kernel(fn, args, constexprs, capability, num_warps):
    signature = dict(args, **{name: "constexpr" for name in constexprs})
    names = list(signature)
    src = ASTSource(
        fn=fn,
        signature=signature,
        constexprs={(names.index(k),): v for k, v in constexprs.items()},
    )
    compiled = triton.compile(
        src, target=GPUTarget("cuda", capability, 32), options={"num_warps": num_warps}
    )
    return len(compiled.asm["cubin"])


def main(capability: int) -> None:
    for div in DIVERGENCES.values():
        # a long row and the longest on chip
        for V in (128256, launch.ON_CHIP_MAX_V):
            kernel, block, num_warps = launch.row_launch(V, div.name)
            for full in (True, False):
                constexprs = dict(
                    DIV=div.name, ONE_PASS_LOSS=div.one_pass_loss, HAS_LABELS=full,
                    HAS_CE=full, SOFTCAP=full, COMPUTE_GRAD=full, BLOCK=block,
                )  # fmt: skip
                size = compile_kernel(
                    ROW_KERNELS[kernel], ROW_KERNEL_ARGS, constexprs, capability, num_warps
                )
                print(json.dumps({"kernel": kernel, "divergence": div.name, "full": full,
                                  "cubin_bytes": size}))  # fmt: skip
    size = compile_kernel(kd_kernels.scale_rows_kernel, SCALE_KERNEL_ARGS,
                          {"BLOCK": kd_kernels.SCALE_BLOCK}, capability,
                          kd_kernels.SCALE_WARPS)  # fmt: skip
    print(json.dumps({"kernel": "scale_rows_kernel", "cubin_bytes": size}))


if __name__ == "__main__":
    main(int(sys.argv[1]))
