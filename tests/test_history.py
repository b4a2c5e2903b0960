from tinylm.history import LossHistory


def test_epoch_average_covers_only_that_epochs_steps_and_survives_a_round_trip():
    h = LossHistory()
    for step, loss in [(1, 4.0), (2, 2.0), (3, 1.0), (4, 3.0)]:
        h.add_train(step, loss)
    epoch_of = lambda step: step / 2  # noqa: E731  (two steps per epoch, as EpochWindows counts)
    assert h.end_epoch(1, 2.5, epoch_of) == 3.0  # steps 1-2 only, even with later steps recorded
    assert h.end_epoch(2, 1.5, epoch_of) == 2.0  # steps 3-4
    h.add_val(4, 2, 1.5)
    assert h.evaluated_at(4) and not h.evaluated_at(3) and h.last_val() == 1.5
    again = LossHistory.from_dict(h.to_dict())
    assert again == h and again.epoch_losses[1] == {"epoch": 2, "train_loss": 2.0, "val_loss": 1.5}
    assert LossHistory().last_val() is None and not LossHistory().evaluated_at(0)
