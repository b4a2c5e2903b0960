import pickle

from tinylm.history import LossHistory


def test_epoch_average_covers_only_that_epochs_steps():
    h = LossHistory()
    for step, loss in [(1, 4.0), (2, 2.0)]:
        h.add_train(step, loss, logged=step == 1)
    assert h.end_epoch(1, 2.5) == 3.0  # steps 1-2, logged or not
    for step, loss in [(3, 1.0), (4, 3.0)]:
        h.add_train(step, loss, logged=False)
    assert h.end_epoch(2, 1.5) == 2.0  # steps 3-4 only
    h.add_val(4, 2, 1.5)
    assert h.evaluated_at(4) and not h.evaluated_at(3) and h.last_val() == 1.5 and h.last_train == 3.0
    assert h.train_losses == [{"step": 1, "loss": 4.0}]  # only the logged steps are kept
    assert LossHistory().last_val() is None and not LossHistory().evaluated_at(0)


def test_a_resumed_history_continues_from_the_checkpoint_numbers_and_the_metrics_rows():
    h = LossHistory()
    rows = []
    for step, loss in [(1, 4.0), (2, 2.0), (3, 1.5)]:
        h.add_train(step, loss)
        rows.append({"type": "train", "step": step, "loss": loss, "lr": 0.1})
    h.add_val(2, 0.5, 1.9)
    rows.append({"type": "eval", "step": 2, "epoch": 0.5, "val_loss": 1.9})
    state = h.resume_state()
    again = LossHistory.resumed(pickle.loads(pickle.dumps(state)), rows)
    assert again == h
    again.add_train(4, 1.0)
    assert again.end_epoch(1, 1.2) == (4.0 + 2.0 + 1.5 + 1.0) / 4  # the epoch in progress carried over
    assert LossHistory.resumed(state).evaluated_at(2)  # metrics.jsonl lost: the checkpoint still knows


def test_what_a_checkpoint_keeps_does_not_grow_with_the_run():
    short, long = LossHistory(), LossHistory()
    for step in range(1, 11):
        short.add_train(step, 1.0 / step)
    for step in range(1, 10_001):
        long.add_train(step, 1.0 / step)
        if step % 100 == 0:
            long.add_val(step, None, 1.0)
    short.add_val(10, None, 1.0)
    sizes = [len(pickle.dumps(h.resume_state())) for h in (short, long)]
    assert abs(sizes[0] - sizes[1]) <= 8  # the same handful of numbers (bigger ints pickle a byte longer)


def test_an_old_checkpoints_whole_history_is_read():
    old = {
        "train_losses": [{"step": s, "loss": float(s)} for s in (1, 2, 3)],
        "val_losses": [{"step": 2, "epoch": 1, "loss": 2.5}],
        "epoch_losses": [{"epoch": 1, "train_loss": 1.5, "val_loss": 2.5}],
    }
    h = LossHistory.from_old_checkpoint(old, lambda step: step / 2)
    assert h.last_train == 3.0 and h.epoch_sum == 3.0 and h.epoch_steps == 1 and h.evaluated_at(2)
