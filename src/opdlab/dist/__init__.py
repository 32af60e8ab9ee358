"""opdlab.dist: torchrun / FSDP2 glue only (runtime, fsdp, launch); see docs/scale-out.md.

The training code that runs under it (sharded checkpoints, the seeded sampler, the vLLM rollout
backend) lives in opdlab.distill.
"""
