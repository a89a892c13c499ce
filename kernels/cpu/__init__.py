"""llamatron's CPU kernels: C (csrc/) built once per machine, called through ctypes.

- pack.py: GGUF blocks -> planes of unsigned quants with a scale and an offset per group.
- csrc/qgemm.c: matmul on int8-quantized activations (AVX-512 VNNI where present).
- csrc/attention.c: paged attention over the KV cache in place (prefill, decode, mixed).
- csrc/elementwise.c: RMSNorm (+residual), RoPE, KV store, gated activations.
- csrc/pool.c: the thread pool all of them run on.
- ops.py: CpuOps, the `Ops` backend built on them; build.py: compiling and loading.
"""
