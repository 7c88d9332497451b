"""GPU (Triton) input-sparse ternary GEMV: ternary weights in the transposed layout T1 with
activation sparsity. See triton.py; the CPU kernel is rarefy.kernels.ternary_sparse_cpu."""
