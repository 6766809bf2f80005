"""The memory and FLOP plan of a real run, computed on this machine.

``python -m ppllava_jax.plan --config configs/sft_vicuna7b.py --mesh data=1,fsdp=8,tensor=1``
builds a config's train step for a simulated mesh of host devices from abstract parameters
(``jax.ShapeDtypeStruct``s with their shardings: no weight is read or made). It prints the
per-device memory a compiler that follows the program holds, with remat and without
(``memory``, from the jaxpr), XLA:CPU's compiled memory and FLOPs (``--no-compile`` skips
the compile), and what they imply on TPU v5e / v5p and H100 (``chips``). ``architectures``
holds the released models' architectures, for configs whose checkpoint folder is not on
this machine; ``steps`` does the work; ``__main__`` is the CLI, which must fix the host
device count before JAX starts, so this package imports no JAX at import time.
"""
