"""What every MoE variant shares: the settings (:mod:`.settings`, Triton-free), the call options
(:mod:`.options`), the gate's math as Triton device functions with the token tile
(:mod:`.gating`), width tiling (:mod:`.tiling`), the Philox seed (:mod:`.seed`) and the one
launch-configuration tuner (:mod:`.tuning`), and which kernel families have been cleared on a GPU
(:mod:`.clearance`).

Nothing here imports a variant; the variants (``mlit_kernels.dense``, ...) import from here.
"""
