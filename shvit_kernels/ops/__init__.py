"""Op families, one module each: the op's reference (its spec), custom-op definitions, fakes and autograd.

The public functions are re-exported by ``shvit_kernels``; the modules keep their names here.
"""
