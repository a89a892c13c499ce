"""llamatron HTTP API (OpenAI protocol + llama-server extras). Never touches tensors."""
