import numpy as np

from pipeline.train.epoch_sums import EpochSums


def test_epoch_sums_pack_into_one_vector_and_come_back_by_name():
    sums = EpochSums(loss=1.5, steps=3, images=48, stage_losses=np.array([0.75, 0.5, 0.25]), train_seconds=12.0)
    vector = sums.packed()
    assert vector.dtype == np.float64 and vector.shape == (4 + 3,)
    back = EpochSums.unpacked(vector)
    assert (back.loss, back.steps, back.images, back.train_seconds) == (1.5, 3, 48, 12.0)
    np.testing.assert_array_equal(back.stage_losses, [0.75, 0.5, 0.25])


def test_all_reduced_adds_every_field_of_every_rank():
    rank0 = EpochSums(loss=2.0, steps=4, images=64, stage_losses=np.array([1.0, 1.0]), train_seconds=10.0)
    rank1 = EpochSums(loss=1.0, steps=3, images=40, stage_losses=np.array([0.5, 0.5]), train_seconds=14.0)
    # A two-rank all-reduce: what every rank gets back is the sum of both ranks' vectors.
    total = rank0.all_reduced(lambda vector: vector + rank1.packed())
    assert (total.loss, total.steps, total.images, total.train_seconds) == (3.0, 7, 104, 24.0)
    np.testing.assert_array_equal(total.stage_losses, [1.5, 1.5])
    assert isinstance(total.steps, int) and isinstance(total.images, int)
