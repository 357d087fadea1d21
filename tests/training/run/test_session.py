"""A run in progress: its hooks in the order the module's doc promises, and a resumed session's steps."""

from jlora.training.records import checkpoint as ckpt
from jlora.training.run.build import build_run
from jlora.training.run.config import DEFAULT_CONFIG, load_run_config
from jlora.training.run.population import population_trainer
from jlora.training.run.session import Session
from jlora.training.run.train import train

from .test_search import SEARCH, TINY


def open_session(cfg, run_dir, **kwargs) -> Session:
    run = build_run(cfg)
    return Session(population_trainer(run), run_dir, ckpt.base_identity(run.base_name, run.params), **kwargs)


def test_hooks_run_log_evaluation_rung_telemetry_checkpoint_progress(tmp_path):
    cfg = load_run_config(DEFAULT_CONFIG, [*TINY, *SEARCH, "telemetry=3", "eval_every=5", "checkpoint.every=4"])
    with open_session(cfg, tmp_path, stop=cfg.steps, progress=False) as session:
        hooks = session.hooks()
    names = [getattr(h.run, "__name__", type(h.run).__name__) for h in hooks]
    assert names == ["MetricsLog", "evaluation", "rung", "telemetry", "checkpoint", "tick"]
    assert [h.every for h in hooks] == [1, 5, 2, 3, 4, 1]
    assert [h.at_interrupt for h in hooks] == [True, False, False, True, True, True]  # a stop waits for no ranking


def test_a_resumed_session_steps_on_from_its_checkpoint_with_the_survivors(tmp_path):
    cfg = load_run_config(DEFAULT_CONFIG, [*TINY, *SEARCH])
    train(cfg, tmp_path, progress=False, until=3)  # past the first rung (step 2): 8 -> 4 members
    with open_session(cfg, tmp_path, stop=cfg.steps, progress=False) as session:
        assert session.start == 3
        assert list(session.live.trainer.ids) == list(session.search.alive) and len(session.search.alive) == 4
        assert [info.step for info in session.steps()] == [4, 5, 6]
