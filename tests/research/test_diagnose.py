"""`jlora diagnose`: spectrum figures and subspace similarity of trained runs, against numpy."""

import json

import numpy as np
import pytest

from jlora.cli import main
from jlora.core.lora.adapter import flatten_adapters, get_path, output_columns, split_slice
from jlora.training.records.artifacts import load_run
from jlora.training.records.checkpoint import latest_checkpoint, load_adapter
from jlora.training.run.config import load_run_config
from jlora.training.run.train import train

from ..conftest import BUCKETS
from ..core.lora.test_svd import numpy_intruders

TINY = [
    "model.random={n_layer: 2, n_embd: 32, n_head: 2, n_positions: 64, embd_pdrop: 0.0, resid_pdrop: 0.0}",
    "seq_len=64",
    BUCKETS,
    "batch_size=8",
    "steps=6",
    "optim.lr=1e-2",
    "optim.warmup_steps=0",
    "data.validation=null",
    "eval.forgetting=null",
    "exact_match=0",
    "checkpoint.every=6",
    "lora.target_modules=[c_attn, mlp.c_proj]",
]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two short runs on the same base: LoRA r=4 and r=8 (B != 0 after a few steps)."""
    out = {}
    for r in (4, 8):
        run_dir = tmp_path_factory.mktemp(f"run_r{r}")
        train(load_run_config(None, [*TINY, f"lora.r={r}", f"lora.alpha={2 * r}"]), run_dir, progress=False)
        out[r] = run_dir
    return out


def right_vectors(a: np.ndarray) -> np.ndarray:
    return np.linalg.svd(a.astype(np.float64), full_matrices=False)[2]


def test_report_matches_dense_numpy(runs, tmp_path, capsys):
    assert main(["diagnose", str(runs[4]), "--against", str(runs[8]), "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "diagnose.json").read_text())
    _, params, lora, cfg, _ = load_run(runs[4])
    adapters = flatten_adapters(lora)
    assert (
        list(report["modules"])
        == list(adapters)
        == [
            "h.0.attn.c_attn",
            "h.0.mlp.c_proj",
            "h.1.attn.c_attn",
            "h.1.mlp.c_proj",
        ]
    )
    for path, fig in report["modules"].items():
        a, b = (np.asarray(adapters[path][n], np.float64) for n in ("A", "B"))
        dw = cfg.scaling_for(path) * b @ a  # the dense update the tool never forms
        kernel = np.asarray(get_path(params, split_slice(path)[0])["kernel"], np.float64)  # (d_in, d_out)
        w = kernel[:, output_columns(path, kernel.shape[1])].T
        u, s, vt = np.linalg.svd(dw)
        s = s[:4]
        np.testing.assert_allclose(fig["singular_values"], s, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(fig["energy"], np.cumsum(s**2) / np.sum(s**2), rtol=1e-4)
        assert fig["energy_top"] == {k: pytest.approx(fig["energy"][int(k) - 1]) for k in ("1", "2", "4")}
        p = s / s.sum()
        assert fig["effective_rank"] == pytest.approx(np.exp(-np.sum(p * np.log(p))), rel=1e-4)
        assert fig["stable_rank"] == pytest.approx(np.sum(s**2) / s[0] ** 2, rel=1e-4)
        assert fig["relative_norm"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(w), rel=1e-4)
        projected = u[:, :4].T @ w @ vt[:4].T
        assert fig["amplification"] == pytest.approx(np.linalg.norm(dw) / np.linalg.norm(projected), rel=1e-3)
        assert fig["singular_values"][0] > 0  # trained: B moved off zero
        count, sim = numpy_intruders(w, w + dw)  # the adapted weight's top 10 against all of W's
        assert fig["intruders"] == count and report["intruders"] == {"k": 10, "epsilon": 0.5}
        np.testing.assert_allclose(fig["intruder_similarity"], sim, atol=1e-4)

    other = flatten_adapters(load_adapter(latest_checkpoint(runs[8]))[0])
    for path, entry in report["against"]["modules"].items():
        v1, v2 = right_vectors(np.asarray(adapters[path]["A"])), right_vectors(np.asarray(other[path]["A"]))
        phi = np.array([[np.sum((v1[:i] @ v2[:j].T) ** 2) / min(i, j) for j in range(1, 9)] for i in range(1, 5)])
        assert (entry["r1"], entry["r2"]) == (4, 8)
        np.testing.assert_allclose(entry["phi"], phi, atol=1e-4)
        assert entry["phi_full"] == pytest.approx(phi[3, 3], abs=1e-4)

    table = capsys.readouterr().out
    assert all(path in table for path in adapters) and "phi(1,1)" in table and "intr.@10" in table
    for name in ("spectrum.png", "similarity.png", "intruders.png"):
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 200_000


def test_default_out_is_inside_the_run(runs, capsys):
    assert main(["diagnose", str(runs[8])]) == 0
    assert (runs[8] / "diagnose" / "diagnose.json").exists() and (runs[8] / "diagnose" / "spectrum.png").exists()
    assert not (runs[8] / "diagnose" / "similarity.png").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/run"], "no such run directory /nonexistent/run"),
        (["RUN", "--against", "/nonexistent/other"], "no such run directory /nonexistent/other"),
        (["EMPTY"], "no adapter checkpoint in"),
        (["RUN", "--intruder-k", "0"], "--intruder-k must be >= 1 and --intruder-epsilon in (0, 1], got 0 and 0.5"),
        (["RUN", "--intruder-epsilon", "1.5"], "--intruder-epsilon in (0, 1], got 10 and 1.5"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(runs, tmp_path, capsys, args, message):
    args = [str(runs[4]) if a == "RUN" else str(tmp_path) if a == "EMPTY" else a for a in args]
    assert main(["diagnose", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
