"""Backend registration. Each submodule registers its kernels and an availability check with the dispatcher;
a backend whose extension or package is missing stays registered as unavailable, with the reason."""

from . import cpp, cuda, triton  # noqa: F401
