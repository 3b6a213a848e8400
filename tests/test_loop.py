"""The loop's one decision (`train._Trainer.next_action`): what happens at each step boundary,
in which order, with and without a signal; checked as the sequence of actions a whole run takes."""
import types

from resnet_v2_jax import train


def trainer(total=6, log=2, save=3, evaluate=0, steps_per_epoch=4):
    config = types.SimpleNamespace(log_every_steps=log, checkpoint_every_steps=save,
                                   eval_every_steps=evaluate)
    setup = types.SimpleNamespace(total_steps=total, steps_per_epoch=steps_per_epoch)
    return train._Trainer(config, setup, *[None] * 6)


def actions(t, start=0, signal_at=None):
    """The actions of a run from `start`, with a signal arriving during the action
    `signal_at` = (step, action) (None: no signal); as (step, action) pairs."""
    step, done, stopped, taken = start, [], None, []
    while True:
        action = t.next_action(step, start, stopped, done)
        taken.append((step, action))
        if action == "stop":
            return taken
        if action == "train":
            step, done = step + 1, []
        else:
            done.append(action)
        if signal_at == (step, action) or (signal_at == (step, "train") and action == "train"):
            stopped = "SIGTERM"


def test_each_action_once_per_boundary_in_order_and_the_last_step_saved_before_evaluation():
    taken = [a for a in actions(trainer()) if a[1] != "train"]
    # log every 2, save every 3, evaluate every epoch (4 steps); the last step does all three
    assert taken == [(2, "log"), (3, "save"), (4, "log"), (4, "evaluate"),
                     (6, "log"), (6, "save"), (6, "evaluate"), (6, "stop")]


def test_a_signal_stops_after_its_step_with_a_checkpoint_and_no_evaluation():
    taken = [a for a in actions(trainer(), signal_at=(4, "train")) if a[1] != "train"]
    assert taken == [(2, "log"), (3, "save"), (4, "log"), (4, "save"), (4, "stop")]


def test_a_signal_during_evaluation_saves_that_step_through_the_same_path():
    taken = [a for a in actions(trainer(), signal_at=(4, "evaluate")) if a[1] != "train"]
    assert taken == [(2, "log"), (3, "save"), (4, "log"), (4, "evaluate"), (4, "save"),
                     (4, "stop")]


def test_a_resumed_run_decides_nothing_before_its_first_step():
    taken = actions(trainer(), start=3)
    assert taken[0] == (3, "train") and (3, "save") not in taken
