"""The README's own-corpus recipe with three domains: prepare-data, then train with the recipe's flags plus the
domain list; and the one error that names the settings a domain count needs together."""
import inspect
import json
import json as json_module

import pytest

from pangu_moe.cli import main
from pangu_moe.config import ConfigError, RunConfig, fit_domains
from pangu_moe.configs import DEMO_CONFIG


def _three_domains(path):
    """English prose (the json module's docstrings), Chinese and Python code (json's source), 120,000 characters each
    (a text shorter than that is repeated) in 100 documents: 5 of each held out give 5 to 7 validation windows of 257
    BPE tokens, the demo batch of 16 over the three domains."""
    english = " ".join(inspect.getdoc(obj) or "" for obj in vars(json_module).values() if callable(obj))
    chinese = "".join(chr(0x4E00 + (i * 7919) % 2000) + ("。" if i % 17 == 16 else "") for i in range(7000))
    code = inspect.getsource(json_module)
    with open(path, "w", encoding="utf-8") as fh:
        for i in range(100):
            for domain, text in (("en", english), ("zh", chinese), ("code", code)):
                text = (text * (1 + 120000 // len(text)))[:120000]
                fh.write(json.dumps({"domain": domain, "text": text[i * 1200:(i + 1) * 1200]},
                                    ensure_ascii=False) + "\n")


def test_the_readme_recipe_trains_a_three_domain_corpus(tmp_path, capsys):
    _three_domains(tmp_path / "corpus.jsonl")
    data, run = tmp_path / "data", tmp_path / "run"
    assert main(["prepare-data", str(tmp_path / "corpus.jsonl"), "--out", str(data), "--domains", "en,zh,code",
                 "--seq-len", "256", "--tokenizer", "bpe:512"]) == 0
    short = ["--set", "train.steps=2", "--set", "train.warmup_steps=1", "--set", "train.eval_every=2", "--set",
             "train.checkpoint_every=2", "--set", "train.eval_batches=1"]  # a test's budget, not the recipe's
    assert main(["train", "--config", "corpus_cpu", "--set", f"data.path={data}", "--set",
                 "data.domains=[en,zh,code]", "--set", "model.vocab_size=512", "--out", str(run), *short]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and list(summary["val_bpb_per_domain"]) == ["en", "zh", "code"]
    assert "fp32" in capsys.readouterr().err  # the start line names the precision


def test_a_domain_count_the_config_does_not_fit_names_every_setting_that_must_change():
    """The demo (8 experts in 2 groups, batch 16, uniform mixture) on 3 domains: groups 3, then the fewest experts
    and smallest batch at or above the demo's that 3 divides."""
    prepared = ["data.source=prepared", "data.path=data/mine"]
    with pytest.raises(ConfigError) as refused:
        RunConfig.from_yaml(DEMO_CONFIG, [*prepared, "data.domains=[en,zh,code]"])
    fit = "--set 'data.domains=[en,zh,code]' --set moe.num_groups=3 --set moe.num_experts=9 --set train.batch_size=18"
    assert str(refused.value) == ("moe.num_groups = 2: must be 1 or the number of data.domains (3); with 3 "
                                  f"data.domains these settings work together: {fit}")
    overrides = [*prepared, "data.domains=[en,zh,code]", "moe.num_groups=3", "moe.num_experts=9",
                 "train.batch_size=18"]
    assert RunConfig.from_yaml(DEMO_CONFIG, overrides).moe.num_experts == 9  # the named set validates
    d = RunConfig.from_yaml(DEMO_CONFIG, prepared).to_dict()
    assert fit_domains(d, ["a", "b"]) == "--set 'data.domains=[a,b]'"  # two domains: nothing else changes
    d["moe"]["num_groups"] = 1
    assert fit_domains(d, ["a", "b", "c", "d", "e"]) == "--set 'data.domains=[a,b,c,d,e]' --set train.batch_size=20"
    d["data"]["source"] = "demo"  # the demo corpus has exactly two domains: no set fits
    assert fit_domains(d, ["a", "b", "c"]) == ""


def test_a_prepared_corpus_with_other_domains_names_them_and_the_settings(tmp_path, capsys):
    _three_domains(tmp_path / "corpus.jsonl")
    assert main(["prepare-data", str(tmp_path / "corpus.jsonl"), "--out", str(tmp_path / "data"), "--domains",
                 "en,zh,code", "--seq-len", "256"]) == 0
    capsys.readouterr()
    assert main(["train", "--config", "demo_cpu", "--set", "data.source=prepared", "--set",
                 f"data.path={tmp_path / 'data'}", "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "data.domains = ['prose', 'code']: must be ['en', 'zh', 'code']" in err
    assert err.rstrip().endswith("--set moe.num_groups=3 --set moe.num_experts=9 --set train.batch_size=18")
