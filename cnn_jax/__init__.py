from cnn_jax.cache import use_compilation_cache
from cnn_jax.cpu_kernels import prefer_eigen_convolutions

prefer_eigen_convolutions()  # before JAX starts: see cnn_jax/cpu_kernels.py
use_compilation_cache()      # compiled once per machine: see cnn_jax/cache.py
