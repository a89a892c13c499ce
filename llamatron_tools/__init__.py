"""Client-side tools that ship with llamatron and talk to a server only over HTTP (the load generator).

Its own layer beside api/: the CLI (api/cli.py) may import it, and it imports none of api/, engine/
or kernels/ (tests/test_layering.py), so it measures llamatron, llama-server or vLLM alike.
"""
