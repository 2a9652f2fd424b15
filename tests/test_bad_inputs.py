"""Inputs a user can type or a file a user can edit, each driven through the CLI: one stderr line, exit 2, no
traceback (a device this MindSpore cannot use, a tampered or truncated corpus manifest, corrupt or empty
configs, folders given where a checkpoint belongs)."""
import json

import pytest

from pangu_moe.cli import main
from pangu_moe.data.prepare import MANIFEST, prepare
from tests.conftest import tiny_config


def _one_line_error(capsys, argv, *expected):
    """Run `pangu-moe argv`; assert exit 2 and a single stderr line holding every `expected` text."""
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"pangu-moe {argv[0]}: error: "), err
    for text in expected:
        assert text in err, err
    return err


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A tiny prepared byte corpus (two domains, windows of 33 tokens) and a config that trains on it."""
    root = tmp_path_factory.mktemp("bad_inputs")
    with open(root / "c.jsonl", "w", encoding="utf-8") as fh:
        for i in range(40):
            fh.write(json.dumps({"text": f"document {i} " * 20, "domain": ("prose", "code")[i % 2]}) + "\n")
    prepare(str(root / "c.jsonl"), str(root / "data"), ["prose", "code"], 32, val_fraction=0.2,
            log=lambda line: None)
    tiny_config("data.source=prepared", f"data.path={root / 'data'}").save(root / "tiny.yaml")
    return root


def _train_on_copy(corpus, tmp_path, edit):
    """argv of a training run on a copy of `corpus` whose manifest text went through `edit`."""
    import shutil
    data = tmp_path / "data"
    shutil.copytree(corpus / "data", data)
    manifest = data / MANIFEST
    manifest.write_text(edit(manifest.read_text()))
    return ["train", "--config", str(corpus / "tiny.yaml"), "--set", f"data.path={data}", "--out",
            str(tmp_path / "run")]


def test_a_device_this_mindspore_cannot_use(capsys, tiny_yaml, tmp_path):
    _one_line_error(capsys, ["train", "--config", tiny_yaml, "--set", "runtime.device=Ascend", "--out",
                             str(tmp_path / "run")], "runtime.device = Ascend: this MindSpore build cannot use it",
                    "--set runtime.device=CPU")
    assert not (tmp_path / "run").exists()


def test_a_manifest_whose_window_count_was_edited(corpus, tmp_path, capsys):
    def edit(text):
        manifest = json.loads(text)
        manifest["shards"][0]["windows"] += 64
        return json.dumps(manifest)
    _one_line_error(capsys, _train_on_copy(corpus, tmp_path, edit), "manifest.json was edited",
                    "pangu-moe prepare-data")


def test_a_truncated_manifest(corpus, tmp_path, capsys):
    _one_line_error(capsys, _train_on_copy(corpus, tmp_path, lambda text: text[:len(text) // 2]),
                    "manifest.json is not valid JSON", "line ", "column ")


def test_a_manifest_that_is_not_an_object(corpus, tmp_path, capsys):
    _one_line_error(capsys, _train_on_copy(corpus, tmp_path, lambda text: "[1, 2]"), "has format 'list'")


@pytest.mark.parametrize("text, expected", [
    ("", "empty; write the settings to change"),
    ('{"train": {"steps": 5}', "not valid YAML"),
    ("train: [1, 2]\n", "train"),
    ("- 1\n- 2\n", "the top level must be a mapping"),
    ("moe:\n  routr: topk\n", "routr"),
])
def test_a_corrupt_config(text, expected, tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _one_line_error(capsys, ["train", "--config", str(path), "--out", str(tmp_path / "run")], expected)
    assert "line 1, column 23" in err if text.startswith("{") else True  # the position is kept, not cut off


def test_folders_given_as_a_checkpoint(tmp_path, capsys):
    runs = tmp_path / "runs"
    (runs / "a" / "checkpoints").mkdir(parents=True)
    (runs / "b" / "checkpoints").mkdir(parents=True)
    _one_line_error(capsys, ["eval", "--checkpoint", str(runs)], "a folder of run directories (a, b); pass one")
    _one_line_error(capsys, ["eval", "--checkpoint", str(runs / "a" / "checkpoints")],
                    f"--checkpoint: no valid checkpoint in {runs / 'a' / 'checkpoints'}")
    _one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path)], f"--checkpoint {tmp_path}: not a checkpoint",
                    "a run directory (it holds checkpoints/)")
    bare = tmp_path / "shared.ckpt"
    bare.write_bytes(b"x")
    err = _one_line_error(capsys, ["generate", "--checkpoint", str(bare), "--prompt", "a"],
                          "no config.yaml in its run directory")
    assert "config file" not in err  # never a file the user did not name
    _one_line_error(capsys, ["eval", "--checkpoint", str(tmp_path / "nope")], "no such file or folder")


def test_version(capsys):
    from pangu_moe import __version__
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out == f"pangu-moe {__version__}\n"


def _damage(path, truncate):
    """Truncate the file at `path` by 7 bytes, or flip one bit in its middle (the size unchanged)."""
    data = bytearray(path.read_bytes())
    if truncate:
        data = data[:-7]
    else:
        data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("split, truncate", [("val", True), ("train", False)])
def test_a_damaged_shard_stops_train_resume_and_eval_before_any_read(corpus, tmp_path, capsys, split, truncate,
                                                                     monkeypatch):
    """A run of 2 steps on a copy of the corpus, then one of the copy's shards truncated (val) or with a bit flipped
    (train): a fresh run, its --resume and eval each stop with one line naming the shard, having read no window."""
    import shutil
    from pangu_moe.data import prepared
    data, run = tmp_path / "data", tmp_path / "run"
    shutil.copytree(corpus / "data", data)
    config = ["--config", str(corpus / "tiny.yaml"), "--set", f"data.path={data}", "--set", "train.warmup_steps=1",
              "--set", "train.eval_every=2", "--set", "train.checkpoint_every=2", "--set", "runtime.mode=pynative"]
    assert main(["train", *config, "--set", "train.steps=2", "--out", str(run)]) == 0
    (run / "summary.json").unlink()
    shard = sorted(data.glob(f"code-{split}-*.mindrecord"))[0]
    _damage(shard, truncate)
    capsys.readouterr()
    monkeypatch.setattr(prepared.PreparedCorpus, "read", lambda *args: pytest.fail("a window was read"))
    expected = f"shard {shard.name} does not match its sha256 in manifest.json (damaged or truncated"
    _one_line_error(capsys, ["train", *config, "--set", "train.steps=2", "--out", str(tmp_path / "fresh")], expected)
    _one_line_error(capsys, ["train", *config, "--set", "train.steps=4", "--out", str(run), "--resume"], expected)
    _one_line_error(capsys, ["eval", "--checkpoint", str(run)], expected)
