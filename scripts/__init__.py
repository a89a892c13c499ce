"""Developer scripts (load generator, GPU check helpers). A package so `scripts.loadtest` imports."""
