"""Code generation for the lowered MoE ops.

``spec`` (KernelSpec), ``templates``/``emit`` (Triton source text), ``cache`` (on-disk kernel
modules) and ``triton_ops`` (the ``moec_triton::`` ops; importing it registers them). Nothing is
imported here, so importing ``moec.codegen`` (or its CPU sibling) never imports Triton.
"""
