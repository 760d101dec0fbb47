"""The benchmarks behind `python -m dwjax.bench` and the PyTorch yardstick."""
