"""A test and benchmark fixture: a handful of JPEG files as a registered tfds dataset, so the
ImageNet pipeline runs on real photos without ImageNet."""
import dataclasses
import os
from typing import Sequence

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from resnet_v2_jax import datasets


def store_jpeg_dataset(name: str, files: Sequence[str], data_dir: str,
                       like: str = "imagenet2012") -> datasets.DatasetInfo:
    """Stores JPEG files, bytes unchanged, as the tfds dataset `name` in `data_dir` and
    registers it with `like`'s statistics: one class per file, and "train" and "validation"
    both hold every file. A folder of your own photos works the same way."""
    files = [str(f) for f in files]
    features = tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format="jpeg"),
        "label": tfds.features.ClassLabel(
            names=[os.path.splitext(os.path.basename(f))[0] for f in files])})
    jpegs = []
    for f in files:
        with tf.io.gfile.GFile(f, "rb") as stream:
            jpegs.append(stream.read())
    examples = tf.data.Dataset.from_tensor_slices(
        {"image": jpegs, "label": np.arange(len(files))})
    tfds.dataset_builders.store_as_tfds_dataset(
        name, "1.0.0", features, {"train": examples, "validation": examples}, data_dir=data_dir)
    return datasets.register(dataclasses.replace(
        datasets.get(like), name=name, num_classes=len(files), num_train_examples=len(files)))
