"""Training augmentation, all of it in JAX inside the jitted train step, on the uint8 batch.

This is the one place that decides what is augmented where. The input pipelines deliver
un-augmented uint8 images: CIFAR as stored, ImageNet as the host must (each JPEG decoded in its
random window and resized to the crop size: that sets which pixels exist). Everything after
that is cheap per pixel on an accelerator and costly on a host CPU, so the train step does it
(`for_training`), docs/paper.md, "Training recipes":

- "pad_crop_flip" (CIFAR): zero-pad by 4 pixels, a random crop of the training size, a random
  horizontal flip.
- "scale", "scale_aspect" (ImageNet; the window is the host's): a random horizontal flip and,
  with `color`, fb.resnet.torch's colour augmentation: brightness, contrast and saturation
  blends by factors uniform in [0.6, 1.4] in a random order, then AlexNet-style PCA lighting
  noise.

Randomness: example `i` of the global batch at step `s` draws from
`fold_in(fold_in(key, s), i)` (`example_keys`), so a batch is augmented the same on any device
count, and a resumed run the same as an uninterrupted one. The host pipelines draw nothing but
their crop windows and data order.
"""

import itertools
from typing import Callable, Dict

import jax
import jax.numpy as jnp

from resnet_v2_jax import errors

AUGMENTATIONS = ("pad_crop_flip", "scale", "scale_aspect")
# docs/paper.md, "Training recipes": CIFAR images are zero-padded by 4 pixels on each side before
# the random crop.
CIFAR_PADDING = 4
# fb.resnet.torch ColorJitter{brightness=0.4, contrast=0.4, saturation=0.4} and
# Lighting(0.1, eigval, eigvec) with the ImageNet RGB PCA below (on 0-1 images).
COLOR_JITTER = 0.4
LIGHTING_STD = 0.1
PCA_EIGVAL = (0.2175, 0.0188, 0.0045)
PCA_EIGVEC = ((-0.5675, 0.7192, 0.4009),
              (-0.5808, -0.0045, -0.8140),
              (-0.5836, -0.6948, 0.4203))
# The orders in which the three blends can run: `draw`'s "order" indexes this table.
JITTER_ORDERS = tuple(itertools.permutations(range(3)))
# ITU-R 601 luma, the weights of tf.image.rgb_to_grayscale.
GRAY_WEIGHTS = (0.2989, 0.5870, 0.1140)


def for_training(kind: str, crop_size: int, color: bool) -> Callable:
    """(uint8 images [B, H, W, 3], one key per example [B]) -> float32 images [B, s, s, 3] on the
    0-255 scale, s = `crop_size`: the augmentation `kind` (one of AUGMENTATIONS) of training."""
    if kind not in AUGMENTATIONS:
        raise errors.ConfigError(
            f"unknown augment {kind!r}; choose one of {', '.join(AUGMENTATIONS)}")
    if kind == "pad_crop_flip":
        return lambda images, keys: jax.vmap(
            lambda image, key: random_pad_crop_flip(image, key, crop_size))(images, keys)
    return lambda images, keys: jax.vmap(
        lambda image, key: augment_image(image, draw(key), color))(images, keys)


def example_keys(key: jax.Array, step: jax.Array, first_index: jax.Array, count: int):
    """Keys of examples first_index .. first_index + count - 1 of the global batch of `step`."""
    step_key = jax.random.fold_in(key, step)
    return jax.vmap(lambda i: jax.random.fold_in(step_key, i))(first_index + jnp.arange(count))


# --- CIFAR ---------------------------------------------------------------------------------------

def pad_crop_flip(image: jax.Array, offset_y, offset_x, flip, crop_size: int) -> jax.Array:
    """Zero-pads one image [H, W, C] by CIFAR_PADDING, crops a `crop_size` square at
    (offset_y, offset_x) of the padded image and mirrors it if `flip`; float32."""
    pad = CIFAR_PADDING
    padded = jnp.pad(image.astype(jnp.float32), ((pad, pad), (pad, pad), (0, 0)))
    crop = jax.lax.dynamic_slice(padded, (offset_y, offset_x, 0),
                                 (crop_size, crop_size, image.shape[-1]))
    return jnp.where(flip, crop[:, ::-1], crop)


def random_pad_crop_flip(image: jax.Array, key: jax.Array, crop_size: int) -> jax.Array:
    """docs/paper.md, "Training recipes": uniform crop offsets in the padded image, flip with
    p=1/2."""
    key_y, key_x, key_flip = jax.random.split(key, 3)
    pad = CIFAR_PADDING
    height, width = image.shape[:2]
    offset_y = jax.random.randint(key_y, (), 0, height + 2 * pad - crop_size + 1)
    offset_x = jax.random.randint(key_x, (), 0, width + 2 * pad - crop_size + 1)
    return pad_crop_flip(image, offset_y, offset_x, jax.random.bernoulli(key_flip), crop_size)


# --- ImageNet: flip and colour -------------------------------------------------------------------

def draw(key: jax.Array) -> Dict[str, jax.Array]:
    """One example's random draws: "flip" (bool), "factors" (brightness, contrast, saturation),
    "order" (index into JITTER_ORDERS) and "lighting" (the PCA noise coefficients)."""
    key_flip, key_factors, key_order, key_lighting = jax.random.split(key, 4)
    return {"flip": jax.random.bernoulli(key_flip),
            "factors": jax.random.uniform(key_factors, (3,), minval=1 - COLOR_JITTER,
                                          maxval=1 + COLOR_JITTER),
            "order": jax.random.randint(key_order, (), 0, len(JITTER_ORDERS)),
            "lighting": LIGHTING_STD * jax.random.normal(key_lighting, (3,))}


def _gray(image):
    return jnp.tensordot(image, jnp.asarray(GRAY_WEIGHTS, image.dtype), axes=1)[..., None]


def color_augment(image: jax.Array, factors: jax.Array, order: jax.Array,
                  lighting: jax.Array) -> jax.Array:
    """fb.resnet.torch's colour augmentation of one float image [H, W, 3] in [0, 1]: the blends
    `factor * x + (1 - factor) * other`, with other = 0 (brightness), the mean gray level
    (contrast) and the gray image (saturation), in the order JITTER_ORDERS[order]; then
    eigvec @ (lighting * eigval) added to every pixel, clipped to [0, 1]."""
    def blend(x, which):
        gray = _gray(x)
        other = jnp.stack([jnp.zeros_like(x), jnp.broadcast_to(jnp.mean(gray), x.shape),
                           jnp.broadcast_to(gray, x.shape)])[which]
        return factors[which] * x + (1 - factors[which]) * other

    orders = jnp.asarray(JITTER_ORDERS)
    for slot in range(3):
        image = blend(image, orders[order, slot])
    rgb = jnp.asarray(PCA_EIGVEC, image.dtype) @ (lighting * jnp.asarray(PCA_EIGVAL, image.dtype))
    return jnp.clip(image + rgb, 0.0, 1.0)


def augment_image(image: jax.Array, draws: Dict[str, jax.Array], color: bool) -> jax.Array:
    """Flip and (with `color`) colour-augment one uint8 image [H, W, 3] with `draws` (`draw`);
    returns float32 on the 0-255 scale."""
    image = image.astype(jnp.float32)
    image = jnp.where(draws["flip"], image[:, ::-1], image)
    if color:
        image = 255.0 * color_augment(image / 255.0, draws["factors"], draws["order"],
                                      draws["lighting"])
    return image
