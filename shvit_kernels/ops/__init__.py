"""Op families, one module each: the op's reference (its spec), custom-op definitions, fakes and autograd.

The public functions are re-exported by ``shvit_kernels``; the modules keep their names here.

Glossary (public function -> custom ops -> kernel per backend):

* public function: what users call, e.g. ``shvit_kernels.conv_bn``; checks its arguments (``check_*``),
  casts for autocast, folds eval-mode normalisation, and calls a custom op.
* custom op: ``torch.ops.shvit.<name>``, defined by ``_common.define_op`` from a schema, e.g.
  ``conv_bias_act``, ``conv_bn_train`` and their ``*_backward`` ops; opaque to autograd (the backward is itself
  a custom op) and to torch.compile (a fake gives shapes and layouts).
* reference: ``<op>_reference``, the pure-PyTorch kernel of an op, its spec; the reference backend.
* kernel: one backend's implementation of a custom op, taking the schema's arguments in order; the
  dispatcher (``shvit_kernels.dispatch``) picks one per call.
* backend: a named group of kernels (``reference``, ``cpp``, ``triton``, ``cuda``) registered with
  ``dispatch.register_backend``: availability, kernels, not_supported reasons and measured-slower reasons.

========================  ===============================================  =====================================
public function           custom ops                                       kernels besides the reference
========================  ===============================================  =====================================
conv_bias_act, conv_bn    conv_bias_act, conv_bn_train (+ ``_backward``)   cpp (csrc/cpu/conv_bias_act.cpp,
                                                                           conv_bn_train.cpp), triton
                                                                           (backends/triton/conv_bn.py), cuda
                                                                           (csrc/cuda/conv_bn_depthwise.cu)
ffn_fused, ffn            ffn_fused (+ ``_backward``); ffn trains through  cpp (csrc/cpu/ffn_fused.cpp), triton
                          conv_bn                                          (backends/triton/ffn.py)
shsa_fused, shsa          shsa_fused, shsa_train (+ ``_backward``)         cpp (csrc/cpu/shsa_fused.cpp,
                                                                           shsa_train.cpp), triton
                                                                           (backends/triton/shsa.py), cuda
                                                                           (csrc/cuda/shsa.cu)
patch_embed               patch_embed (+ ``_backward``)                    cpp (csrc/cpu/conv_bias_act.cpp,
                                                                           forward); CUDA runs the reference
squeeze_excite            squeeze_excite (+ ``_backward``)                 cpp (csrc/cpu/squeeze_excite.cpp,
                                                                           forward); CUDA runs the reference
pooled_linear             pooled_linear (+ ``_backward``)                  cpp (csrc/cpu/pooled_linear.cpp,
                                                                           forward); CUDA runs the reference
sync_batch_norm           (none: a torch.autograd.Function)                -
========================  ===============================================  =====================================
"""
