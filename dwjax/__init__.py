"""dwjax: find, name and count the patterns of trained depthwise-convolution kernels (JAX/Flax)."""
__version__ = "0.1.0"
