"""The benchmarks behind `python -m dwjax.bench`, their table and BENCHMARKS.md section, and the
PyTorch yardstick."""
