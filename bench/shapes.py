"""The one shape registry of the benchmarks: (batch, in, out) and sparsities.

ANCHOR_SHAPES are the shapes of ../shared/ANCHORS.md, where SparseProp was measured.
"""

ANCHOR_SHAPES = [
    (64, 1024, 1024),
    (256, 1024, 1024),
    (64, 4096, 4096),
    (256, 4096, 4096),
    (128, 512, 256),
]
SPARSITIES = [0.9, 0.95]
# decode-style forward: one token
DECODE_SHAPES = [(1, 4096, 4096)]
DECODE_SPARSITIES = [0.9]


def shape_id(batch: int, in_f: int, out_f: int, sparsity: float) -> str:
    return f"B{batch}-in{in_f}-out{out_f}-sp{sparsity}"

# N:M (bench_nm.py): the training shape, a smaller one, a small-batch one (fine-tuning at batch 16,
# where the input gradient's gather of Wᵀ's values weighs most), and a decode forward at an MLP width
NM_SHAPES = [(256, 4096, 4096), (64, 1024, 1024), (16, 4096, 4096)]
NM_PATTERNS = ["2:4", "1:4", "2:8", "2:4T"]
NM_DECODE_SHAPES = [(1, 4096, 11008)]

# block-sparse / butterfly / monarch (bench_block.py): the training shape and a smaller one
BLOCK_SHAPES = [(256, 4096, 4096), (64, 1024, 1024)]
BLOCK_CASES = ["bsr90", "butterfly", "pixelfly", "monarch4"]

# activation sparsity (bench_act.py): decode GEMV of a Llama MLP (batch 1, and 8 tokens whose active
# sets are unioned), and the second layer of a ReLU MLP in training: the row (B=256, 90% zeros after
# the ReLU), and the rows where the dense fallback takes over (50% zeros; B=1024 at 50 and 70%)
ACT_DECODE_SHAPES = [(1, 4096, 11008), (1, 11008, 4096)]
ACT_DECODE_SPARSITIES = [0.5, 0.7, 0.9]
ACT_UNION_SHAPES = [(8, 4096, 11008), (8, 11008, 4096)]
ACT_TRAIN_CASES = [(256, 16384, 4096, 0.9), (256, 16384, 4096, 0.5), (1024, 4096, 4096, 0.9),
                   (1024, 4096, 4096, 0.7), (1024, 4096, 4096, 0.5)]
