"""Lowering Pallas kernels through Triton on a CPU-only machine: jit(...).lower for CUDA on an
abstract H200 runs the kernels' Triton lowering (compiling needs a GPU), and parsing each
kernel's module back runs MLIR's verifier, which XLA would otherwise run only on a GPU."""

from __future__ import annotations

import jax
from jax.sharding import AbstractDevice, AbstractMesh


def lower_for_gpu(fn, *args):
    """jax.jit(fn).lower(*args) for CUDA on an abstract H200."""
    mesh = AbstractMesh((1,), ("x",), abstract_device=AbstractDevice(
        device_kind="NVIDIA H200", num_cores=132, platform="gpu"))
    with jax.sharding.use_abstract_mesh(mesh):
        return jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",))


def triton_modules(lowered) -> list[str]:
    """The Triton IR (generic op form) of each Pallas kernel in a lowered computation: the
    bytecode that the custom call carries in its backend config, parsed back (and so verified)
    with the Triton dialect that jax's lowering registers."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering as triton_lowering

    modules = []

    def visit(op):
        for region in op.regions:
            for block in region.blocks:
                for child in block.operations:
                    if child.operation.name == "stablehlo.custom_call":
                        config = ir.DictAttr(child.operation.attributes["mhlo.backend_config"])
                        bytecode = ir.StringAttr(config["ir"]).value_bytes
                        with triton_lowering._new_ir_context():
                            module = ir.Module.parse(bytecode)
                            modules.append(module.operation.get_asm(print_generic_op_form=True))
                    visit(child.operation)

    visit(lowered.compiler_ir("stablehlo").operation)
    return modules
