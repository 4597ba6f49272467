from cnn_jax.cpu_kernels import prefer_eigen_convolutions

prefer_eigen_convolutions()  # before JAX starts: see cnn_jax/cpu_kernels.py
