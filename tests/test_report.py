"""`pangu-moe report`: its numbers are the runs' metrics, its figures are written, it degrades without
matplotlib, and bad run folders give one-line errors."""
import json
import shutil
import sys

import numpy as np
import pytest

from pangu_moe import cli, report
from pangu_moe.report import plots, runs as run_data
from pangu_moe.train.metrics import read
from pangu_moe.train.trainer import Trainer
from tests.conftest import tiny_config

PNG = b"\x89PNG\r\n\x1a\n"


def _layer(demand, kept, capacity, places):
    local, intra, inter = places
    return {"tokens_per_expert": demand, "kept_per_expert": kept, "dropped": sum(demand) - sum(kept),
            "capacity": capacity, "tokens_local": local, "tokens_intra": intra, "tokens_inter": inter}


RECORDS = [
    {"step": 2, "loss": 5.0, "lm_loss": 4.9,
     "layers": [_layer([6, 2, 0, 0], [4, 2, 0, 0], 4, (3, 1, 2)), _layer([2, 2, 2, 2], [2, 2, 2, 2], 4, (8, 0, 0))]},
    {"step": 4, "loss": 4.0, "lm_loss": 3.9, "val_bpb": 5.5, "val_loss": 3.8,
     "layers": [_layer([0, 0, 0, 0], [0, 0, 0, 0], 3, (0, 0, 0)), _layer([8, 0, 0, 0], [3, 0, 0, 0], 3, (0, 0, 3))]},
]


@pytest.mark.parametrize("kinds, left", [(("bpe",), "bits per token"), (("bytes", "bpe"), "bits per token"),
                                         ((None,), "bits per token"),
                                         (("bytes", "bytes"), "bits per byte (byte tokenizer: a token is a byte)")])
def test_loss_figure_labels_the_training_loss_with_the_runs_token(kinds, left, tmp_path):
    runs = [run_data.Run(f"r{i}", "", None, RECORDS, None, None, kind) for i, kind in enumerate(kinds)]
    fig = plots.loss_figure(runs, str(tmp_path / "loss.png"))
    assert [ax.get_ylabel() for ax in fig.axes] == [left, "val bpb (bits per byte)"]
    assert list(fig.axes[0].lines[0].get_ydata()) == [4.9 / np.log(2), 3.9 / np.log(2)]  # nats -> bits


def test_the_trace_figure_draws_cjk_in_an_installed_cjk_font_else_a_box():
    assert plots.cjk_font({"DejaVu Sans", "WenQuanYi Zen Hei", "Noto Sans CJK JP"}) == "Noto Sans CJK JP"
    assert plots.cjk_font({"DejaVu Sans"}) is None
    assert plots.figure_glyph("é") == plots.figure_glyph("é", "SimHei") == ("é", "monospace")
    assert plots.figure_glyph("日", "SimHei") == ("日", "SimHei")
    assert plots.figure_glyph("日") == ("\u25a1", "monospace")


def test_series_of_hand_made_records():
    assert list(run_data.layer_steps(RECORDS)) == [2, 4]
    # step 2: dropped 2 of 16 requested; step 4: dropped 5 of 8
    assert list(run_data.dropped_fraction(RECORDS)) == [2 / 16, 5 / 8]
    # step 2: inter 2 of 14 kept; step 4: 3 of 3
    assert list(run_data.inter_node_fraction(RECORDS)) == [2 / 14, 1.0]
    assert run_data.capacities(RECORDS).tolist() == [[4, 4], [3, 3]]
    assert run_data.expert_load(RECORDS, 0).tolist() == [[3.0, 1.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert run_data.expert_load(RECORDS, 1).tolist() == [[1.0, 1.0, 1.0, 1.0], [4.0, 0.0, 0.0, 0.0]]
    steps, values = run_data.curve(RECORDS, "val_bpb")
    assert steps.tolist() == [4] and values.tolist() == [5.5]


def test_the_placement_figure_draws_each_experts_rank_from_each_placement_on(tmp_path):
    moved = {"step": 3, "expert_rank": [[1, 0, 2, 3], [0, 1, 3, 2]], "moved": [2, 2], "move_bytes_intra": 0,
             "move_bytes_inter": 0}
    records = [dict(RECORDS[0]), {**RECORDS[1], "placements": [moved]}]
    assert run_data.placement_series(RECORDS, [0, 1, 2, 3]) is None
    steps, ranks = run_data.placement_series(records, [0, 1, 2, 3])
    assert steps.tolist() == [0, 3]
    assert ranks.tolist() == [[[0, 1, 2, 3], [1, 0, 2, 3]], [[0, 1, 2, 3], [0, 1, 3, 2]]]  # (L, n + 1, E)
    run = run_data.Run("placed", "", None, records, None, None)
    assert "placement_placed.png" in [name for name, _, _ in report.figures([run])]
    assert "placement_r.png" not in [name for name, _, _ in report.figures([run_data.Run("r", "", None, RECORDS,
                                                                                          None, None)])]
    fig = plots.placement_figure(run, str(tmp_path / "placement.png"), [0, 1, 2, 3])
    assert open(tmp_path / "placement.png", "rb").read(8) == PNG
    mesh = fig.axes[0].collections[0]
    assert mesh.get_array().reshape(4, 2).tolist() == [[0, 1], [1, 0], [2, 2], [3, 3]]  # expert x column


def test_the_load_figure_draws_each_layers_experts_by_their_node_after_the_last_placement(tmp_path):
    config = tiny_config("parallel.nodes=2", "parallel.devices_per_node=1", "moe.num_groups=1")  # ranks [0, 0, 1, 1]
    # placed after the last logged step (4): the figure draws the map the run ended with
    moved = {"step": 4, "expert_rank": [[1, 0, 0, 1], [0, 0, 1, 1]], "moved": [4, 0], "move_bytes_intra": 0,
             "move_bytes_inter": 0}
    records = [dict(RECORDS[0]), {**RECORDS[1], "placements": [moved]}]
    for run_records, rows, labels in (
            (RECORDS, [[0, 1, 2, 3]] * 2, [["e0 n0", "e1 n0", "e2 n1", "e3 n1"]] * 2),
            (records, [[1, 2, 0, 3], [0, 1, 2, 3]], [["e1 n0", "e2 n0", "e0 n1", "e3 n1"],
                                                     ["e0 n0", "e1 n0", "e2 n1", "e3 n1"]])):
        run = run_data.Run("r", "", config, run_records, None, None)
        fig = plots.load_figure(run, str(tmp_path / "load.png"))
        for layer in range(2):
            ax = fig.axes[layer]  # the layers' heatmaps, then their colour bars
            assert [t.get_text() for t in ax.get_yticklabels()] == labels[layer]
            drawn = np.asarray(ax.images[0].get_array())  # (E rows, steps)
            assert drawn.tolist() == run_data.expert_load(run_records, layer)[:, rows[layer]].T.tolist()
            assert [line.get_ydata()[0] for line in ax.lines if line.get_color() == "white"] == [1.5]


def test_constant_routing_panels_are_named_not_drawn():
    from pangu_moe.report import plots
    run = run_data.Run("hand", "hand", None, RECORDS, None, None)
    assert plots.constant_panels([run]) == {}  # dropped, inter-node and capacity all vary
    flat = [{**r, "layers": [_layer([2, 2, 2, 2], [2, 2, 2, 2], 4, (8, 0, 0))] * 2} for r in RECORDS]
    other = run_data.Run("flat", "flat", None, flat, None, None)
    assert plots.constant_panels([other]) == {0: 0.0, 1: 0.0, 2: 4.0}
    assert plots.constant_panels([run, other]) == {}  # constant in one run only: drawn


def test_one_hue_per_expert_and_groups_labelled():
    from pangu_moe.report.palette import expert_colours, expert_groups
    from pangu_moe.report.trace import expert_labels
    import colorsys
    hues = [colorsys.rgb_to_hls(*c)[0] for c in expert_colours(8)]
    assert len({round(h, 6) for h in hues}) == 8  # on one node too, no two experts share a hue
    assert expert_groups(8, 2) == [0, 0, 0, 0, 1, 1, 1, 1]
    assert expert_labels({"expert_node": [0, 0, 0, 0], "num_groups": 2}) == ["e0 n0 g0", "e1 n0 g0", "e2 n0 g1",
                                                                            "e3 n0 g1"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("report") / "tiny"
    cfg = tiny_config("train.steps=6", "train.log_every=2", "train.eval_every=3", "train.checkpoint_every=6",
                      "parallel.nodes=2", "parallel.devices_per_node=2")
    summary = Trainer(cfg, str(run_dir), log=lambda line: None).train()
    return run_dir, summary


def test_report_numbers_equal_the_metrics_they_came_from(tiny_run, tmp_path):
    run_dir, summary = tiny_run
    result = report.write(run_data.load_runs([str(run_dir)]), str(tmp_path / "out"), log=lambda line: None)
    row, = result["rows"]
    assert row["source"] == "summary.json"
    for key in ("val_bpb", "bpb_over_unigram", "dropped_fraction", "inter_node_fraction", "max_over_mean_load",
                "dead_experts", "capacity", "capacity_ratio", "tokens_per_s"):
        assert row[key] == summary[key], key
    records = read(run_dir / "metrics.jsonl")
    assert [r["step"] for r in records] == [2, 3, 4, 6]  # logged every 2 steps and at every evaluation
    assert row["steps"] == 6 and row["router"] == "topk K=1"
    assert row["final_lm_bits"] == pytest.approx(records[-1]["lm_loss"] / np.log(2), rel=1e-12)
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rows"] == [row]
    text = (tmp_path / "out" / "report.md").read_text()
    assert f"| tiny | topk K=1 | 6 | {records[-1]['lm_loss'] / np.log(2):.4f} | {summary['val_bpb']:.3f} |" in text
    # the series against other fields of the same records (the functions' arithmetic: the hand-made RECORDS test)
    for got, r in zip(run_data.dropped_fraction(records), records):
        demand = sum(sum(layer["tokens_per_expert"]) for layer in r["layers"])
        assert demand == 2 * 128  # T x K choices requested in each of the 2 layers
        assert got == pytest.approx((demand - sum(sum(layer["kept_per_expert"]) for layer in r["layers"])) / demand)
    for got, r in zip(run_data.inter_node_fraction(records), records):
        kept = sum(layer["tokens_local"] + layer["tokens_intra"] + layer["tokens_inter"] for layer in r["layers"])
        assert kept == sum(sum(layer["kept_per_expert"]) for layer in r["layers"])
        assert got == sum(layer["tokens_inter"] for layer in r["layers"]) / kept
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["load_tiny.png", "loss.png", "routing.png"]
    for path in result["figures"]:
        with open(path, "rb") as fh:
            assert fh.read(8) == PNG


def test_an_unfinished_run_is_reported_from_its_metrics(tiny_run, tmp_path):
    run_dir = tmp_path / "partial"
    shutil.copytree(tiny_run[0], run_dir)
    (run_dir / "summary.json").unlink()
    records = read(run_dir / "metrics.jsonl")
    row = report.write(run_data.load_runs([str(run_dir)]), str(tmp_path / "out"), log=lambda line: None)["rows"][0]
    layers = [layer for r in records for layer in r["layers"]]
    assert row["source"] == "metrics.jsonl"
    requested = sum(sum(layer["tokens_per_expert"]) for layer in layers)
    assert row["dropped_fraction"] == sum(layer["dropped"] for layer in layers) / requested
    assert row["val_bpb"] == records[-1]["val_bpb"] and row["max_over_mean_load"] is None
    assert "Runs without summary.json (partial)" in (tmp_path / "out" / "report.md").read_text()


def test_the_run_folders_tokenizer_sets_the_loss_unit(tiny_run, tmp_path):
    run_dir = tmp_path / "bpe"
    shutil.copytree(tiny_run[0], run_dir)
    assert run_data.load_run("tiny", str(tiny_run[0])).tokenizer == "bytes"  # the demo trains on bytes
    record = json.loads((run_dir / "tokenizer_identity.json").read_text())
    (run_dir / "tokenizer_identity.json").write_text(json.dumps({**record, "kind": "bpe"}))
    fig = plots.loss_figure(run_data.load_runs([str(run_dir)]), str(tmp_path / "loss.png"))
    assert fig.axes[0].get_ylabel() == "bits per token"
    (run_dir / "tokenizer_identity.json").unlink()  # an older run: its config says bytes
    assert run_data.load_run("bpe", str(run_dir)).tokenizer == "bytes"


def test_without_matplotlib_the_tables_are_still_written(tiny_run, tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    said = []
    result = report.write(run_data.load_runs([str(tiny_run[0])]), str(tmp_path / "out"), log=said.append)
    assert not result["plots"] and result["figures"] == [] and not list((tmp_path / "out").glob("*.png"))
    assert said == [report.PLOT_HINT] and "pip install 'pangu_moe[plot]'" in said[0]
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| tiny | topk K=1 |" in text and report.PLOT_HINT in text


def test_cli_report_and_its_one_line_errors(tiny_run, tmp_path, capsys):
    assert cli.main(["report", str(tiny_run[0]), "--out", str(tmp_path / "r")]) == 0
    assert "wrote " + str(tmp_path / "r" / "report.md") in capsys.readouterr().out
    assert cli.main(["report", str(tmp_path / "nothing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no metrics.jsonl in it or in its sub-folders" in err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "metrics.jsonl").write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    assert cli.main(["report", str(broken)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "metrics.jsonl:2: not a JSON line" in err


def test_a_study_folder_reports_every_run_side_by_side(tiny_run, tmp_path):
    study = tmp_path / "study"
    for name in ("b_run", "a_run"):
        shutil.copytree(tiny_run[0], study / name)
    runs = run_data.load_runs([str(study)])
    assert [r.name for r in runs] == ["a_run", "b_run"]
    rows = report.write(runs, str(tmp_path / "out"), log=lambda line: None)["rows"]
    assert [r["run"] for r in rows] == ["a_run", "b_run"] and rows[0]["val_bpb"] == rows[1]["val_bpb"]
    assert np.array_equal(run_data.capacities(runs[0].records), run_data.capacities(runs[1].records))
