"""The loop: updates yielded in order, hooks due at their multiples and at the end, state threaded."""

from jlora.training.run.loop import Hook, StepInfo, run_hooks, train_steps


def test_hooks_run_at_their_multiples_and_the_last_step_in_list_order():
    calls = []
    step = lambda state, batch, rng: (state + batch, {"loss": state})  # noqa: E731
    steps = train_steps(step, 10, lambda i: i, rng=None, start=3, stop=10)
    hooks = [
        Hook(lambda info: calls.append(("a", info.step)), every=3),
        Hook(lambda info: calls.append(("b", info.step))),
    ]
    last = run_hooks(steps, hooks)
    assert [c for c in calls if c[0] == "a"] == [("a", 6), ("a", 9), ("a", 10)]
    assert [c[1] for c in calls if c[0] == "b"] == list(range(4, 11))
    assert calls.index(("a", 6)) < calls.index(("b", 6))  # in the order given
    assert isinstance(last, StepInfo) and last.last and last.step == 10
    assert last.state == 10 + sum(range(3, 10)) and last.batch == 9 and last.metrics == {"loss": 10 + sum(range(3, 9))}


def test_a_hook_sees_the_state_before_the_next_update():
    seen = []
    steps = train_steps(lambda s, b, r: (s + [b], {}), [], lambda i: i, None, start=0, stop=3)
    run_hooks(steps, [Hook(lambda info: seen.append(list(info.state)))])
    assert seen == [[0], [0, 1], [0, 1, 2]]


def test_nothing_to_do_returns_none():
    assert run_hooks(train_steps(None, 0, None, None, start=5, stop=5), [Hook(print)]) is None
