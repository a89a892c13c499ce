"""Developer scripts (benchmarks, GPU check helpers, scripts/loadtest.py: the entry point of
llamatron_tools/loadtest.py). Library code never imports them (tests/test_layering.py)."""
