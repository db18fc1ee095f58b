"""Step 01: the released DeepSeek V4 checkpoint, read and dequantized exactly.

`format` (tensor table from config.json, the native name grammar), `shards` (safetensors headers,
byte ranges, atomic shard writes, `Checkpoint`), `dequant` (the exact formulas), `convert` (plan,
validate, convert shard by shard), `resume` (the resumable sharded-write engine steps 01 and 03
share), `tiny` (tiny checkpoints in the released format).
"""
