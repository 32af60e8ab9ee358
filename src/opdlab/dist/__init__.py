"""opdlab.dist: torchrun / FSDP2 glue (runtime, fsdp, checkpoint, sampling, launch, vllm_backend); see docs/scale-out.md."""
