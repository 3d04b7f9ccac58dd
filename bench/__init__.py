"""minilm's benchmarks (imported as ``minilm.bench``): run them with ``minilm bench``."""
