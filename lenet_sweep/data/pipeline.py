"""tf.data input: decoded uint8 splits as batches scaled to [0, 1] on the fly."""

from __future__ import annotations

from lenet_sweep.data.decode import DecodedSplit


def make_dataset(split: DecodedSplit, batch_size: int, shuffle: bool, seed: int = 0):
    """Batches of (float32 images in [0, 1], int32 labels), reshuffled every epoch when `shuffle`.

    Shuffling indices and gathering each batch keeps one copy of the images in memory.
    """
    import tensorflow as tf

    images = tf.constant(split.images)
    labels = tf.constant(split.labels)
    ds = tf.data.Dataset.range(len(split.labels))
    if shuffle:
        ds = ds.shuffle(len(split.labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    ds = ds.map(
        lambda idx: (tf.cast(tf.gather(images, idx), tf.float32) / 255.0, tf.gather(labels, idx)),
        num_parallel_calls=tf.data.AUTOTUNE,
    )
    return ds.prefetch(tf.data.AUTOTUNE)
