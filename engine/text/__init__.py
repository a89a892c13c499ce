"""Text: the GGUF tokenizer and chat templates (rendered in a resource-bounded jinja sandbox)."""
