"""The serving core: LLMEngine/AsyncEngine, scheduler, paged KV cache, runner, sampler, outputs."""
