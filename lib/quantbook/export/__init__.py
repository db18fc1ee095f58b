"""Step 03: the export engines serve, built from what step 02 kept, and proven right.

`layout` (the v4-serving layout from the release plus calibrated amax, no model loaded: plan,
amax rules, configs, report), `nvfp4` (the expert weights' NVFP4 numbers: carried from the
release, or re-quantized as modelopt does), `writer` (one output shard at the disk's speed),
`engines` (what vLLM and SGLang build from an export's config), `recover` (export from a run's
snapshot or state, `--validate-only`), `verify` (the checklist and the numeric bound; `quantbook verify`).
"""
