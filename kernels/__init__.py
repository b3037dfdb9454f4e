"""Triton kernels. Each file: `_op_kernel` (Triton) + `op_triton()` + `op_reference()` (torch, also the CPU path)
+ `op()` dispatcher. Triton is imported lazily so the CPU install never needs it."""
