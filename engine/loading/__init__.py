"""Model loading: GGUF reading, the model registry (PyPI packages -> verified files), the loader."""
