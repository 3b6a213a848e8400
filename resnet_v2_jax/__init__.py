"""Pre-activation ResNets (He et al., "Identity Mappings in Deep Residual Networks", 2016).

`from resnet_v2_jax import models` gives the Flax modules; it imports neither TensorFlow nor
tfds. The training system lives in `train`, the CLI in `main`.
"""
