"""Low-bit weights: ternary (BitNet b1.58) and weight-only int8.

- `rarefy.lowbit.ternary`: absmean ternary quantization and the 2-bit packed layout.
- `rarefy.lowbit.int8`: symmetric int8 per output channel or per group.
- `rarefy.lowbit.checkpoint`: safetensors checkpoints of such models (+ metadata).
- `rarefy.lowbit.bitnet_import`: checkpoints in BitNet's published packed format.
- `rarefy.layers.lowbit_linear`: TernaryLinear / Int8Linear (reference forward).

Layouts and metadata: docs/lowbit-formats.md.
"""
