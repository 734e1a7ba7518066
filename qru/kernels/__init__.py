"""Compute kernels. One op per file: Triton kernels, launcher, autograd Function and
pure-torch reference side by side. Kernels are leaves: nothing here imports
qru.model, qru.train, qru.quant or qru.eval."""
